"""One update of the active group, for every kind of layout: whole groups or shards, flat or per parameter.

The optimizer hands over the group's buffers from the store (fp32 masters, when the weights are
16-bit, and the optimizer state), the weights to write and the gradient; ``split`` cuts a flat
tensor into the update's targets (one per parameter for a whole group, one for a shard). The
Triton backend runs one launch over the flat buffers and casts the new masters into the weights;
the torch reference runs per target and copies them.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from hift_ds import kernels
from hift_ds.optim.store import MASTER


def update_group(name: str, hyper: dict, bufs: dict[str, Tensor], weights: Tensor | None,
                 params: Sequence[torch.nn.Parameter], grads: list[Tensor], flat_grad: Tensor | None,
                 split: Callable[[Tensor], list[Tensor]], step: int, backend: str, inv_scale: float) -> None:
    """Update one group in place: its masters (or fp32 weights), state, and the 16-bit weights cast from the masters.

    ``weights`` is the flat tensor of weights the update writes (None: ``params`` one by one).
    """
    state = {k: split(buf) for k, buf in bufs.items() if k != MASTER}
    master = bufs.get(MASTER)
    model = split(weights) if weights is not None else [p.data for p in params]
    targets = split(master) if master is not None else model
    flat = None
    if backend == "triton":
        flat = {k: v for k, v in bufs.items() if k != MASTER}
        flat.update(param=master if master is not None else weights, grad=flat_grad)
        if master is not None:
            flat["model"] = weights
    kernels.apply_update(name, hyper, targets, grads, state, [step] * len(targets), backend=backend,
                         inv_scale=inv_scale, flat=flat,
                         model_params=model if master is not None and flat is None else None)


def gradient_factor(sharding, flat_grad: Tensor | None, grads: list[Tensor], *, loss_scale: float | None, ranks: int,
                    max_grad_norm: float, backend: str, device: torch.device) -> tuple[float | None, float | None]:
    """(the factor the update multiplies the summed gradient by, None on an fp16 overflow; the norm clipping measured).

    The factor undoes the fp16 loss scale, averages over the data-parallel ranks and, with
    ``max_grad_norm`` > 0, clips by the active group's norm; overflow and norm are reduced over ranks.
    """
    inv_scale = 1.0 / loss_scale if loss_scale is not None else 1.0
    if ranks > 1:
        inv_scale /= ranks  # the data-parallel mean of a sum over ranks
    if loss_scale is not None:
        bad = torch.tensor([float(has_overflow(flat_grad, grads, backend))], device=device)
        if sharding.all_reduce(bad, "max"):
            return None, None
    norm = None
    if max_grad_norm > 0:
        norm = float(sharding.all_reduce(squared_norm(flat_grad, grads), "sum")) ** 0.5 * inv_scale
        if norm > max_grad_norm:
            inv_scale *= max_grad_norm / (norm + 1e-6)
    return inv_scale, norm


def inner_step(inner: torch.optim.Optimizer, grads: list[Tensor], inv_scale: float) -> None:
    """A torch optimizer's step over the active group, its gradients multiplied by ``inv_scale`` first."""
    if inv_scale != 1.0:
        for g in grads:
            g.mul_(inv_scale)
    inner.step()


def has_overflow(flat_grad: Tensor | None, grads: list[Tensor], backend: str) -> bool:
    """Whether the gradient holds an inf or a nan (fp16 overflow), checked on the backend the update runs on."""
    if flat_grad is not None:
        # With kernel "torch" the check is torch's too: the user asked for no Triton.
        fused = backend == "triton" and flat_grad.is_cuda
        return kernels.has_inf_or_nan_flat(flat_grad, backend="triton" if fused else "torch")
    return kernels.has_inf_or_nan(grads)


def squared_norm(flat_grad: Tensor | None, grads: list[Tensor]) -> Tensor:
    """The gradient's squared L2 norm, in fp32, as a one-element tensor."""
    if flat_grad is not None:
        return (torch.linalg.vector_norm(flat_grad, dtype=torch.float32) ** 2).reshape(1)
    return sum(torch.linalg.vector_norm(g.float()) ** 2 for g in grads).reshape(1)
