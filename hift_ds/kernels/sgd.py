"""Fused Triton SGD update of one HiFT group (spec: ``reference.sgd_``).

Momentum, dampening, Nesterov, L2 weight decay, maximize and grad unscaling in one pass, with
the optional cast of the new master into the model's weight.
"""
from __future__ import annotations

from typing import Sequence

import triton
import triton.language as tl
from torch import Tensor

from ._common import (block_size, check_device, flat_plans, launch_options, load_grad, multi_plans, operand,
                      program_chunk, store_model)


@triton.jit
def _sgd_kernel(p_ptr, g_ptr, buf_ptr, out_ptr, n, tab_ptr, sc_ptr, P, T,
                neg_lr, wd, momentum, one_m_damp, first, inv_scale,
                HAS_WD: tl.constexpr, MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr,
                OUT_KIND: tl.constexpr, OUT_ROW: tl.constexpr, MULTI: tl.constexpr, WIDE: tl.constexpr,
                BLOCK: tl.constexpr):
    t, offs, mask = program_chunk(tab_ptr, n, P, MULTI, WIDE, BLOCK)
    if MULTI:
        base = 2 * P + T
        p_ptr = operand(tab_ptr, 0, base, T, t, p_ptr)
        g_ptr = operand(tab_ptr, 1, base, T, t, g_ptr)
        if MOMENTUM:
            buf_ptr = operand(tab_ptr, 2, base, T, t, buf_ptr)
        if OUT_KIND != 0:
            out_ptr = operand(tab_ptr, OUT_ROW, base, T, t, out_ptr)
        first = tl.load(sc_ptr + t)  # 1.0 on the tensor's first update: its buffer starts at the grad

    p = tl.load(p_ptr + offs, mask=mask, other=0.0)
    d = load_grad(g_ptr, offs, mask, inv_scale, MAXIMIZE)
    if HAS_WD:
        d = d + wd * p
    if MOMENTUM:
        buf = tl.load(buf_ptr + offs, mask=mask, other=0.0)
        # where(), not a branch: on the first step the buffer's old contents are ignored, even a nan.
        buf = tl.where(first != 0.0, d, buf * momentum + one_m_damp * d)
        tl.store(buf_ptr + offs, buf, mask=mask)
        if NESTEROV:
            d = d + momentum * buf
        else:
            d = buf
    p = p + neg_lr * d

    tl.store(p_ptr + offs, p, mask=mask)
    if OUT_KIND != 0:
        store_model(out_ptr, offs, mask, p, OUT_KIND)


def sgd_update(hyper: dict, params: Sequence[Tensor], grads: Sequence[Tensor], state: dict[str, Sequence[Tensor]],
               steps: Sequence[int], *, inv_scale: float = 1.0, flat: dict[str, Tensor] | None = None,
               model: Sequence[Tensor] | None = None, block: int | None = None) -> None:
    """SGD update of one group: one launch over ``flat``, else a multi-tensor launch."""
    lr, momentum, dampening = hyper["lr"], hyper.get("momentum", 0.0), hyper.get("dampening", 0.0)
    wd, nesterov, maximize = hyper.get("weight_decay", 0.0), bool(hyper.get("nesterov", False)), \
        bool(hyper.get("maximize", False))
    kinds = ["momentum_buffer"] if momentum != 0.0 else []
    block = block_size(block)
    if flat is not None:
        plans = flat_plans([flat["param"], flat["grad"], *(flat[k] for k in kinds)], flat.get("model"), block)
        first = float(steps[0] == 1) if plans else 0.0
    else:
        plans = multi_plans([params, grads, *(state[k] for k in kinds)], model,
                            [[float(t == 1) for t in steps]], block)
        first = 0.0
    for plan in plans:
        ops = plan.operands
        p = ops[0]
        check_device(p)
        buf = ops[2] if kinds else p
        out = ops[-1] if plan.out_kind else p
        _sgd_kernel[plan.grid](
            p, ops[1], buf, out, plan.n, plan.tab if plan.multi else p, plan.scalars if plan.multi else p,
            plan.P, plan.T, -lr, wd, momentum, 1.0 - dampening, first, inv_scale,
            HAS_WD=wd != 0.0, MOMENTUM=bool(kinds), NESTEROV=nesterov, MAXIMIZE=maximize,
            OUT_KIND=plan.out_kind, OUT_ROW=len(ops) - 1, MULTI=plan.multi, WIDE=plan.wide, BLOCK=plan.block,
            **launch_options(plan.block))
