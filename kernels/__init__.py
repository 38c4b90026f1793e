"""Update kernels for the active HiFT group: the torch reference and fused Triton kernels.

``apply_update`` is the one entry point the optimizer calls. It receives per-parameter lists
(views) and, when the caller holds the group in contiguous buffers, the same data as flat
1-D tensors so a fused kernel can update the whole group in one launch.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from . import reference
from .reference import DEFAULTS, has_inf_or_nan, state_kinds

BACKENDS = ("auto", "triton", "torch")


def resolve_backend(kernel: str, device: torch.device | str) -> str:
    """Map the configured kernel choice ("auto", "triton", "torch") to the backend that will run."""
    if kernel not in BACKENDS:
        raise ValueError(f"kernel={kernel!r} is not one of {BACKENDS}")
    if kernel == "torch":
        return "torch"
    on_cuda = torch.device(device).type == "cuda"
    if kernel == "auto":
        return "triton" if on_cuda else "torch"
    import os
    if not on_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("kernel='triton' needs a CUDA device (or TRITON_INTERPRET=1 for testing on CPU); "
                         "use kernel='auto' or 'torch' on this machine")
    return "triton"


def apply_update(name: str, hyper: dict, params: Sequence[Tensor], grads: Sequence[Tensor],
                 state: dict[str, Sequence[Tensor]], steps: Sequence[int], *, backend: str = "torch",
                 flat: dict[str, Tensor] | None = None, inv_scale: float = 1.0) -> None:
    """Update the fp32 masters ``params`` in place with optimizer ``name`` on the chosen backend."""
    if backend == "torch":
        reference.update(name, hyper, params, grads, state, steps, inv_scale=inv_scale)
        return
    raise ValueError(f"backend {backend!r} is not available")


__all__ = ["apply_update", "resolve_backend", "state_kinds", "has_inf_or_nan", "DEFAULTS", "BACKENDS"]
