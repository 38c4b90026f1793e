"""Update kernels for the active HiFT group: the torch reference and fused Triton kernels.

``apply_update`` is the one entry point the optimizer calls. It receives per-parameter lists
(views) and, when the caller holds the group in contiguous buffers, the same data as flat
1-D tensors so a fused kernel can update the whole group in one launch.
"""
from __future__ import annotations

import importlib.util
import logging
import os
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
        if on_cuda and importlib.util.find_spec("triton") is None:
            logging.getLogger(__name__).warning("kernel='auto': triton is not installed, using the torch "
                                                "optimizer path (pip install triton for the fused kernels)")
            return "torch"
        return "triton" if on_cuda else "torch"
    if importlib.util.find_spec("triton") is None:
        raise ValueError("kernel='triton' needs the triton package: pip install triton (or use kernel='auto')")
    if not on_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("kernel='triton' needs a CUDA device (or TRITON_INTERPRET=1 for testing on CPU); "
                         "use kernel='auto' or 'torch' on this machine")
    return "triton"


def apply_update(name: str, hyper: dict, params: Sequence[Tensor], grads: Sequence[Tensor],
                 state: dict[str, Sequence[Tensor]], steps: Sequence[int], *, backend: str = "torch",
                 flat: dict[str, Tensor] | None = None, inv_scale: float = 1.0,
                 model_params: Sequence[Tensor] | None = None) -> None:
    """Update the fp32 masters ``params`` in place with optimizer ``name`` on the chosen backend.

    ``flat`` (optional) holds the same group as contiguous 1-D buffers ("param", "grad", one per
    state kind, optionally "model"); ``model_params`` (optional) are the model's weights that
    receive the new masters cast to their dtype.
    """
    if backend == "torch":
        reference.update(name, hyper, params, grads, state, steps, inv_scale=inv_scale)
        if model_params is not None:
            for m, p in zip(model_params, params):
                m.copy_(p)
        elif flat is not None and "model" in flat:
            flat["model"].copy_(flat["param"])
        return
    if backend == "triton":
        _triton_update(name, hyper, params, grads, state, steps, flat, inv_scale, model_params)
        return
    raise ValueError(f"backend {backend!r} is not available")


def _triton_update(name: str, hyper: dict, params: Sequence[Tensor], grads: Sequence[Tensor],
                   state: dict[str, Sequence[Tensor]], steps: Sequence[int], flat: dict[str, Tensor] | None,
                   inv_scale: float, model_params: Sequence[Tensor] | None) -> None:
    if name not in DEFAULTS:
        raise ValueError(f"unknown optimizer {name!r}; expected one of {sorted(DEFAULTS)}")
    # Imported here so that importing hift_ds.kernels neither needs triton nor pays for it.
    from .adagrad import adagrad_update
    from .adamw import adam_update
    from .sgd import sgd_update

    hyper = {**DEFAULTS[name], **hyper}
    if flat is not None and not _flat_covers(flat, params, steps):
        # Per-parameter step counts (or lists that are not the whole buffer): multi-tensor path.
        if model_params is None and "model" in flat:
            model_params = _views_like(flat["model"], flat["param"], params)
        flat = None
    copy_after = None
    if flat is not None and "model" not in flat and model_params is not None:
        copy_after, model_params = model_params, None
    kw = dict(inv_scale=inv_scale, flat=flat, model=model_params)
    if name in ("adamw", "adam"):
        adam_update(hyper, params, grads, state, steps, decoupled=name == "adamw", **kw)
    elif name == "sgd":
        sgd_update(hyper, params, grads, state, steps, **kw)
    else:
        adagrad_update(hyper, params, grads, state, steps, **kw)
    if copy_after is not None:
        for m, p in zip(copy_after, params):
            m.copy_(p)


def _flat_covers(flat: dict[str, Tensor], params: Sequence[Tensor], steps: Sequence[int]) -> bool:
    """True when one flat launch is exact: equal step counts and the lists tile the whole buffer."""
    return len(set(steps)) <= 1 and sum(p.numel() for p in params) == flat["param"].numel()


def _views_like(model: Tensor, master: Tensor, params: Sequence[Tensor]) -> list[Tensor]:
    """The slices of the flat ``model`` that sit where each of ``params`` sits in the flat ``master``."""
    out = []
    base, size = master.data_ptr(), master.element_size()
    for p in params:
        off = (p.data_ptr() - base) // size
        if p.numel() and not (0 <= off and off + p.numel() <= master.numel()):
            raise ValueError("params are not views into flat['param']")
        out.append(model[off:off + p.numel()].view_as(p) if p.numel() else model[:0].view_as(p))
    return out


def has_inf_or_nan_flat(grad: Tensor, backend: str = "auto") -> bool:
    """True when the flat gradient buffer ``grad`` holds an inf or a nan (fp16 overflow)."""
    if grad.numel() == 0:
        return False
    if backend == "triton" or (backend == "auto" and grad.is_cuda and _triton_available()):
        from ._common import nonfinite_triton
        return nonfinite_triton(grad.contiguous())
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not one of {BACKENDS}")
    return not bool(torch.isfinite(grad).all())


def _triton_available() -> bool:
    import importlib.util
    return importlib.util.find_spec("triton") is not None


__all__ = ["apply_update", "resolve_backend", "state_kinds", "has_inf_or_nan", "has_inf_or_nan_flat", "DEFAULTS",
           "BACKENDS"]
