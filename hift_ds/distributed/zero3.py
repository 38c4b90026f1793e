"""ZeRO-3 for HiFT: DeepSpeed partitions the weights, HiFT updates this rank's partition of the active group.

DeepSpeed's own ZeRO-3 machinery partitions the model: ``deepspeed.zero.Init`` (or
``zero.Init(module=...)`` for a model built outside it) leaves every parameter with an empty
``.data`` and this rank's 1/N slice in ``param.ds_tensor``, and ``DeepSpeedZeRoOffload``'s module
hooks all-gather a module's weights before its forward and backward and release them afterwards.
DeepSpeed's ZeRO-3 *optimizer* is not used: it keeps an fp32 partition, gradient partition and
optimizer state of every trainable parameter and steps all of them, which is what HiFT avoids
(docs/architecture.md). ``Zero3Sharding`` takes its place in the HiFT optimizer:

- each group's partitions on this rank are flattened into one buffer (``param.ds_tensor`` become
  views into it, as DeepSpeed's stage-3 optimizer does), so the fused update writes the new 16-bit
  weights straight into DeepSpeed's partitions; frozen groups' partitions are never written;
- the fp32 masters and optimizer state of those partitions live per group in the HiFT store
  (offloaded and prefetched exactly as at stages 0-2);
- a post-accumulate-grad hook adds each active parameter's full gradient into a rank-major buffer
  of the group and frees ``param.grad``; at the step one reduce-scatter hands every rank the
  summed gradient of its own partitions;
- around the update, gathered weights (stale afterwards) are released and DeepSpeed's persistent
  parameters (small ones it never releases) re-gathered, as DeepSpeed's stage-3 optimizer does.

Layout of group g on rank r: DeepSpeed cuts a parameter of n elements into N partitions of
c = ceil(n / N) (the last one padded) and rank r holds elements [r*c, (r+1)*c); the shard is every
parameter's partition in group order (S = sum of c); the gradient buffer is (N, S), row r holding
rank r's partitions. Per step: reduce_scatter N*S gradient elements; nothing is all-gathered by
HiFT (DeepSpeed gathers each module's weights in the next forward, as it does every step).
"""
from __future__ import annotations

import itertools
import logging
import os
import weakref
from collections import OrderedDict
from typing import Any, Callable

import torch
from torch import Tensor, nn

from hift_ds import atomic
from hift_ds.distributed.zero12 import Collectives, GradReducer, RankSharding
from hift_ds.optim.grads import hook_gradients
from hift_ds.optim.store import MASTER
from hift_ds.precision import cast_parameters

logger = logging.getLogger(__name__)

WEIGHT = "weight"  # checkpoint entry of fp32 weights at stage 3 (bf16/fp16 runs restore them from the masters)
_FETCHER = "_hift_zero3_fetcher"  # the DeepSpeedZeRoOffload whose hooks are on a model


def is_partitioned(p: Tensor) -> bool:
    """Whether DeepSpeed's ZeRO-3 manages this parameter (zero.Init gave it ``ds_tensor``)."""
    return hasattr(p, "ds_id")


def check_zero3_config(zero: dict) -> None:
    """Reject ZeRO-3 settings HiFT cannot honour, naming the reason and what to use instead."""
    offload_param = zero.get("offload_param") or {}
    if zero.get("cpu_offload_param") or (offload_param.get("device") or "none") != "none":
        raise ValueError("zero_optimization.offload_param is not supported with HiFT at stage 3: HiFT writes every "
                         "update into this rank's 16-bit partition on the GPU, which offload_param would keep in "
                         "host memory or on NVMe. Keep the partition on the GPU (2/N bytes per parameter) and move "
                         'the fp32 masters and optimizer state off it with "hift": {"offload": {"device": "cpu"}}; '
                         "use more ranks to fit a larger model")
    if (zero.get("zero_hpz_partition_size") or 1) > 1:
        raise ValueError("zero_optimization.zero_hpz_partition_size > 1 (hpZ secondary partitions) is not supported "
                         "with HiFT at stage 3: the secondary copies would not see HiFT's updates; remove it")
    for key in ("zero_quantized_weights", "zero_quantized_nontrainable_weights", "zero_quantized_gradients"):
        if zero.get(key):
            raise ValueError(f"zero_optimization.{key} is not supported with HiFT at stage 3: HiFT rotates which "
                             "parameters are trainable and writes 16-bit partitions directly; remove it")


