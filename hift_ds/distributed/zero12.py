"""ZeRO-1/2 for HiFT: the active group's gradients reduce-scattered, its masters/state sharded.

A group's flat buffer of n elements is cut into ``nb`` buckets of N chunks of c elements each
(padded to nb*N*c); rank r owns chunk r of every bucket, so its shard is nb*c elements and its
store holds only that. Stage 1 uses one bucket (rank r owns one contiguous 1/N slice); stage 2
uses buckets of about ``reduce_bucket_size`` elements and reduce-scatters each bucket as soon as
backward has produced all of its gradients, overlapping the rest of backward. Results equal
stage 0/1 up to the order in which a collective adds the ranks' values (bit-exact at 2 ranks).

Per optimizer step (docs/architecture.md, "Data parallel and ZeRO-1/2") the rank-local traffic is:

    reduce_scatter  padded_numel(active group) * grad element size
    all_gather      padded_numel(active group) * weight element size
    all_reduce      4 bytes (fp16 overflow flag, with a loss scaler) + 4 bytes (norm², with clipping)

and frozen groups are never communicated. ``Collectives.bytes`` counts exactly these.
"""
from __future__ import annotations

import collections

import torch
from torch import Tensor, nn

from hift_ds.optim.grads import FlatGrads, flatten_weights, hook_gradients
from hift_ds.optim.sharding import Sharding

# Stage 2 bucket size in elements when the config has no reduce_bucket_size: DeepSpeed's default
# (5e8) is sized for a whole model and would make one bucket of any HiFT group.
DEFAULT_BUCKET_NUMEL = 2 ** 24


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

    def reduce_scatter(self, out: Tensor, inp: Tensor, async_op: bool = False):
        """``out`` = this rank's 1/N slice of the sum of ``inp`` over ranks (a handle if ``async_op``)."""
        if self.world == 1:
            out.copy_(inp)
            return None
        self.bytes["reduce_scatter"] += inp.numel() * inp.element_size()
        return self.dist.reduce_scatter_tensor(out, inp, group=self.group, async_op=async_op)

    def all_gather(self, out: Tensor, inp: Tensor) -> None:
        """``out`` = every rank's ``inp`` concatenated in rank order (``inp`` may be a slice of ``out``)."""
        if self.world == 1:
            if inp.data_ptr() != out.data_ptr():
                out.copy_(inp)
            return
        self.bytes["all_gather"] += out.numel() * out.element_size()
        self.dist.all_gather_into_tensor(out, inp, group=self.group)

    def all_reduce(self, t: Tensor, op: str = "sum") -> None:
        """In-place sum or max of ``t`` over ranks."""
        if self.world == 1:
            return
        self.bytes["all_reduce"] += t.numel() * t.element_size()
        ops = self.dist.ReduceOp
        self.dist.all_reduce(t, op=ops.MAX if op == "max" else ops.SUM, group=self.group)


