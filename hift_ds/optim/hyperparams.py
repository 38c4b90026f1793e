"""The optimizer a HiFT run uses: a built-in name or a torch class, its validated options, and where its state lives."""
from __future__ import annotations

import math
import numbers
from collections.abc import Iterable

import torch

from hift_ds import kernels

OFFLOAD_DEVICES = ("auto", "none", "cpu")

_BUILTIN_CLASSES = {torch.optim.AdamW: "adamw", torch.optim.Adam: "adam", torch.optim.SGD: "sgd",
                    torch.optim.Adagrad: "adagrad"}


def resolve_optimizer(optimizer: str | type) -> tuple[str | None, type | None]:
    """(built-in name or None, torch class or None) for a name or a ``torch.optim.Optimizer`` subclass."""
    if isinstance(optimizer, str):
        name = optimizer.lower()
        if name not in kernels.DEFAULTS:
            raise ValueError(f"unknown optimizer {optimizer!r}; use one of {sorted(kernels.DEFAULTS)} "
                             "or pass a torch.optim.Optimizer subclass")
        return name, None
    if isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer):
        return _BUILTIN_CLASSES.get(optimizer), optimizer
    raise TypeError(f"optimizer must be a name or a torch.optim.Optimizer subclass, got {optimizer!r}")


def _number(v) -> float | None:
    # What torch.optim accepts: Python and numpy scalars, 0-d tensors; None for anything else.
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        v = v.item()
    if isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v):
        return float(v)
    return None


def builtin_hyper(name: str, kwargs: dict) -> dict:
    """The built-in optimizer's defaults updated with ``kwargs``, each value checked."""
    defaults = kernels.DEFAULTS[name]
    unknown = sorted(set(kwargs) - set(defaults))
    if unknown:
        raise TypeError(f"unknown {name} option(s) {unknown}; valid options: {sorted(defaults)}")
    hyper = {**defaults, **kwargs}
    for key, value in hyper.items():
        if key == "betas":
            betas = [_number(b) for b in value] if isinstance(value, Iterable) and not isinstance(value, str) else []
            if len(betas) != 2 or not all(b is not None and 0 <= b < 1 for b in betas):
                raise ValueError(f"{name} betas must be two numbers in [0, 1), got {value!r}")
            hyper["betas"] = tuple(betas)
        elif isinstance(defaults[key], bool):
            if not isinstance(value, bool):
                raise ValueError(f"{name} {key} must be true or false, got {value!r}")
        else:
            number = _number(value)
            if number is None or number < 0:
                raise ValueError(f"{name} {key} must be a finite number >= 0, got {value!r}")
            hyper[key] = number
    if name == "sgd" and hyper["nesterov"] and (hyper["momentum"] <= 0 or hyper["dampening"] != 0):
        raise ValueError("sgd nesterov=True needs momentum > 0 and dampening == 0")
    return hyper


def inner_optimizer(cls: type, groups: list[list[torch.nn.Parameter]], kwargs: dict, sharding, *, offload: str,
                    keeps_masters: bool) -> torch.optim.Optimizer:
    """A torch optimizer class run over the HiFT groups (one param group each): fp32, resident, unsharded."""
    if offload != "none" or keeps_masters:
        raise ValueError(f"offload and bf16/fp16 masters need a built-in optimizer ({sorted(kernels.DEFAULTS)}); "
                         f"{cls.__name__} runs only in fp32 with offload 'none'")
    sharding.bind(groups, flat=False, keeps_masters=False)
    return cls([{"params": ps, "hift_group": i} for i, ps in enumerate(groups)], **kwargs)


def resolve_offload(offload: str, device: torch.device, builtin: bool) -> str:
    """The offload device ``"auto"`` stands for: "cpu" for a built-in optimizer on CUDA, else "none"."""
    if offload not in OFFLOAD_DEVICES:
        raise ValueError(f"offload device {offload!r} is not one of {OFFLOAD_DEVICES}")
    if offload != "auto":
        return offload
    # Offload saves device memory only where the model is on an accelerator; on a CPU it would
    # just copy between two host buffers. Optimizers other than the built-ins cannot offload.
    return "cpu" if torch.device(device).type == "cuda" and builtin else "none"
