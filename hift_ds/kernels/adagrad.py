"""Fused Triton AdaGrad update of one HiFT group (spec: ``reference.adagrad_``).

Learning-rate decay by the parameter's own step count, L2 weight decay, eps, maximize and grad
unscaling in one pass, with the optional cast of the new master into the model's weight.
"""
from __future__ import annotations

from typing import Sequence

import triton
import triton.language as tl
from torch import Tensor

from ._common import (block_size, check_device, flat_plans, launch_options, load_grad, multi_plans, operand,
                      program_chunk, store_model)


@triton.jit
def _adagrad_kernel(p_ptr, g_ptr, s_ptr, out_ptr, n, tab_ptr, sc_ptr, P, T,
                    neg_clr, wd, eps, inv_scale,
                    HAS_WD: tl.constexpr, MAXIMIZE: tl.constexpr, OUT_KIND: tl.constexpr, OUT_ROW: tl.constexpr,
                    MULTI: tl.constexpr, WIDE: tl.constexpr, BLOCK: tl.constexpr):
    t, offs, mask = program_chunk(tab_ptr, n, P, MULTI, WIDE, BLOCK)
    if MULTI:
        base = 2 * P + T
        p_ptr = operand(tab_ptr, 0, base, T, t, p_ptr)
        g_ptr = operand(tab_ptr, 1, base, T, t, g_ptr)
        s_ptr = operand(tab_ptr, 2, base, T, t, s_ptr)
        if OUT_KIND != 0:
            out_ptr = operand(tab_ptr, OUT_ROW, base, T, t, out_ptr)
        neg_clr = tl.load(sc_ptr + t)  # the decayed learning rate follows each tensor's step count

    p = tl.load(p_ptr + offs, mask=mask, other=0.0)
    g = load_grad(g_ptr, offs, mask, inv_scale, MAXIMIZE)
    if HAS_WD:
        g = g + wd * p
    s = tl.load(s_ptr + offs, mask=mask, other=0.0)
    s = s + g * g
    p = p + neg_clr * tl.div_rn(g, tl.sqrt_rn(s) + eps)

    tl.store(p_ptr + offs, p, mask=mask)
    tl.store(s_ptr + offs, s, mask=mask)
    if OUT_KIND != 0:
        store_model(out_ptr, offs, mask, p, OUT_KIND)


def adagrad_update(hyper: dict, params: Sequence[Tensor], grads: Sequence[Tensor],
                   state: dict[str, Sequence[Tensor]], steps: Sequence[int], *, inv_scale: float = 1.0,
                   flat: dict[str, Tensor] | None = None, model: Sequence[Tensor] | None = None,
                   block: int | None = None) -> None:
    """AdaGrad update of one group: one launch over ``flat``, else a multi-tensor launch."""
    lr, lr_decay, wd = hyper["lr"], hyper.get("lr_decay", 0.0), hyper.get("weight_decay", 0.0)
    eps, maximize = hyper.get("eps", 1e-10), bool(hyper.get("maximize", False))
    block = block_size(block)

    def neg_clr(t: int) -> float:
        return -(lr / (1.0 + (t - 1) * lr_decay))

    if flat is not None:
        plans = flat_plans([flat["param"], flat["grad"], flat["sum"]], flat.get("model"), block)
        clr = neg_clr(steps[0]) if plans else 0.0
    else:
        plans = multi_plans([params, grads, state["sum"]], model, [[neg_clr(t) for t in steps]], block)
        clr = 0.0
    for plan in plans:
        ops = plan.operands
        p = ops[0]
        check_device(p)
        out = ops[-1] if plan.out_kind else p
        _adagrad_kernel[plan.grid](
            p, ops[1], ops[2], out, plan.n, plan.tab if plan.multi else p, plan.scalars if plan.multi else p,
            plan.P, plan.T, clr, wd, eps, inv_scale,
            HAS_WD=wd != 0.0, MAXIMIZE=maximize, OUT_KIND=plan.out_kind, OUT_ROW=len(ops) - 1,
            MULTI=plan.multi, WIDE=plan.wide, BLOCK=plan.block, **launch_options(plan.block))
