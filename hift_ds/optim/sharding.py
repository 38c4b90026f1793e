"""How the data-parallel ranks share a group: here, not at all (ZeRO stage 0, or one process).

A ``HiFTOptimizer`` asks its sharding strategy for everything that depends on how ranks split the
work: where each group's weights and gradients live, which gradient and which weights an update
reads and writes, how a scalar is reduced over ranks, and what a checkpoint holds. This strategy
keeps every group whole on this rank (at stage 0 with several ranks, DeepSpeed's engine has
all-reduced the gradients before the step). ``hift_ds.distributed`` adds ZeRO-1/2
(``Zero12Sharding``) and ZeRO-3 (``Zero3Sharding``) with the same methods.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from hift_ds.optim.grads import FlatGrads, flatten_weights, param_views
from hift_ds.optim.store import MASTER


class Sharding:
    """ZeRO stage 0: this rank holds every group whole; the update reads whole-group gradients."""

    stage = 0
    world, rank = 1, 0
    always_flat = False  # sharded stages update flat shards whatever the kernel backend

    def bind(self, groups: list[list[nn.Parameter]], flat: bool, keeps_masters: bool) -> None:
        """Lay out ``groups`` (flat: each group's weights in one buffer, gradients in a shared one)."""
        self.groups, self.keeps_masters = groups, keeps_masters
        self.numels = [sum(p.numel() for p in ps) for ps in groups]
        self.weights_device = [flatten_weights(ps, n) for ps, n in zip(groups, self.numels)] if flat else []
        self.grads = FlatGrads(groups, max(self.numels), groups[0][0].dtype, groups[0][0].device) if flat else None

    @property
    def store_numels(self) -> list[int]:
        """Elements of each group's masters and state that this rank keeps."""
        return self.numels

    def masters_from_model(self, g: int) -> Tensor:
        """This rank's fp32 masters of group ``g``, read from the model's weights."""
        return torch.cat([p.detach().reshape(-1).float() for p in self.groups[g]])

    def activate(self, g: int) -> None:
        """Group ``g`` is about to train: its gradients start at zero."""
        if self.grads is not None:
            self.grads.attach(g)

    def arm(self, g: int, last_micro_batch: bool) -> None:
        """The coming backward is group ``g``'s (ZeRO-2 reduces its gradients as they are produced)."""

    def zero_grad(self, g: int, set_to_none: bool) -> None:
        """Clear group ``g``'s gradients (the flat path keeps its views and zeroes the buffer)."""
        if self.grads is not None:
            self.grads.buf_device.zero_()
            return
        for p in self.groups[g]:
            if set_to_none or p.grad is None:
                p.grad = None
            else:
                p.grad.zero_()

    def gradient(self, g: int) -> tuple[Tensor | None, list[Tensor], int]:
        """Group ``g``'s gradient for the update: (flat tensor or None, one tensor per target, the ranks it sums)."""
        if self.grads is not None:
            self.grads.adopt(g)
            flat = self.grads.flat(g)
            return flat, param_views(self.groups[g], flat), 1
        # A parameter of the active group that got no gradient (unused in the forward) is updated
        # with a zero one, as DeepSpeed does and as a ZeRO shard spanning parameters must: every
        # backend then agrees, and a group's parameters share one step count.
        for p in self.groups[g]:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        return None, [p.grad for p in self.groups[g]], 1

    def all_reduce(self, t: Tensor, op: str) -> float:
        """``t`` (one element) summed or maxed over ranks, as a Python float."""
        return float(t)

    def split(self, g: int, flat: Tensor) -> list[Tensor]:
        """A flat tensor of group ``g`` (state, masters, gradient) as the update's per-target tensors."""
        return param_views(self.groups[g], flat)

    def update_weights(self, g: int) -> Tensor | None:
        """The flat weights the update of group ``g`` writes (None: the parameters one by one)."""
        return self.weights_device[g] if self.weights_device else None

    def publish(self, g: int, weights: Tensor | None) -> None:
        """After the update: every rank's model holds group ``g``'s new weights."""

    def checkpoint_state(self, home: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
        """Every group's whole (rank-independent) masters and state, for a checkpoint."""
        return [dict(bufs) for bufs in home]

    def shard_of(self, g: int, full: Tensor) -> Tensor:
        """This rank's part of a whole group buffer from a checkpoint."""
        return full.reshape(-1)

    def load_weights(self, g: int, saved: dict[str, Tensor]) -> None:
        """Model weights of group ``g`` from a checkpoint's masters (fp32 weights come with the module)."""
        if MASTER in saved and self.keeps_masters:
            master = saved[MASTER].to(self.groups[g][0].device)
            for p, m in zip(self.groups[g], param_views(self.groups[g], master)):
                p.data.copy_(m)

    def before_checkpoint(self) -> None:
        """Called by DeepSpeed's engine before it saves or loads a checkpoint."""

    def after_checkpoint(self) -> None:
        """Called by DeepSpeed's engine after it saved or loaded a checkpoint."""

    def memory_bytes(self) -> dict[str, int]:
        """Bytes of this rank's weights and gradient buffers (what ``memory_report`` counts)."""
        weights = sum(p.numel() * p.element_size() for ps in self.groups for p in ps)
        if self.grads is not None:
            grads = self.grads.buf_device.numel() * self.grads.buf_device.element_size()
        else:
            grads = sum(p.grad.numel() * p.grad.element_size() for ps in self.groups for p in ps if p.grad is not None)
        return {"model_weights": weights, "gradients": grads}

