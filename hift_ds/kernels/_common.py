"""Shared pieces of the Triton update kernels: block size, launch plans, the model-dtype cast.

Imported only from the Triton branch of ``hift_ds.kernels`` (it imports triton at the top).

A launch plan covers two layouts with one kernel per optimizer:

* flat: the group lives in contiguous 1-D buffers; program ``pid`` updates
  ``[pid * BLOCK, (pid + 1) * BLOCK)`` of each buffer and the per-group scalars are kernel args.
* multi-tensor: separate tensors; an int64 table lists, per program, the tensor index and the
  chunk start, and per tensor its length and the address of each operand (param, grad, states,
  model), plus an fp32 table of per-tensor scalars (bias corrections differ per tensor when the
  parameters' step counts differ). One launch covers every tensor that shares the dtypes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

INTERPRET_BLOCK = 65536  # the interpreter runs one numpy op per block: big blocks are much faster
GPU_BLOCK = 2048

# How the new master is written into the model's weight (the OUT_KIND constexpr).
OUT_NONE, OUT_BF16_BITS, OUT_FP16, OUT_FP32 = 0, 1, 2, 3


def interpreting() -> bool:
    """True when Triton runs kernels with its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def block_size(block: int | None = None) -> int:
    """Elements per program: the argument, else $HIFT_TRITON_BLOCK, else a device default."""
    if block is None:
        env = os.environ.get("HIFT_TRITON_BLOCK")
        block = int(env) if env else (INTERPRET_BLOCK if interpreting() else GPU_BLOCK)
    if block < 16 or block & (block - 1):
        raise ValueError(f"Triton block size must be a power of two >= 16, got {block}")
    return block


def launch_options(block: int) -> dict:
    """Compile options for an elementwise kernel of this block size."""
    # No FMA contraction: each multiply and add rounds like the reference's separate torch ops,
    # at no cost in a memory-bound kernel (and Triton 3.9 warns when the choice is left implicit).
    return {"num_warps": 4 if block <= 1024 else 8, "enable_fp_fusion": False}


def check_device(t: Tensor) -> None:
    """Raise a clear error where a Triton launch on ``t`` cannot run."""
    if t.device.type != "cuda" and not interpreting():
        raise ValueError(f"backend='triton' got {t.device.type} tensors: it needs CUDA tensors "
                         "(or TRITON_INTERPRET=1 for testing on CPU); use backend='torch'")


def out_operand(model: Tensor) -> tuple[Tensor, int]:
    """The tensor the kernel stores the model weight through, and its OUT_KIND."""
    if model.dtype == torch.bfloat16:
        # Stored as raw bits: the kernel rounds to nearest-even itself (the interpreter's cast truncates).
        return model.view(torch.int16), OUT_BF16_BITS
    if model.dtype == torch.float16:
        return model, OUT_FP16
    if model.dtype == torch.float32:
        return model, OUT_FP32
    raise TypeError(f"model weights must be bf16, fp16 or fp32, got {model.dtype}")


@triton.jit
def store_model(out_ptr, offs, mask, x, OUT_KIND: tl.constexpr):
    """Store the fp32 master ``x`` into the model weight in its dtype, rounding to nearest even."""
    if OUT_KIND == 1:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        # nan stays a (quiet) nan; the rounding add above could turn it into inf.
        rounded = tl.where(x != x, (bits >> 16) | 0x40, rounded)
        tl.store(out_ptr + offs, rounded.to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)
    elif OUT_KIND == 2:
        tl.store(out_ptr + offs, x.to(tl.float16), mask=mask)
    elif OUT_KIND == 3:
        tl.store(out_ptr + offs, x, mask=mask)


@triton.jit
def program_chunk(tab_ptr, n, P, MULTI: tl.constexpr, WIDE: tl.constexpr, BLOCK: tl.constexpr):
    """This program's tensor index (multi-tensor; 0 for flat), element offsets and their mask."""
    pid = tl.program_id(0)
    if MULTI:
        t = tl.load(tab_ptr + pid)
        start = tl.load(tab_ptr + P + pid)
        n = tl.load(tab_ptr + 2 * P + t)
    else:
        t = 0
        if WIDE:  # more than 2^31 elements: offsets in int64
            pid = pid.to(tl.int64)
        start = pid * BLOCK
    offs = start + tl.arange(0, BLOCK)
    return t, offs, offs < n


@triton.jit
def load_grad(g_ptr, offs, mask, inv_scale, MAXIMIZE: tl.constexpr):
    """The gradient in fp32, unscaled (1/loss scale), negated when maximizing."""
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32) * inv_scale
    if MAXIMIZE:
        g = -g
    return g


@triton.jit
def operand(tab_ptr, row, base, T, t, like):
    """Pointer to operand ``row`` of tensor ``t`` in a multi-tensor table, typed like ``like``."""
    return tl.load(tab_ptr + base + row * T + t).to(like.dtype)


@dataclass
class Plan:
    """One kernel launch: operand tensors (flat buffers or dtype witnesses) and, if multi, tables."""

    operands: list[Tensor]
    grid: tuple[int]
    n: int = 0
    multi: bool = False
    tab: Tensor | None = None
    scalars: Tensor | None = None
    P: int = 0
    T: int = 0
    wide: bool = False
    out_kind: int = OUT_NONE
    block: int = 0