def partition_model(model: nn.Module, config: dict, dtype: torch.dtype, device: torch.device):
    """Partition ``model`` with DeepSpeed (unless zero.Init already did) and attach its gather/release hooks.

    A model built outside ``deepspeed.zero.Init`` is converted by ``zero.Init(module=model)``: that
    works whenever it was built at all (every rank then held the whole model in host memory once);
    only a model whose weights do not exist yet (meta tensors) cannot be, and gets an error. Returns
    DeepSpeed's ``DeepSpeedZeRoOffload``, whose module hooks fetch and release the weights.
    """
    import deepspeed
    from deepspeed.runtime.zero.config import get_zero_config
    from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload
    from deepspeed.utils.timer import NoopTimer

    meta = [n for n, t in itertools.chain(model.named_parameters(), model.named_buffers()) if t.device.type == "meta"]
    if meta:
        raise ValueError(f"the model has tensors on the meta device ({meta[:3]}...): ZeRO-3 must partition real "
                         "weights. Build it inside `with deepspeed.zero.Init(config_dict_or_path=ds_config):` (import "
                         "the model class before entering it), or load it with from_pretrained while a "
                         "transformers.integrations.HfDeepSpeedConfig(ds_config) object is alive")
    params = list(model.parameters())
    outside = [p for p in params if not is_partitioned(p)]
    if outside and len(outside) == len(params):
        logger.info("ZeRO-3: the model was built outside deepspeed.zero.Init; partitioning it now with "
                    "zero.Init(module=model) (each rank held the whole model in host memory until now)")
        cast_parameters(model, dtype)  # as at stages 0-2 (buffers keep theirs), on the host, before it moves
        deepspeed.zero.Init(module=model, config_dict_or_path=config, dtype=dtype)
    elif outside:  # parameters added after zero.Init (a new head): DeepSpeed converts them below
        for p in outside:
            p.data = p.data.to(dtype)
    wrong = sorted({str(p.ds_tensor.dtype) for p in params if is_partitioned(p) and p.ds_tensor.dtype != dtype})
    if wrong:
        raise ValueError(f"the model was partitioned by zero.Init in {', '.join(wrong)}, but the config trains in "
                         f"{dtype}: pass the same DeepSpeed config to zero.Init (config_dict_or_path=) as to "
                         "hift_ds.initialize, so both read the bf16/fp16 setting")
    wrong_device = sorted({str(p.ds_tensor.device) for p in params
                           if is_partitioned(p) and p.ds_tensor.device != device})
    if wrong_device:
        raise ValueError(f"ZeRO-3 partitions are on {wrong_device}, not on {device}; HiFT updates them on the "
                         "training device: build the model under zero.Init without remote_device")
    previous = getattr(model, _FETCHER, None)
    if previous is not None:  # a second initialize on the same model: one set of hooks only
        previous.destroy()
    zc = get_zero_config(config)
    fetcher = DeepSpeedZeRoOffload(
        model, timers=NoopTimer(), ds_config=config, overlap_comm=bool(zc.overlap_comm),
        prefetch_bucket_size=zc.prefetch_bucket_size, max_reuse_distance=zc.max_reuse_distance,
        max_live_parameters=zc.max_live_parameters, param_persistence_threshold=zc.param_persistence_threshold,
        model_persistence_threshold=zc.model_persistence_threshold,
        zero_module_granularity_threshold=zc.module_granularity_threshold,
        log_trace_cache_warnings=zc.log_trace_cache_warnings)
    setattr(model, _FETCHER, fetcher)
    _mark_forward_for_external_parameters(model)
    model.to(device)  # buffers; parameters are empty until gathered, their partitions already on the device
    return fetcher


def _mark_forward_for_external_parameters(model: nn.Module) -> None:
    # While the model runs forward, a module reading another module's parameter gathers it.
    # DeepSpeed's engine sets these flags in its forward prologue at stage 3; under HiFT it runs
    # at stage 0, so hooks on the root module do it (also for forwards outside the engine).
    def flag(value: bool) -> Callable:
        def hook(module, *args) -> None:
            for m in model.modules():
                if hasattr(m._parameters, "_in_forward"):
                    m._parameters._in_forward = value
        return hook
    for handle in getattr(model, "_hift_forward_flags", ()):
        handle.remove()
    model._hift_forward_flags = (model.register_forward_pre_hook(flag(True)), model.register_forward_hook(flag(False)))