class ShardLayout:
    """Where rank ``rank`` of ``world`` finds its shard in a group's flat buffer of ``n`` elements."""

    def __init__(self, n: int, world: int, rank: int, bucket_numel: int | None = None):
        self.n, self.world, self.rank = n, world, rank
        self.buckets = max(1, -(-n // bucket_numel)) if bucket_numel else 1
        self.chunk = max(1, -(-n // (self.buckets * world)))
        self.padded = self.buckets * world * self.chunk
        self.shard_numel = self.buckets * self.chunk

    def bucket(self, b: int) -> slice:
        """Elements of bucket ``b`` in the (padded) group buffer."""
        span = self.world * self.chunk
        return slice(b * span, (b + 1) * span)

    def shard_chunk(self, b: int) -> slice:
        """Elements of bucket ``b``'s chunk in this rank's shard."""
        return slice(b * self.chunk, (b + 1) * self.chunk)

    def shard_view(self, full: Tensor) -> Tensor:
        """This rank's chunks of the padded group buffer ``full``, as a (buckets, chunk) view."""
        return full[:self.padded].view(self.buckets, self.world, self.chunk)[:, self.rank]

    def shard_of(self, full: Tensor) -> Tensor:
        """This rank's shard (a contiguous copy) of a group buffer, unpadded or padded."""
        flat = full.reshape(-1)
        return self.shard_view(torch.nn.functional.pad(flat, (0, self.padded - flat.numel()))).reshape(-1)

    def gather_full(self, comm: Collectives, shard: Tensor, device: torch.device) -> Tensor:
        """The group's whole (unpadded, CPU) buffer assembled from every rank's ``shard``."""
        every = torch.empty(self.world * self.shard_numel, dtype=shard.dtype, device=device)
        comm.all_gather(every, shard.to(device))
        full = every.view(self.world, self.buckets, self.chunk).transpose(0, 1).reshape(-1)
        return full[:self.n].cpu()


class GradReducer:
    """Reduce-scatters the active group's gradients bucket by bucket; in backward when armed (stage 2)."""

    def __init__(self, comm: Collectives, groups: list[list[torch.nn.Parameter]], layouts: list[ShardLayout],
                 grad_buf: Tensor, grad_shard: Tensor):
        self.comm, self.layouts, self.grad_buf, self.grad_shard = comm, layouts, grad_buf, grad_shard
        self.buckets_of: list[dict[int, list[int]]] = []  # per group: id(param) -> buckets it overlaps
        self.members: list[list[int]] = []  # per group: parameters overlapping each bucket
        for params, lay in zip(groups, layouts):
            of, members, off = {}, [0] * lay.buckets, 0
            span = lay.world * lay.chunk
            for p in params:
                of[id(p)] = list(range(off // span, (off + p.numel() - 1) // span + 1)) if p.numel() else []
                for b in of[id(p)]:
                    members[b] += 1
                off += p.numel()
            self.buckets_of.append(of)
            self.members.append(members)
        self.group: int | None = None  # armed: reducing this group's buckets as backward fills them
        self.handles: list = []
        self.remaining: list[int] = []
        self.launched: list[bool] = []

    @property
    def armed(self) -> bool:
        """Whether the current backward's gradients are being reduced as they are produced."""
        return self.group is not None

    def arm(self, g: int) -> None:
        """Reduce group ``g``'s buckets as the coming backward completes them."""
        self.wait()
        self.group = g
        self.remaining = list(self.members[g])
        self.launched = [False] * len(self.members[g])

    def on_grad(self, p: torch.nn.Parameter) -> None:
        """``p``'s gradient is final for this backward: start every bucket it was the last one of."""
        for b in self.buckets_of[self.group].get(id(p), ()):
            self.remaining[b] -= 1
            if self.remaining[b] == 0 and not self.launched[b]:
                self._launch(b)

    def _launch(self, b: int) -> None:
        lay = self.layouts[self.group]
        out, inp = self.grad_shard[lay.shard_chunk(b)], self.grad_buf[lay.bucket(b)]
        self.handles.append(self.comm.reduce_scatter(out, inp, async_op=True))
        self.launched[b] = True

    def finish(self, g: int) -> Tensor:
        """Reduce what backward did not (all of it when not armed), wait; this rank's summed shard."""
        if self.group != g:
            self.arm(g)
        for b, done in enumerate(self.launched):
            if not done:
                self._launch(b)
        self.wait()
        self.group = None
        return self.grad_shard[:self.layouts[g].shard_numel]

    def wait(self) -> None:
        """Block until every started reduction is complete."""
        for h in self.handles:
            if h is not None:
                h.wait()
        self.handles.clear()


class RankSharding(Sharding):
    """What every ZeRO stage shares: each rank keeps one shard of a group, reduced gradients, whole-group checkpoints.

    A subclass's ``bind`` sets ``layouts`` (per group: where this rank's shard sits), ``grad_buf_device``
    (the group's gradients before the reduce-scatter) and ``reducer``.
    """

    always_flat = True

    def __init__(self, group=None):
        self.comm = Collectives(group)
        self.world, self.rank = self.comm.world, self.comm.rank

    @property
    def store_numels(self) -> list[int]:
        """Elements of each group's shard on this rank."""
        return [lay.shard_numel for lay in self.layouts]

    def zero_grad(self, g: int, set_to_none: bool) -> None:
        """Wait for any reduction still reading the gradient buffer, then zero it."""
        self.reducer.wait()
        self.grad_buf_device.zero_()

    def all_reduce(self, t: Tensor, op: str) -> float:
        """``t`` summed or maxed over the ranks."""
        self.comm.all_reduce(t, op)
        return float(t)

    def split(self, g: int, flat: Tensor) -> list[Tensor]:
        """A shard is updated as one tensor."""
        return [flat]

    def checkpoint_state(self, home: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
        """Whole groups, unpadded, assembled from every rank's shard: a checkpoint resumes on any rank count."""
        return [{k: lay.gather_full(self.comm, buf, self.grad_buf_device.device) for k, buf in bufs.items()}
                for bufs, lay in zip(home, self.layouts)]

    def shard_of(self, g: int, full: Tensor) -> Tensor:
        """This rank's shard of a whole group buffer."""
        return self.layouts[g].shard_of(full.reshape(-1))


class Zero12Sharding(RankSharding):
    """ZeRO-1/2: each rank updates its 1/N of the active group's masters and state, then all-gathers the weights."""

    def __init__(self, stage: int, group=None, reduce_bucket_size: int = DEFAULT_BUCKET_NUMEL,
                 overlap_comm: bool = True):
        if stage not in (1, 2):
            raise ValueError(f"Zero12Sharding is ZeRO stage 1 or 2, got {stage!r}")
        super().__init__(group)
        self.stage = stage
        self.overlap = stage == 2 and overlap_comm  # stage 2: reduce buckets during backward
        self.bucket_numel = reduce_bucket_size if self.overlap else None

    def bind(self, groups: list[list[nn.Parameter]], flat: bool, keeps_masters: bool) -> None:
        """Pad each group's flat weights to whole shards; one gradient buffer, this rank's shard of it."""
        self.groups, self.keeps_masters = groups, keeps_masters
        self.layouts = [ShardLayout(sum(p.numel() for p in ps), self.world, self.rank, self.bucket_numel)
                        for ps in groups]
        self.weights_device = [flatten_weights(ps, lay.padded) for ps, lay in zip(groups, self.layouts)]
        like = groups[0][0]
        self.grads = FlatGrads(groups, max(lay.padded for lay in self.layouts), like.dtype, like.device)
        self.grad_buf_device = self.grads.buf_device
        shard = max(lay.shard_numel for lay in self.layouts)
        # This rank's summed gradient and updated weights, one shard of a group each.
        self.grad_shard_device = torch.zeros(shard, dtype=like.dtype, device=like.device)
        self.weight_shard_device = torch.zeros(shard, dtype=like.dtype, device=like.device)
        self.reducer = GradReducer(self.comm, groups, self.layouts, self.grads.buf_device, self.grad_shard_device)
        hook_gradients(self, [p for ps in groups for p in ps], Zero12Sharding._on_grad)

    def masters_from_model(self, g: int) -> Tensor:
        """This rank's shard of group ``g``'s weights, in fp32."""
        return self.layouts[g].shard_of(self.weights_device[g]).float()

    def _on_grad(self, p: nn.Parameter) -> None:
        # Post-accumulate hook: the parameter's gradient for this backward is complete.
        if self.reducer.armed:
            self.grads.adopt_one(p)
            self.reducer.on_grad(p)

    def arm(self, g: int, last_micro_batch: bool) -> None:
        """Stage 2: reduce the coming backward's gradients as produced (only on the last micro-batch)."""
        if self.overlap and last_micro_batch:
            self.reducer.arm(g)

    def gradient(self, g: int) -> tuple[Tensor, list[Tensor], int]:
        """This rank's shard of the gradient summed over the N ranks (stage 2: mostly in backward already), and N."""
        self.grads.adopt(g)
        flat = self.reducer.finish(g)
        return flat, [flat], self.world

    def update_weights(self, g: int) -> Tensor:
        """A scratch shard the update writes; in fp32 it first holds this rank's weights, which the update reads."""
        lay = self.layouts[g]
        weight = self.weight_shard_device[:lay.shard_numel]
        if not self.keeps_masters:
            weight.view(lay.buckets, lay.chunk).copy_(lay.shard_view(self.weights_device[g]))
        return weight

    def publish(self, g: int, weights: Tensor) -> None:
        """All-gather every rank's updated shard into the group's weights."""
        lay = self.layouts[g]
        for b in range(lay.buckets):
            self.comm.all_gather(self.weights_device[g][lay.bucket(b)], weights[lay.shard_chunk(b)])

    def memory_bytes(self) -> dict[str, int]:
        """As at stage 0, plus the scratch weight shard and the gradient shard."""
        out = super().memory_bytes()
        out["model_weights"] += _bytes(self.weight_shard_device)
        out["gradients"] += _bytes(self.grad_shard_device)
        return out


def _bytes(t: Tensor) -> int:
    return t.numel() * t.element_size()
