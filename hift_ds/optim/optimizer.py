"""HiFTOptimizer: trains one group of units per step, every other parameter frozen.

Only the active group has ``requires_grad=True``, gradients and (with offload) device-resident
masters and optimizer state. Built-in optimizers (adamw, adam, sgd, adagrad) keep their state in
a ``GroupStore`` of flat per-group buffers updated by ``hift_ds.kernels``; any other
``torch.optim.Optimizer`` subclass runs as an inner optimizer over the active parameters.
"""
from __future__ import annotations

import itertools
import logging
import weakref
from typing import Callable

import torch
from torch import Tensor, nn

from hift_ds import kernels
from hift_ds.optim.hyperparams import builtin_hyper, resolve_optimizer
from hift_ds.optim.store import MASTER, GroupStore, first_module_of, start_copy_outs_before
from hift_ds.precision import DynamicLossScaler
from hift_ds.schedule import GroupSchedule
from hift_ds.distributed.zero12 import DEFAULT_BUCKET_NUMEL, Collectives, GradReducer, ShardLayout
from hift_ds.units import HIFT_FROZEN, Unit, discover_units, group_units, units_from_patterns

logger = logging.getLogger(__name__)

OFFLOAD_DEVICES = ("auto", "none", "cpu")


def resolve_offload(offload: str, device: torch.device, builtin: bool) -> str:
    """The offload device ``"auto"`` stands for: "cpu" for a built-in optimizer on CUDA, else "none"."""
    if offload != "auto":
        return offload
    # Offload saves device memory only where the model is on an accelerator; on a CPU it would
    # just copy between two host buffers. Optimizers other than the built-ins cannot offload.
    return "cpu" if torch.device(device).type == "cuda" and builtin else "none"


