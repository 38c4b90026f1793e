"""The flat path's buffers: each group's weights in one buffer, the active group's gradients in another.

With every parameter of a group a view into one weight buffer and every ``.grad`` a view into one
gradient buffer, a single kernel launch updates the whole group (and casts the new masters into
the 16-bit weights); ZeRO shards are slices of the same buffers. A parameter's offset in its
group's buffers is the sum of the sizes before it, in the group's order.
"""
from __future__ import annotations

import itertools
import weakref
from typing import Callable

import torch
from torch import Tensor, nn


def param_views(params: list[nn.Parameter], flat: Tensor) -> list[Tensor]:
    """Views of ``flat`` shaped like ``params``, one after the other from its start."""
    out, off = [], 0
    for p in params:
        out.append(flat[off:off + p.numel()].view_as(p))
        off += p.numel()
    return out


def flatten_weights(params: list[nn.Parameter], size: int) -> Tensor:
    """Move ``params`` into one zero-padded buffer of ``size`` elements; each ``.data`` becomes a view into it."""
    n = sum(p.numel() for p in params)
    flat_device = torch.zeros(size, dtype=params[0].dtype, device=params[0].device)
    torch.cat([p.detach().reshape(-1) for p in params], out=flat_device[:n])
    for p, view in zip(params, param_views(params, flat_device)):
        p.data = view
    return flat_device


class FlatGrads:
    """One gradient buffer shared by every group, the active group's ``.grad`` views into it."""

    def __init__(self, groups: list[list[nn.Parameter]], numel: int, dtype: torch.dtype, device: torch.device):
        self.groups = groups
        self.buf_device = torch.zeros(numel, dtype=dtype, device=device)
        self.offset = {id(p): off for ps in groups
                       for p, off in zip(ps, itertools.accumulate([0] + [q.numel() for q in ps]))}

    def view_of(self, p: nn.Parameter) -> Tensor:
        """``p``'s slice of the gradient buffer."""
        off = self.offset[id(p)]
        return self.buf_device[off:off + p.numel()].view_as(p)

    def attach(self, g: int) -> None:
        """Zero the buffer and make group ``g``'s gradients views into it."""
        self.buf_device.zero_()
        for p, view in zip(self.groups[g], param_views(self.groups[g], self.buf_device)):
            p.grad = view

    def adopt(self, g: int) -> None:
        """Bring group ``g``'s gradients back into the buffer after something replaced or dropped them."""
        # DeepSpeed's engine.zero_grad or a user's model.zero_grad() set .grad to None after activation,
        # so autograd made fresh tensors. A parameter that got no gradient since then must not keep
        # a stale one in its view.
        for p, view in zip(self.groups[g], param_views(self.groups[g], self.buf_device)):
            if p.grad is None:
                view.zero_()
                p.grad = view
            elif p.grad.data_ptr() != view.data_ptr():
                view.copy_(p.grad)
                p.grad = view

    def adopt_one(self, p: nn.Parameter) -> None:
        """``p``'s gradient back into its view, if autograd made a fresh tensor (see ``adopt``)."""
        view = self.view_of(p)
        if p.grad.data_ptr() != view.data_ptr():
            view.copy_(p.grad)
            p.grad = view

    def flat(self, g: int) -> Tensor:
        """Group ``g``'s gradients as one flat tensor (the start of the buffer)."""
        return self.buf_device[:sum(p.numel() for p in self.groups[g])]


def hook_gradients(owner: object, params: list[nn.Parameter], on_grad: Callable[[object, nn.Parameter], None]) -> None:
    """Call ``on_grad(owner, p)`` once each parameter's gradient of a backward is complete.

    The model outlives the optimizer (re-wrapping it is allowed): a hook holding a bound method would
    keep the optimizer and its buffers alive for good, so the hook holds a weak reference, and the
    hooks go when ``owner`` does.
    """
    ref = weakref.ref(owner)

    def hook(q: nn.Parameter) -> None:  # must return None, or torch takes it for a new grad
        live = ref()
        if live is not None:
            on_grad(live, q)

    handles = []
    for p in params:
        p.requires_grad_(True)  # a previous wrapper froze it; torch hooks need it unfrozen
        handles.append(p.register_post_accumulate_grad_hook(hook))
    weakref.finalize(owner, lambda: [h.remove() for h in handles])