def _check_fp32(tensors: Sequence[Tensor]) -> None:
    # Masters and states are fp32 by contract; only the grad (operand 1) may be bf16/fp16.
    for k, t in enumerate(tensors):
        if k != 1 and t.dtype != torch.float32:
            raise TypeError(f"Triton update needs fp32 params and states, got {t.dtype} (operand {k})")


def flat_plans(operands: Sequence[Tensor], model: Tensor | None, block: int) -> list[Plan]:
    """Launches for contiguous 1-D buffers of equal length (none when they are empty)."""
    _check_fp32(operands)
    n = operands[0].numel()
    for t in list(operands) + ([model] if model is not None else []):
        if t.numel() != n or not t.is_contiguous():
            raise ValueError("flat buffers must be contiguous and of the same length")
    if n == 0:
        return []
    ops, kind = list(operands), OUT_NONE
    if model is not None:
        out, kind = out_operand(model)
        ops.append(out)
    # Triton vectorises the masked loads only when it can prove n is a multiple of 16: a ragged
    # group runs as a body of 16k elements plus a tail of under 16 (sliced buffers, still aligned).
    body = n - n % 16
    parts = [(0, n)] if body in (0, n) else [(0, body), (body, n)]
    return [Plan(ops if lo == 0 else [t[lo:] for t in ops], (triton.cdiv(hi - lo, block),), n=hi - lo,
                 wide=hi - lo + block >= 2**31, out_kind=kind, block=block) for lo, hi in parts]


def multi_plans(lists: Sequence[Sequence[Tensor]], model: Sequence[Tensor] | None,
                scalars: Sequence[Sequence[float]], block: int) -> list[Plan]:
    """Plans for separate tensors: one launch per distinct dtype combination, empty tensors skipped.

    ``lists[k][i]`` is operand k of tensor i; ``scalars[j][i]`` is per-tensor scalar j of tensor i.
    """
    count = len(lists[0])
    for i in range(count):
        for k in range(len(lists)):
            if not lists[k][i].is_contiguous():
                raise ValueError("multi-tensor update needs contiguous tensors")
            if lists[k][i].numel() != lists[0][i].numel():
                raise ValueError("param, grad and state tensors must have matching sizes")
        if model is not None and model[i].numel() != lists[0][i].numel():
            raise ValueError("model_params must match params in size")
    groups: dict[tuple, list[int]] = {}
    for i in range(count):
        if lists[0][i].numel() == 0:
            continue
        key = tuple(lst[i].dtype for lst in lists) + ((model[i].dtype,) if model is not None else ())
        groups.setdefault(key, []).append(i)
    plans = []
    for idx in groups.values():
        rows = [[lst[i] for i in idx] for lst in lists]
        _check_fp32([row[0] for row in rows])
        kind = OUT_NONE
        if model is not None:
            outs = [out_operand(model[i]) for i in idx]
            rows.append([o for o, _ in outs])
            kind = outs[0][1]
        numel = torch.tensor([rows[0][j].numel() for j in range(len(idx))], dtype=torch.int64)
        chunks = (numel + block - 1) // block
        owner = torch.repeat_interleave(torch.arange(len(idx)), chunks)
        first_chunk = torch.cumsum(chunks, 0) - chunks
        starts = (torch.arange(owner.numel()) - first_chunk[owner]) * block
        addrs = torch.tensor([[t.data_ptr() for t in row] for row in rows], dtype=torch.int64).flatten()
        device = lists[0][idx[0]].device
        tab = torch.cat([owner, starts, numel, addrs]).to(device, non_blocking=True)
        sc = torch.tensor([[s[i] for i in idx] for s in scalars] or [[0.0]], dtype=torch.float32)
        plans.append(Plan([row[0] for row in rows], (owner.numel(),), multi=True, tab=tab,
                          scalars=sc.flatten().to(device, non_blocking=True), P=owner.numel(), T=len(idx),
                          out_kind=kind, block=block))
    return plans


@triton.jit
def _nonfinite_kernel(x_ptr, flag_ptr, n, BLOCK: tl.constexpr, WIDE: tl.constexpr):
    pid = tl.program_id(0)
    if WIDE:
        pid = pid.to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    # nan fails every comparison, so "not |x| <= max" catches both nan and inf. Only the lanes
    # holding one store (the same 1, to one flag): no reduction, no write in the common case.
    # Not tl.max: it is a jit function of triton's own, which the interpreter cannot run when
    # triton was imported before TRITON_INTERPRET was set (torch._dynamo imports it early).
    bad = (tl.abs(x) <= 3.4028234663852886e38) == 0
    tl.store(flag_ptr + offs * 0, bad.to(tl.int32), mask=mask & bad)


def nonfinite_triton(x: Tensor, block: int | None = None) -> bool:
    """True when the contiguous tensor ``x`` holds an inf or a nan (one Triton pass, one sync)."""
    n = x.numel()
    if n == 0:
        return False
    check_device(x)
    block = block_size(block)
    flag = torch.zeros(1, dtype=torch.int32, device=x.device)
    _nonfinite_kernel[(triton.cdiv(n, block),)](x.reshape(-1), flag, n, BLOCK=block, WIDE=n + block >= 2**31,
                                                 **launch_options(block))
    return bool(flag.item())