class HiFTOptimizer(torch.optim.Optimizer):
    """Hierarchical full-parameter fine-tuning: one group of units trained per optimizer step."""

    _ZERO_STAGES = (0, 1, 2)
    _gathers_weights = True  # ZeRO-1/2 all-gather the updated shard; ZeRO-3 (zero3.py) updates DeepSpeed's partition

    def __init__(self, model: nn.Module, optimizer: str | type = "adamw", *, group_size: int = 1,
                 num_groups: int | None = None, strategy: str = "bottom2up", seed: int = 0,
                 units: list[str] | None = None, offload: str = "auto", pin_memory: bool = True,
                 prefetch: bool = True, offload_slots: int = 2, kernel: str = "auto",
                 loss_scaler: DynamicLossScaler | None = None,
                 max_grad_norm: float = 0.0, zero_stage: int = 0, dp_group=None,
                 reduce_bucket_size: int = DEFAULT_BUCKET_NUMEL, overlap_comm: bool = True, **optimizer_kwargs):
        if not isinstance(model, nn.Module):
            raise TypeError(f"HiFTOptimizer needs the model (an nn.Module), got {type(model).__name__}")
        if num_groups is not None and group_size != 1:
            raise ValueError(f"set either group_size ({group_size}) or num_groups ({num_groups}), not both")
        if offload not in OFFLOAD_DEVICES:
            raise ValueError(f"offload device {offload!r} is not one of {OFFLOAD_DEVICES}")
        if zero_stage not in self._ZERO_STAGES:
            raise ValueError(f"zero_stage={zero_stage!r}: HiFTOptimizer supports ZeRO stages 0, 1 and 2; stage 3 "
                             "partitions the model with DeepSpeed: use hift_ds.initialize with "
                             '"zero_optimization": {"stage": 3}')
        self.name, self._inner_cls = resolve_optimizer(optimizer)
        if zero_stage and self.name is None:
            raise ValueError(f"ZeRO stage {zero_stage} needs a built-in optimizer ({sorted(kernels.DEFAULTS)})")
        self.zero_stage = zero_stage
        # Stages 1/2: this rank keeps 1/N of every group's masters and state (hift_ds.distributed.zero12).
        self._comm = Collectives(dp_group) if zero_stage else None
        world = self._comm.world if self._comm else 1
        self._overlap = zero_stage == 2 and overlap_comm  # stage 2: reduce buckets during backward
        unit_list: list[Unit] = units_from_patterns(model, units) if units is not None else discover_units(model)
        self.units = unit_list
        self._unit_groups = group_units(unit_list, None if num_groups else group_size, num_groups)
        self._names = [[n for u in g for n, _ in u.params] for g in self._unit_groups]
        self._params = [[p for u in g for _, p in u.params] for g in self._unit_groups]
        all_params = [p for g in self._params for p in g]
        devices = {p.device for p in all_params}
        if len(devices) != 1:
            raise ValueError(f"HiFT needs every trainable parameter on one device, found {sorted(map(str, devices))}")
        self.device = devices.pop()
        dtypes = {p.dtype for p in all_params}
        if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
            raise ValueError(f"trainable parameters must share one float dtype, found {sorted(map(str, dtypes))}")
        self.model_dtype = dtypes.pop()
        requested, offload = offload, resolve_offload(offload, self.device, builtin=self.name is not None)
        self.offload = offload
        self.masters = self.model_dtype != torch.float32
        self.schedule = GroupSchedule(len(self._params), strategy, seed)
        self.scaler = loss_scaler
        if self.model_dtype == torch.float16 and self.scaler is None:
            self.scaler = DynamicLossScaler(hysteresis=1)
        self.prefetch = prefetch
        if max_grad_norm < 0:
            raise ValueError(f"max_grad_norm must be >= 0 (0 disables clipping), got {max_grad_norm}")
        self.max_grad_norm = float(max_grad_norm)
        self.skipped_steps = 0
        self.overflow = False  # read by DeepSpeed after each step

        if self.name is not None:
            hyper = builtin_hyper(self.name, optimizer_kwargs)
            self.backend = kernels.resolve_backend(kernel, self.device)
            super().__init__([{"params": ps, "hift_group": i} for i, ps in enumerate(self._params)], hyper)
            self._flat = self.backend == "triton" or self._comm is not None
            numels = [sum(p.numel() for p in ps) for ps in self._params]
            self._layouts, self._weights = self._layout_groups(numels, world,
                                                               reduce_bucket_size if self._overlap else None)
            if self._flat and self.device.type == "cuda":
                # The per-parameter storages the flat buffers replaced stay reserved by the caching
                # allocator, and no later allocation (a group-sized buffer, activations) fits their
                # sizes well: without this the reserved memory holds the weights twice.
                torch.cuda.empty_cache()
            self.store = GroupStore([lay.shard_numel for lay in self._layouts] or numels,
                                    kernels.state_kinds(self.name, hyper),
                                    masters=self.masters, offload=offload == "cpu", device=self.device,
                                    pin_memory=pin_memory, slots=offload_slots)
            self.sync_masters_from_model()
            if self.store.offload and len(unit_list) > 1:
                # Copies home start once a forward is past the model's input preparation (offload.py: why).
                trigger = first_module_of(model, unit_list[1].params[0][1])
                if trigger is not None:
                    start_copy_outs_before(trigger, self.store)
            self._inner = None
        else:
            if offload != "none" or self.masters:
                raise ValueError(f"offload and bf16/fp16 masters need a built-in optimizer "
                                 f"({sorted(kernels.DEFAULTS)}); {optimizer.__name__} runs only in fp32 "
                                 "with offload 'none'")
            self.backend = "inner"
            self._flat, self._weights = False, []
            self._inner = self._inner_cls([{"params": ps, "hift_group": i} for i, ps in enumerate(self._params)],
                                          **optimizer_kwargs)
            super().__init__(self._inner.param_groups, self._inner.defaults)
            self.param_groups = self._inner.param_groups  # one list: LR schedulers reach the inner optimizer
            self.store = None
        self._steps = [[0] * len(ps) for ps in self._params]
        # Fused path: each group's weights in one buffer and the active group's grads as views
        # into one flat gradient buffer, so a single kernel launch updates the whole group.
        self._reducer: GradReducer | None = None
        self._offset = {id(p): off for ps in self._params
                        for p, off in zip(ps, itertools.accumulate([0] + [q.numel() for q in ps]))}
        if self._flat:
            self._grad_buf = torch.zeros(max([lay.padded for lay in self._layouts] or
                                             [w.numel() for w in self._weights]), dtype=self.model_dtype,
                                         device=self.device)
            if self._comm is not None:
                # This rank's summed gradient and (ZeRO-1/2) updated weights, one shard of a group each.
                shard = max(lay.shard_numel for lay in self._layouts)
                self._grad_shard = torch.zeros(shard, dtype=self.model_dtype, device=self.device)
                if self._gathers_weights:
                    self._weight_shard = torch.zeros(shard, dtype=self.model_dtype, device=self.device)
                self._reducer = GradReducer(self._comm, self._params, self._layouts, self._grad_buf,
                                            self._grad_shard)
            # The model outlives the optimizer (re-wrapping it is allowed): a hook holding a bound
            # method would keep this optimizer and its buffers alive for good, so it holds a weak
            # reference, and the hooks go when the optimizer does.
            me = weakref.ref(self)

            def hook(q: nn.Parameter) -> None:  # must return None, or torch takes it for a new grad
                opt = me()
                if opt is not None:
                    opt._on_grad(q)
            handles = []
            for p in all_params:
                p.requires_grad_(True)  # a previous wrapper froze it; torch hooks need it unfrozen
                handles.append(p.register_post_accumulate_grad_hook(hook))
            weakref.finalize(self, lambda: [h.remove() for h in handles])
        for ps in self._params:
            for p in ps:
                setattr(p, HIFT_FROZEN, True)
                p.requires_grad_(False)
                p.grad = None
        self._activate(self.schedule.active)
        chosen = f"{offload} (auto: model on {self.device.type})" if requested == "auto" else offload
        if self.store is not None and self.store.pinned:
            chosen += ", pinned"
        logger.info("HiFT: %d units in %d groups (%s), optimizer %s, backend %s, offload %s",
                    len(unit_list), self.num_groups, strategy, self.name or self._inner_cls.__name__,
                    self.backend, chosen)

    # ---- read-only views -------------------------------------------------------------------
    @property
    def num_groups(self) -> int:
        """Number of HiFT groups k (one cycle is k optimizer steps)."""
        return len(self._params)

    @property
    def active_group(self) -> int:
        """Index of the group the next ``step()`` updates."""
        return self.schedule.active

    @property
    def cycle(self) -> int:
        """Number of completed cycles (every group trained once per cycle)."""
        return self.schedule.cycle

    @property
    def loss_scale(self) -> float:
        """Current fp16 loss scale (1.0 without a scaler)."""
        return self.scaler.scale if self.scaler is not None else 1.0

    @property
    def reduces_in_backward(self) -> bool:
        """Whether ZeRO-2 reduces gradients during backward (armed by ``backward()`` each time)."""
        return self._overlap

    def _masters_from_model(self, g: int) -> Tensor:
        # This rank's shard under ZeRO-1/2, else the whole group, as fp32 values of the weights.
        if self._comm is not None:
            return self._layouts[g].shard_of(self._weights[g]).float()
        return torch.cat([p.detach().reshape(-1).float() for p in self._params[g]])

    def sync_masters_from_model(self) -> None:
        """Set the fp32 masters from the model's bf16/fp16 weights (at start, and after these changed outside)."""
        # DeepSpeed broadcasts rank 0's weights after the optimizer exists, and a module-only
        # checkpoint load overwrites the weights: stale masters would undo either at the next step.
        # One group at a time, so no full fp32 copy of the model is ever made.
        if self.store is None or not self.masters:
            return
        self.store.invalidate()
        for g, bufs in enumerate(self.store.home):
            bufs[MASTER].copy_(self._masters_from_model(g))
        if self.prefetch:
            self.store.prefetch(self.active_group)

    def group_param_names(self, i: int) -> list[str]:
        """Names of the parameters in group ``i``."""
        return list(self._names[i])

    def group_units(self, i: int) -> list[str]:
        """Names of the units in group ``i``."""
        return [u.name for u in self._unit_groups[i]]

    # ---- activation --------------------------------------------------------------------------
    def _layout_groups(self, numels: list[int], world: int,
                       bucket_numel: int | None) -> tuple[list[ShardLayout], list[Tensor]]:
        """ZeRO-1/2 shard layouts and, on the fused path, each group's weights flattened into one buffer."""
        layouts = [ShardLayout(n, world, self._comm.rank, bucket_numel) for n in numels] if self._comm else []
        sizes = [lay.padded for lay in layouts] or numels
        return layouts, [self._flatten_weights(ps, n) for ps, n in zip(self._params, sizes)] if self._flat else []

    @staticmethod
    def _flatten_weights(params: list[nn.Parameter], size: int) -> Tensor:
        n = sum(p.numel() for p in params)
        flat = torch.zeros(size, dtype=params[0].dtype, device=params[0].device)
        torch.cat([p.detach().reshape(-1) for p in params], out=flat[:n])
        off = 0
        for p in params:
            p.data = flat[off:off + p.numel()].view_as(p)
            off += p.numel()
        return flat

    def _activate(self, g: int) -> None:
        for p in self._params[g]:
            p.requires_grad_(True)
        if self._flat:
            self._grad_buf.zero_()
            for p, view in zip(self._params[g], self._split(g, self._grad_buf)):
                p.grad = view
        if self.store is not None and self.prefetch:
            self.store.prefetch(g)

    def _deactivate(self, g: int) -> None:
        for p in self._params[g]:
            p.requires_grad_(False)
            p.grad = None

    def _prepare_step(self, g: int) -> None:
        """Before group ``g``'s update: its gradients back in the flat buffer (ZeRO-3 releases gathered weights)."""
        if self._flat:
            self._adopt_grads(g)

    def _adopt_grads(self, g: int) -> None:
        # Something set .grad to None after activation (DeepSpeed's engine.zero_grad, a user's
        # model.zero_grad()), so autograd made fresh tensors: move them into the flat buffer.
        # A parameter that got no gradient since then must not keep the stale one in its view.
        for p, view in zip(self._params[g], self._split(g, self._grad_buf)):
            if p.grad is None:
                view.zero_()
                p.grad = view
            elif p.grad.data_ptr() != view.data_ptr():
                view.copy_(p.grad)
                p.grad = view

    def _on_grad(self, p: nn.Parameter) -> None:
        # Post-accumulate hook: the parameter's gradient for this backward is complete.
        if self._reducer is not None and self._reducer.armed:
            off = self._offset[id(p)]
            view = self._grad_buf[off:off + p.numel()].view_as(p)
            if p.grad.data_ptr() != view.data_ptr():  # a fresh tensor (see _adopt_grads)
                view.copy_(p.grad)
                p.grad = view
            self._reducer.on_grad(p)

    def reduce_in_next_backward(self, last_micro_batch: bool = True) -> None:
        """ZeRO-2: reduce the coming backward's gradients as produced (only on the last micro-batch)."""
        if self._overlap and last_micro_batch:
            self._reducer.arm(self.active_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the active group's gradients (frozen parameters never hold any)."""
        if self._reducer is not None:
            self._reducer.wait()  # no reduction may still be reading the buffer
        if self._flat:  # keep the views into the flat buffer; zero it instead
            self._grad_buf.zero_()
            return
        for p in self._params[self.active_group]:
            if set_to_none or p.grad is None:
                p.grad = None
            else:
                p.grad.zero_()

    def backward(self, loss: Tensor, last_micro_batch: bool = True) -> None:
        """``loss.backward()`` with the fp16 loss scale applied (and ZeRO-2 reduction overlapped)."""
        self.reduce_in_next_backward(last_micro_batch)
        (loss * self.loss_scale if self.scaler is not None else loss).backward()

    # ---- the step ----------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Update the active group, then freeze it and activate the next group of the schedule."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._step_active_group()
        return loss

    def _step_active_group(self) -> None:
        # step()'s body, undecorated: no_grad applies through step(), and mutmut (docs/testing.md)
        # skips decorated functions.
        g = self.active_group
        params = self._params[g]
        self._prepare_step(g)
        inv_scale = 1.0 / self.scaler.scale if self.scaler is not None else 1.0
        if self._comm is not None:
            # Sum over ranks lands as this rank's shard (stage 2: mostly during backward already);
            # divide by N for the data-parallel mean.
            flat_grad = self._reducer.finish(g)
            inv_scale /= self._comm.world
            grads = [flat_grad]
        else:
            # A parameter of the active group that got no gradient (unused in the forward) is
            # updated with a zero one, as DeepSpeed does and as a ZeRO shard spanning parameters
            # must: every backend then agrees, and a group's parameters share one step count.
            if self._flat:
                flat_grad = self._grad_buf[:self._weights[g].numel()]
                grads = self._split(g, flat_grad)
            else:
                for p in params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                grads = [p.grad for p in params]
        self.overflow = False
        self._global_grad_norm = None  # the active group's norm once clipping computes it
        if self.scaler is not None:
            bad = kernels.has_inf_or_nan_flat(flat_grad) if self._flat else kernels.has_inf_or_nan(grads)
            self.overflow = bool(self._reduce(torch.tensor([float(bad)], device=self.device), "max"))
        if self.overflow:
            # Overflow: skip, lower the scale, retry the same group on the next step.
            self.scaler.update(True)
            self.skipped_steps += 1
            self.zero_grad()
            logger.warning("fp16 overflow: step skipped, loss scale now %g", self.scaler.scale)
            return
        if self.max_grad_norm > 0:
            # Clip by the active group's norm, folded into the unscale factor the kernel applies.
            sq = torch.linalg.vector_norm(flat_grad, dtype=torch.float32) ** 2 if self._flat else sum(
                torch.linalg.vector_norm(gr.float()) ** 2 for gr in grads)
            norm = float(self._reduce(sq.reshape(1), "sum")) ** 0.5 * inv_scale
            self._global_grad_norm = norm  # read by DeepSpeed's engine (get_global_grad_norm)
            if norm > self.max_grad_norm:
                inv_scale *= self.max_grad_norm / (norm + 1e-6)
        if self._comm is not None:
            self._update_shard(g, flat_grad, inv_scale)
        elif self._inner is not None:
            if inv_scale != 1.0:
                for gr in grads:
                    gr.mul_(inv_scale)
            self._inner.step()
        else:
            self._update_builtin(g, grads, inv_scale)
        if self.scaler is not None:
            self.scaler.update(False)
        self._deactivate(g)
        self.schedule.advance()
        self._activate(self.active_group)

    def _update_builtin(self, g: int, grads: list[Tensor], inv_scale: float) -> None:
        weights = [p.data for p in self._params[g]]
        self._steps[g] = [s + 1 for s in self._steps[g]]
        bufs = self.store.acquire(g)
        state = {k: self._split(g, buf) for k, buf in bufs.items()}
        masters = state.pop(MASTER, None)
        hyper = {k: v for k, v in self.param_groups[g].items() if k not in ("params", "hift_group")}
        flat = None
        if self._flat:
            n = self._weights[g].numel()
            flat = {k: buf for k, buf in bufs.items() if k != MASTER}
            flat.update(param=bufs[MASTER] if MASTER in bufs else self._weights[g], grad=self._grad_buf[:n])
            if MASTER in bufs:
                flat["model"] = self._weights[g]
        model_params = weights if masters is not None and flat is None else None
        kernels.apply_update(self.name, hyper, masters if masters is not None else weights, grads, state,
                             self._steps[g], backend=self.backend, inv_scale=inv_scale, flat=flat,
                             model_params=model_params)
        self.store.release(g)

    def _reduce(self, t: Tensor, op: str) -> float:
        if self._comm is not None:
            self._comm.all_reduce(t, op)
        return float(t)

    def _update_shard(self, g: int, grad: Tensor, inv_scale: float) -> None:
        """ZeRO: update this rank's shard of group ``g``, then publish the new weights."""
        weight = self._shard_target(g)
        bufs = self.store.acquire(g)
        step = self._steps[g][0] + 1  # a shard spans parameters, which all advance together here
        self._steps[g] = [step] * len(self._steps[g])
        state = {k: [v] for k, v in bufs.items() if k != MASTER}
        target = bufs.get(MASTER, weight)
        flat = None
        if self.backend == "triton":
            flat = {k: v for k, v in bufs.items() if k != MASTER} | {"param": target, "grad": grad}
            if MASTER in bufs:
                flat["model"] = weight
        hyper = {k: v for k, v in self.param_groups[g].items() if k not in ("params", "hift_group")}
        kernels.apply_update(self.name, hyper, [target], [grad], state, [step], backend=self.backend,
                             inv_scale=inv_scale, flat=flat,
                             model_params=[weight] if MASTER in bufs and flat is None else None)
        self.store.release(g)
        self._publish(g, weight)

    def _shard_target(self, g: int) -> Tensor:
        """The weights of this rank's shard that the update writes (and, in fp32, reads): a scratch shard."""
        lay = self._layouts[g]
        weight = self._weight_shard[:lay.shard_numel]
        if not self.masters:  # fp32: the weights themselves are what the update reads
            weight.view(lay.buckets, lay.chunk).copy_(lay.shard_view(self._weights[g]))
        return weight

    def _publish(self, g: int, weight: Tensor) -> None:
        """All-gather every rank's updated shard into the group's weights."""
        lay = self._layouts[g]
        for b in range(lay.buckets):
            self._comm.all_gather(self._weights[g][lay.bucket(b)], weight[lay.shard_chunk(b)])

    def _load_weights(self, g: int, saved: dict[str, Tensor]) -> None:
        """Model weights of group ``g`` from a checkpoint's masters (fp32 weights come with the module)."""
        if MASTER in saved and self.masters:
            for p, m in zip(self._params[g], self._split(g, saved[MASTER].to(self.device))):
                p.data.copy_(m)

    def _split(self, g: int, flat: Tensor) -> list[Tensor]:
        out, off = [], 0
        for p in self._params[g]:
            out.append(flat[off:off + p.numel()].view_as(p))
            off += p.numel()
        return out

    # ---- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Every group's optimizer state (flat, rank-independent), hyper-parameters and schedule."""
        groups_hyper = [{k: v for k, v in pg.items() if k != "params"} for pg in self.param_groups]
        out = {"hift": {"version": 1, "optimizer": self.name or self._inner_cls.__name__,
                        "group_names": [list(n) for n in self._names], "schedule": self.schedule.state_dict(),
                        "steps": [list(s) for s in self._steps], "skipped_steps": self.skipped_steps},
               "param_groups": groups_hyper,
               "loss_scaler": self.scaler.state_dict() if self.scaler is not None else None}
        if self._inner is not None:
            out["inner"] = self._inner.state_dict()
        else:
            self.store.synchronize()
            if self._comm is not None:  # rank-independent layout: whole groups, unpadded
                out["state"] = [{k: lay.gather_full(self._comm, buf, self.device) for k, buf in bufs.items()}
                                for bufs, lay in zip(self.store.home, self._layouts)]
            else:
                out["state"] = [dict(bufs) for bufs in self.store.home]
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore ``state_dict()``; the model and grouping must match the saved run."""
        if "hift" not in state_dict:
            raise ValueError("not a HiFTOptimizer state dict (no 'hift' entry); was it saved by another optimizer?")
        meta = state_dict["hift"]
        if meta["group_names"] != self._names:
            raise ValueError(f"checkpoint grouping differs from this optimizer's: saved {len(meta['group_names'])} "
                             f"groups, this run has {self.num_groups}, or the parameter names differ; use the "
                             "same model, units, group_size/num_groups as the saved run")
        if meta["optimizer"] != (self.name or self._inner_cls.__name__):
            raise ValueError(f"checkpoint was saved with optimizer {meta['optimizer']!r}, this run uses "
                             f"{self.name or self._inner_cls.__name__!r}")
        self.schedule.check_state_dict(meta["schedule"])  # before anything is changed
        self._deactivate(self.active_group)
        for pg, saved in zip(self.param_groups, state_dict["param_groups"]):
            pg.update({k: v for k, v in saved.items() if k != "params"})
        if self._inner is not None:
            self._inner.load_state_dict(state_dict["inner"])
        else:
            self.store.invalidate()
            for g, (home, saved) in enumerate(zip(self.store.home, state_dict["state"])):
                for k, buf in home.items():
                    if k not in saved:
                        raise ValueError(f"checkpoint lacks optimizer state {k!r} of group {g}; it was saved with "
                                         "other optimizer settings (e.g. amsgrad, momentum or precision)")
                    full = saved[k].reshape(-1)
                    buf.copy_(self._layouts[g].shard_of(full) if self._comm is not None else full)
                self._load_weights(g, saved)
        self._steps = [list(s) for s in meta["steps"]]
        self.skipped_steps = meta["skipped_steps"]
        self.schedule.load_state_dict(meta["schedule"])
        if self.scaler is not None and state_dict.get("loss_scaler"):
            self.scaler.load_state_dict(state_dict["loss_scaler"])
        self._activate(self.active_group)

    # ---- reporting ---------------------------------------------------------------------------
    def memory_report(self) -> dict[str, int]:
        """Bytes by category: model weights, gradients, masters+state on device and on host."""
        params = [p for ps in self._params for p in ps]
        scratch = getattr(self, "_weight_shard", None)  # ZeRO: this rank's updated weights before the gather
        report = {"model_weights": sum(p.numel() * p.element_size() for p in params) + (
                      scratch.numel() * scratch.element_size() if scratch is not None else 0),
                  "gradients": (sum(b.numel() * b.element_size() for b in (self._grad_buf, getattr(
                                    self, "_grad_shard", self._grad_buf[:0]))) if self._flat else
                                sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None))}
        if self.store is not None:
            loc = self.store.bytes_by_location()
            report.update(state_device=loc["device"], state_host_pinned=loc["host_pinned"],
                          state_host_pageable=loc["host_pageable"])
        else:
            report.update(state_device=sum(t.numel() * t.element_size() for s in self._inner.state.values()
                                           for t in s.values() if torch.is_tensor(t)),
                          state_host_pinned=0, state_host_pageable=0)
        return report
