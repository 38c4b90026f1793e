"""ZeRO-1/2 for HiFT: the active group's gradients reduce-scattered, its masters/state sharded.

Each group's flat buffer is padded to a multiple of the data-parallel world size N; rank r owns
elements [r*s, (r+1)*s) with s = padded/N of every group, and its store holds only that shard.
Per optimizer step (DESIGN §2) the traffic of rank-local buffers is:

    reduce_scatter  padded_numel(active group) * grad element size
    all_gather      padded_numel(active group) * weight element size
    all_reduce      4 bytes (fp16 overflow flag, with a loss scaler) + 4 bytes (norm², with clipping)

and frozen groups are never communicated. ``Collectives.bytes`` counts exactly these.
"""
from __future__ import annotations

import collections

import torch
from torch import Tensor


def _backend():
    try:
        import deepspeed.comm as dscomm
        if dscomm.is_initialized():
            return dscomm
    except ImportError:  # standalone use without DeepSpeed
        pass
    import torch.distributed as tdist
    return tdist if tdist.is_available() and tdist.is_initialized() else None


class Collectives:
    """The few collectives HiFT's sharding needs, with a byte count per operation."""

    def __init__(self, group=None):
        self.dist = _backend()
        self.group = group
        self.world = self.dist.get_world_size(group=group) if self.dist else 1
        self.rank = self.dist.get_rank(group=group) if self.dist else 0
        self.bytes: collections.Counter[str] = collections.Counter()

    def reduce_scatter(self, out: Tensor, inp: Tensor) -> None:
        """``out`` = this rank's 1/N slice of the sum of ``inp`` over ranks."""
        if self.world == 1:
            out.copy_(inp)
            return
        self.bytes["reduce_scatter"] += inp.numel() * inp.element_size()
        self.dist.reduce_scatter_tensor(out, inp, group=self.group)

    def all_gather(self, out: Tensor, inp: Tensor) -> None:
        """``out`` = every rank's ``inp`` concatenated in rank order (``inp`` may be a slice of ``out``)."""
        if self.world == 1:
            if inp.data_ptr() != out.data_ptr():
                out.copy_(inp)
            return
        self.bytes["all_gather"] += out.numel() * out.element_size()
        self.dist.all_gather_into_tensor(out, inp.clone() if _overlaps(out, inp) else inp, group=self.group)

    def all_reduce(self, t: Tensor, op: str = "sum") -> None:
        """In-place sum or max of ``t`` over ranks."""
        if self.world == 1:
            return
        self.bytes["all_reduce"] += t.numel() * t.element_size()
        ops = self.dist.ReduceOp
        self.dist.all_reduce(t, op=ops.MAX if op == "max" else ops.SUM, group=self.group)


def _overlaps(a: Tensor, b: Tensor) -> bool:
    # gloo rejects an input that aliases the output; NCCL would accept it, a clone is cheap enough
    # (one shard) and keeps one code path.
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def padded(n: int, world: int) -> int:
    """``n`` rounded up to a multiple of ``world``."""
    return -(-n // world) * world


def shard_slice(n: int, world: int, rank: int) -> slice:
    """This rank's slice of a group buffer of ``n`` elements (padded to a multiple of ``world``)."""
    s = padded(n, world) // world
    return slice(rank * s, (rank + 1) * s)


def gather_full(comm: Collectives, shard: Tensor, n: int, device: torch.device) -> Tensor:
    """A group's full (unpadded, CPU) buffer assembled from every rank's ``shard``."""
    full = torch.empty(shard.numel() * comm.world, dtype=shard.dtype, device=device)
    comm.all_gather(full, shard.to(device))
    return full[:n].cpu()
