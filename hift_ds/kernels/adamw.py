"""Fused Triton AdamW / Adam update of one HiFT group (spec: ``reference.adam_``).

One pass reads param, grad, exp_avg, exp_avg_sq (and max_exp_avg_sq with amsgrad) and writes
them back plus, optionally, the new master cast to the model's dtype: grad unscaling, weight
decay, both moments, bias correction and the cast happen in registers.
"""
from __future__ import annotations

import math
from typing import Sequence

import triton
import triton.language as tl
from torch import Tensor

from ._common import (block_size, check_device, flat_plans, launch_options, load_grad, multi_plans, operand,
                      program_chunk, store_model)


@triton.jit
def _adam_kernel(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, out_ptr, n, tab_ptr, sc_ptr, P, T,
                 decay, wd, w1, beta2, omb2, eps, step_size, bc2_sqrt, inv_scale,
                 DECOUPLED: tl.constexpr, HAS_WD: tl.constexpr, LERP_LOW: tl.constexpr,
                 AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, OUT_KIND: tl.constexpr, OUT_ROW: tl.constexpr,
                 MULTI: tl.constexpr, WIDE: tl.constexpr, BLOCK: tl.constexpr):
    t, offs, mask = program_chunk(tab_ptr, n, P, MULTI, WIDE, BLOCK)
    if MULTI:
        base = 2 * P + T
        p_ptr = operand(tab_ptr, 0, base, T, t, p_ptr)
        g_ptr = operand(tab_ptr, 1, base, T, t, g_ptr)
        m_ptr = operand(tab_ptr, 2, base, T, t, m_ptr)
        v_ptr = operand(tab_ptr, 3, base, T, t, v_ptr)
        if AMSGRAD:
            vmax_ptr = operand(tab_ptr, 4, base, T, t, vmax_ptr)
        if OUT_KIND != 0:
            out_ptr = operand(tab_ptr, OUT_ROW, base, T, t, out_ptr)
        # Per-tensor bias corrections: each parameter keeps its own step count.
        step_size = tl.load(sc_ptr + t)
        bc2_sqrt = tl.load(sc_ptr + T + t)

    p = tl.load(p_ptr + offs, mask=mask, other=0.0)
    g = load_grad(g_ptr, offs, mask, inv_scale, MAXIMIZE)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0)
    if HAS_WD:
        if DECOUPLED:
            p = p * decay
        else:
            g = g + wd * p
    # torch's lerp switches formula at weight 0.5 to stay exact at weight 1.
    if LERP_LOW:
        m = m + w1 * (g - m)
    else:
        m = g - (g - m) * (1.0 - w1)
    v = v * beta2 + (omb2 * g) * g
    if AMSGRAD:
        vmax = tl.load(vmax_ptr + offs, mask=mask, other=0.0)
        vmax = tl.maximum(vmax, v, propagate_nan=tl.PropagateNan.ALL)
        tl.store(vmax_ptr + offs, vmax, mask=mask)
        denom = tl.div_rn(tl.sqrt_rn(vmax), bc2_sqrt) + eps
    else:
        denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    p = p + step_size * tl.div_rn(m, denom)

    tl.store(p_ptr + offs, p, mask=mask)
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)
    if OUT_KIND != 0:
        store_model(out_ptr, offs, mask, p, OUT_KIND)


def adam_update(hyper: dict, params: Sequence[Tensor], grads: Sequence[Tensor], state: dict[str, Sequence[Tensor]],
                steps: Sequence[int], *, decoupled: bool = True, inv_scale: float = 1.0,
                flat: dict[str, Tensor] | None = None, model: Sequence[Tensor] | None = None,
                block: int | None = None) -> None:
    """AdamW (decoupled) or Adam (L2) update of one group: one launch over ``flat``, else multi-tensor."""
    lr, (beta1, beta2), eps, wd = hyper["lr"], tuple(hyper["betas"]), hyper["eps"], hyper["weight_decay"]
    amsgrad, maximize = bool(hyper.get("amsgrad", False)), bool(hyper.get("maximize", False))
    kinds = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if amsgrad else [])
    block = block_size(block)

    def per_step(t: int) -> tuple[float, float]:
        # Same double-precision scalars as the reference, rounded to fp32 once at the launch.
        return -lr / (1.0 - beta1 ** t), math.sqrt(1.0 - beta2 ** t)

    if flat is not None:
        plans = flat_plans([flat["param"], flat["grad"], *(flat[k] for k in kinds)], flat.get("model"), block)
        step_size, bc2_sqrt = per_step(steps[0]) if plans else (0.0, 1.0)
    else:
        per = [per_step(t) for t in steps]
        plans = multi_plans([params, grads, *(state[k] for k in kinds)], model,
                            [[s for s, _ in per], [b for _, b in per]], block)
        step_size, bc2_sqrt = 0.0, 1.0
    for plan in plans:
        ops = plan.operands
        p = ops[0]
        check_device(p)
        vmax = ops[4] if amsgrad else p
        out = ops[-1] if plan.out_kind else p
        _adam_kernel[plan.grid](
            p, ops[1], ops[2], ops[3], vmax, out, plan.n,
            plan.tab if plan.multi else p, plan.scalars if plan.multi else p, plan.P, plan.T,
            1.0 - lr * wd, wd, 1.0 - beta1, beta2, 1.0 - beta2, eps, step_size, bc2_sqrt, inv_scale,
            DECOUPLED=decoupled, HAS_WD=wd != 0.0, LERP_LOW=(1.0 - beta1) < 0.5, AMSGRAD=amsgrad,
            MAXIMIZE=maximize, OUT_KIND=plan.out_kind, OUT_ROW=len(ops) - 1, MULTI=plan.multi, WIDE=plan.wide,
            BLOCK=plan.block, **launch_options(plan.block))