class PartitionLayout:
    """Where this rank's DeepSpeed partitions of a group's parameters sit in its flat shard (see module doc).

    It offers ``ShardLayout``'s interface with a single bucket, so ``GradReducer`` reduce-scatters
    the (N, S) gradient buffer and checkpoints gather and split whole groups through it unchanged.
    """

    def __init__(self, params: list[nn.Parameter], world: int, rank: int):
        self.world, self.rank = world, rank
        self.numels = [p.ds_numel for p in params]
        self.parts = [p.ds_tensor.ds_numel for p in params]  # DeepSpeed's ceil(n / N)
        self.offsets = list(itertools.accumulate([0] + self.parts))[:-1]
        self.full_offsets = list(itertools.accumulate([0] + self.numels))[:-1]
        self.n = sum(self.numels)
        self.buckets = 1
        self.shard_numel = self.chunk = sum(self.parts)
        self.padded = world * self.shard_numel

    def bucket(self, b: int) -> slice:
        """The whole (N, S) gradient buffer: one bucket."""
        return slice(0, self.padded)

    def shard_chunk(self, b: int) -> slice:
        """The whole shard."""
        return slice(0, self.shard_numel)

    def valid(self, i: int) -> int:
        """Elements of parameter ``i``'s partition on this rank that are not padding."""
        return max(0, min(self.parts[i], self.numels[i] - self.rank * self.parts[i]))

    def rows(self, buf: Tensor) -> Tensor:
        """The group's gradient buffer as (N, S): row r is rank r's partitions."""
        return buf[:self.padded].view(self.world, self.shard_numel)

    def add_grad(self, buf: Tensor, i: int, grad: Tensor) -> None:
        """Add parameter ``i``'s full gradient into the rank-major buffer, each rank's slice in its row."""
        c = self.parts[i]
        if c == 0:
            return
        dst = self.rows(buf)[:, self.offsets[i]:self.offsets[i] + c]
        flat = grad.reshape(-1)
        whole, rest = divmod(flat.numel(), c)
        dst[:whole].add_(flat[:whole * c].view(whole, c))
        if rest:
            dst[whole, :rest].add_(flat[whole * c:])

    def shard_of(self, full: Tensor) -> Tensor:
        """This rank's shard of a whole (unpadded) group buffer."""
        flat = full.reshape(-1)
        pieces = []
        for n, c, start in zip(self.numels, self.parts, self.full_offsets):
            part = flat[start:start + n][self.rank * c:(self.rank + 1) * c]
            pieces.append(torch.nn.functional.pad(part, (0, c - part.numel())))
        return torch.cat(pieces) if pieces else flat[:0]

    def gather_full(self, comm: Collectives, shard: Tensor, device: torch.device) -> Tensor:
        """The group's whole (unpadded, CPU) buffer assembled from every rank's ``shard``."""
        every = torch.empty(self.padded, dtype=shard.dtype, device=device)
        comm.all_gather(every, shard.to(device))
        rows = self.rows(every)
        return torch.cat([rows[:, o:o + c].reshape(-1)[:n]
                          for n, c, o in zip(self.numels, self.parts, self.offsets)]).cpu()


