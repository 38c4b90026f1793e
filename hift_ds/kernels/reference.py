"""Plain-torch optimizer updates: the specification every fused kernel is tested against.

Every function updates fp32 master tensors in place, one list entry per parameter. ``steps``
holds each parameter's update number *including* this update (1 on its first update), so bias
correction follows the parameter's own count even when its group sat out many steps. Grads may
be any float dtype; they are read as fp32 and multiplied by ``inv_scale`` (1 / loss scale).
The formulas are those of ``torch.optim.AdamW``/``Adam``/``SGD``/``Adagrad`` (tested).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

ADAM_DEFAULTS = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, amsgrad=False, maximize=False)
SGD_DEFAULTS = dict(lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False)
ADAGRAD_DEFAULTS = dict(lr=1e-2, lr_decay=0.0, weight_decay=0.0, initial_accumulator_value=0.0, eps=1e-10,
                        maximize=False)
DEFAULTS = {"adamw": ADAM_DEFAULTS, "adam": {**ADAM_DEFAULTS, "weight_decay": 0.0}, "sgd": SGD_DEFAULTS,
            "adagrad": ADAGRAD_DEFAULTS}


def _with_defaults(name: str, hyper: dict) -> dict:
    # Hyper-parameters missing from ``hyper`` take torch.optim's defaults.
    if name not in DEFAULTS:
        raise ValueError(f"unknown optimizer {name!r}; expected one of {sorted(DEFAULTS)}")
    return {**DEFAULTS[name], **hyper}


def state_kinds(name: str, hyper: dict) -> dict[str, float]:
    """Per-parameter state buffers the named optimizer needs, mapped to their initial value."""
    hyper = _with_defaults(name, hyper)
    if name == "sgd":
        return {"momentum_buffer": 0.0} if hyper["momentum"] != 0.0 else {}
    if name == "adagrad":
        return {"sum": float(hyper["initial_accumulator_value"])}
    kinds = {"exp_avg": 0.0, "exp_avg_sq": 0.0}
    if hyper["amsgrad"]:
        kinds["max_exp_avg_sq"] = 0.0
    return kinds


def _grad(g: Tensor, inv_scale: float, maximize: bool) -> Tensor:
    g = g.float()
    if inv_scale != 1.0:
        g = g * inv_scale
    return -g if maximize else g


def adam_(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
          exp_avg_sqs: Sequence[Tensor], steps: Sequence[int], *, lr: float, betas: tuple[float, float],
          eps: float, weight_decay: float, decoupled: bool, amsgrad: bool,
          max_exp_avg_sqs: Sequence[Tensor] | None, maximize: bool, inv_scale: float) -> None:
    """AdamW (decoupled=True) or Adam with L2 penalty (decoupled=False), in place."""
    beta1, beta2 = betas
    for i, (p, g, m, v, t) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, steps)):
        g = _grad(g, inv_scale, maximize)
        if weight_decay != 0.0:
            if decoupled:
                p.mul_(1.0 - lr * weight_decay)
            else:
                g = g.add(p, alpha=weight_decay)
        m.lerp_(g, 1.0 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        bc1 = 1.0 - beta1 ** t
        bc2_sqrt = math.sqrt(1.0 - beta2 ** t)
        if amsgrad:
            vmax = max_exp_avg_sqs[i]
            torch.maximum(vmax, v, out=vmax)
            denom = (vmax.sqrt() / bc2_sqrt).add_(eps)
        else:
            denom = (v.sqrt() / bc2_sqrt).add_(eps)
        p.addcdiv_(m, denom, value=-lr / bc1)


def sgd_(params: Sequence[Tensor], grads: Sequence[Tensor], momentum_buffers: Sequence[Tensor] | None,
         steps: Sequence[int], *, lr: float, momentum: float, dampening: float, weight_decay: float,
         nesterov: bool, maximize: bool, inv_scale: float) -> None:
    """SGD with optional momentum, dampening, Nesterov and L2 weight decay, in place."""
    for i, (p, g, t) in enumerate(zip(params, grads, steps)):
        d = _grad(g, inv_scale, maximize)
        if weight_decay != 0.0:
            d = d.add(p, alpha=weight_decay)
        if momentum != 0.0:
            buf = momentum_buffers[i]
            if t == 1:  # torch starts the buffer at the first gradient, undamped
                buf.copy_(d)
            else:
                buf.mul_(momentum).add_(d, alpha=1.0 - dampening)
            d = d.add(buf, alpha=momentum) if nesterov else buf
        p.add_(d, alpha=-lr)


def adagrad_(params: Sequence[Tensor], grads: Sequence[Tensor], state_sums: Sequence[Tensor],
             steps: Sequence[int], *, lr: float, lr_decay: float, weight_decay: float, eps: float,
             maximize: bool, inv_scale: float) -> None:
    """AdaGrad with learning-rate decay and L2 weight decay, in place."""
    for p, g, s, t in zip(params, grads, state_sums, steps):
        g = _grad(g, inv_scale, maximize)
        if weight_decay != 0.0:
            g = g.add(p, alpha=weight_decay)
        clr = lr / (1.0 + (t - 1) * lr_decay)
        s.addcmul_(g, g)
        p.addcdiv_(g, s.sqrt().add_(eps), value=-clr)


def has_inf_or_nan(grads: Sequence[Tensor]) -> bool:
    """True when any gradient holds an inf or a nan (fp16 overflow)."""
    return any(not torch.isfinite(g).all() for g in grads if g.numel())


def update(name: str, hyper: dict, params: Sequence[Tensor], grads: Sequence[Tensor],
           state: dict[str, Sequence[Tensor]], steps: Sequence[int], inv_scale: float = 1.0) -> None:
    """Apply one update of optimizer ``name`` with hyper-parameters ``hyper`` (torch.optim names)."""
    h = _with_defaults(name, hyper)
    if name == "sgd":
        sgd_(params, grads, state.get("momentum_buffer"), steps, lr=h["lr"], momentum=h["momentum"],
             dampening=h["dampening"], weight_decay=h["weight_decay"], nesterov=h["nesterov"], maximize=h["maximize"],
             inv_scale=inv_scale)
    elif name == "adagrad":
        adagrad_(params, grads, state["sum"], steps, lr=h["lr"], lr_decay=h["lr_decay"], weight_decay=h["weight_decay"],
                 eps=h["eps"], maximize=h["maximize"], inv_scale=inv_scale)
    else:
        adam_(params, grads, state["exp_avg"], state["exp_avg_sq"], steps, lr=h["lr"], betas=tuple(h["betas"]),
              eps=h["eps"], weight_decay=h["weight_decay"], decoupled=name == "adamw", amsgrad=h["amsgrad"],
              max_exp_avg_sqs=state.get("max_exp_avg_sq"), maximize=h["maximize"], inv_scale=inv_scale)