class Zero3Sharding(RankSharding):
    """ZeRO-3: updates this rank's DeepSpeed partitions of the active group, its masters and state sharded alike."""

    stage = 3

    def __init__(self, param_fetcher: Any, group=None):
        super().__init__(group)
        self.fetcher = param_fetcher  # DeepSpeedZeRoOffload: releases and re-gathers around the update

    def bind(self, groups: list[list[nn.Parameter]], flat: bool, keeps_masters: bool) -> None:
        """Each group's DeepSpeed partitions on this rank moved into one flat buffer (the update's target)."""
        params = [p for ps in groups for p in ps]
        if not params or not all(is_partitioned(p) for p in params):
            raise ValueError("ZeRO-3 sharding needs a model partitioned by DeepSpeed ZeRO-3; use hift_ds.initialize "
                             'with "zero_optimization": {"stage": 3}, which partitions it')
        self.groups, self.keeps_masters = groups, keeps_masters
        self.layouts, self.weights_device, self.slot = [], [], {}
        dtype, device = params[0].ds_tensor.dtype, params[0].ds_tensor.device
        for g, ps in enumerate(groups):
            sizes = {p.ds_zero_partition_world_size for p in ps}
            if sizes != {self.world}:
                raise ValueError(f"parameters are partitioned over {sorted(sizes)} ranks but HiFT shards over "
                                 f"{self.world}; partition over the whole world (no data_parallel_group / mpu)")
            lay = PartitionLayout(ps, self.world, self.rank)
            flat = torch.zeros(lay.shard_numel, dtype=dtype, device=device)
            for i, p in enumerate(ps):
                piece = flat[lay.offsets[i]:lay.offsets[i] + lay.parts[i]]
                # Only the real elements: DeepSpeed leaves the last partition's padding uninitialised.
                piece[:lay.valid(i)].copy_(p.ds_tensor.data.reshape(-1)[:lay.valid(i)])
                p.ds_tensor.data = piece
                p._hift_zero3_owner = weakref.ref(self)  # the newest optimizer of this model takes its gradients
                self.slot[id(p)] = (g, i)
            self.layouts.append(lay)
            self.weights_device.append(flat)
        # The full gradients of a group, rank-major (N, S); no .grad outlives its backward.
        self.grad_buf_device = torch.zeros(max(lay.padded for lay in self.layouts), dtype=dtype, device=device)
        self.grad_shard_device = torch.zeros(max(lay.shard_numel for lay in self.layouts), dtype=dtype, device=device)
        self.grads = None
        self.reducer = GradReducer(self.comm, groups, self.layouts, self.grad_buf_device, self.grad_shard_device)
        hook_gradients(self, params, Zero3Sharding._on_grad)

    def masters_from_model(self, g: int) -> Tensor:
        """This rank's partitions of group ``g``, in fp32."""
        return self.weights_device[g].float()

    def activate(self, g: int) -> None:
        """The gradient buffer starts at zero (gradients are added into it, not viewed)."""
        self.grad_buf_device.zero_()

    def _on_grad(self, p: nn.Parameter) -> None:
        # The parameter's full gradient of this backward: into its rows of the group buffer, then
        # freed, so no full-size .grad outlives its backward (gradient accumulation adds up here).
        if p._hift_zero3_owner() is not self:  # the model was wrapped again; that optimizer trains it now
            return
        g, i = self.slot[id(p)]
        self.layouts[g].add_grad(self.grad_buf_device, i, p.grad)
        p.grad = None

    def gradient(self, g: int) -> tuple[Tensor, list[Tensor], int]:
        """This rank's partitions of the gradient summed over the N ranks, and N."""
        # Weights left gathered by forward/backward would be stale after the update (DeepSpeed's
        # stage-3 optimizer releases them first too); the gradients are in the buffer already.
        self.before_checkpoint()
        flat = self.reducer.finish(g)
        return flat, [flat], self.world

    def update_weights(self, g: int) -> Tensor:
        """DeepSpeed's partitions themselves (``ds_tensor`` views)."""
        return self.weights_device[g]

    def publish(self, g: int, weights: Tensor) -> None:
        """DeepSpeed's hooks gather the rest when the next forward needs it; its persistent parameters now."""
        if weights.device.type == "cuda":
            # DeepSpeed all-gathers partitions on its own stream, which does not wait for this one:
            # the update must have written them before the next forward's hooks read them.
            torch.cuda.current_stream(weights.device).synchronize()
        self._gather_persistent()

    def _gather_persistent(self) -> None:
        persistent = self.fetcher.persistent_parameters
        if persistent:
            persistent[0].all_gather(param_list=persistent)

    def before_checkpoint(self) -> None:
        """Release every gathered weight, so the module state holds partitions only and nothing goes stale."""
        self.fetcher.partition_all_parameters()

    def after_checkpoint(self) -> None:
        """Gather DeepSpeed's persistent parameters again."""
        self._gather_persistent()

    def checkpoint_state(self, home: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
        """Whole groups from every rank's partitions; without masters (fp32) the weights too: the module state
        holds empty partitions."""
        out = super().checkpoint_state(home)
        if not self.keeps_masters:
            for st, w, lay in zip(out, self.weights_device, self.layouts):
                st[WEIGHT] = lay.gather_full(self.comm, w, self.grad_buf_device.device)
        return out

    def load_weights(self, g: int, saved: dict[str, Tensor]) -> None:
        """This rank's partitions of group ``g`` from the checkpoint's masters (or fp32 weights)."""
        full = saved.get(MASTER if self.keeps_masters else WEIGHT)
        if full is None:
            raise ValueError(f"the checkpoint has no weights for group {g}: it was not saved at ZeRO stage 3 (a "
                             "stage-3 run keeps its weights in the optimizer state); resume it at the stage it was "
                             "saved at")
        w = self.weights_device[g]
        w.copy_(self.layouts[g].shard_of(full).to(device=w.device, dtype=w.dtype))

    def memory_bytes(self) -> dict[str, int]:
        """This rank's partitions plus DeepSpeed's persistent full copies; the gradient buffer and shard."""
        weights = sum(w.numel() * w.element_size() for w in self.weights_device) + sum(
            p.ds_numel * p.element_size() for p in self.fetcher.persistent_parameters)
        grads = sum(t.numel() * t.element_size() for t in (self.grad_buf_device, self.grad_shard_device))
        return {"model_weights": weights, "gradients": grads}


def gathered_state_dict(model: nn.Module) -> dict[str, Tensor] | None:
    """The whole model's 16-bit state dict on rank 0's CPU (None on other ranks), gathered module by module.

    Every rank must call it. It is what DeepSpeed's ``stage3_gather_16bit_weights_on_model_save``
    does: one module's weights gathered at a time (``GatheredParameters``), copied to the host, released.
    """
    import deepspeed
    import torch.distributed as dist

    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    out: dict[str, Tensor] | None = OrderedDict() if rank0 else None
    seen: dict[int, str] = {}

    def visit(module: nn.Module, prefix: str) -> None:
        params = list(module.parameters(recurse=False))
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=bool(params)):
            if out is not None:
                for name, p in module.named_parameters(recurse=False):
                    key = getattr(p, "ds_id", id(p))
                    out[prefix + name] = out[seen[key]] if key in seen else p.detach().cpu().clone()
                    seen.setdefault(key, prefix + name)
                for name, buf in module.named_buffers(recurse=False):
                    if buf is not None and name not in module._non_persistent_buffers_set:
                        out[prefix + name] = buf.detach().cpu().clone()
        for name, child in module.named_children():
            visit(child, prefix + name + ".")

    visit(model, "")
    return out


def attach_to_engine(engine: Any, optimizer: Any, zero: dict) -> None:
    """Route the engine's ``save_16bit_model`` through the gathered state dict (its engine runs at stage 0)."""
    import torch.distributed as dist

    gather = bool(zero.get("stage3_gather_16bit_weights_on_model_save", zero.get("gather_16bit_weights_on_model_save")))

    def save_16bit_model(save_dir: str, save_filename: str = "pytorch_model.bin",
                         exclude_frozen_parameters: bool = False) -> bool:
        if not gather:  # as DeepSpeed: a partitioned model saved as is would be bogus
            logger.info("Did not save the model %s because stage3_gather_16bit_weights_on_model_save is False",
                        os.path.join(save_dir, save_filename))
            return False
        state = gathered_state_dict(engine.module)
        if state is not None:
            if exclude_frozen_parameters:  # frozen: parameters HiFT does not train (the user froze them)
                trained = {id(p) for g in range(optimizer.num_groups) for p in optimizer.group_params(g)}
                frozen = {n for n, p in engine.module.named_parameters(remove_duplicate=False) if id(p) not in trained}
                state = OrderedDict((k, v) for k, v in state.items() if k not in frozen)
            os.makedirs(save_dir, exist_ok=True)
            path = os.path.join(save_dir, save_filename)
            atomic.write_file(path, lambda f: torch.save(state, f))
        if dist.is_initialized():
            dist.barrier()
        return True

    engine.save_16bit_model = save_16bit_model
