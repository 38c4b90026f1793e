"""HiFTOptimizer: trains one group of units per step, every other parameter frozen.

Only the active group has ``requires_grad=True``, gradients and (with offload) device-resident
masters and optimizer state. Built-in optimizers (adamw, adam, sgd, adagrad) keep their state in a
``GroupStore`` of flat per-group buffers updated by ``hift_ds.kernels`` (update.py); any other
``torch.optim.Optimizer`` subclass runs as an inner optimizer over the active parameters. How the
data-parallel ranks share a group is the sharding strategy's business (sharding.py).
"""
from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import Tensor, nn

from hift_ds import kernels
from hift_ds.config import hift_settings
from hift_ds.optim import state
from hift_ds.optim.hyperparams import builtin_hyper, inner_optimizer, resolve_offload, resolve_optimizer
from hift_ds.optim.sharding import Sharding
from hift_ds.optim.store import MASTER, build_store, first_module_of, memory_report, start_copy_outs_before
from hift_ds.optim.update import gradient_factor, inner_step, update_group
from hift_ds.precision import DynamicLossScaler
from hift_ds.schedule import GroupSchedule
from hift_ds.units import freeze, model_groups, shared_device_and_dtype

logger = logging.getLogger(__name__)


class HiFTOptimizer(torch.optim.Optimizer):
    """Hierarchical full-parameter fine-tuning: one group of units trained per optimizer step."""

    def __init__(self, model: nn.Module, optimizer: str | type = "adamw", *, group_size: int | None = None,
                 num_groups: int | None = None, strategy: str = "bottom2up", seed: int = 0,
                 units: list[str] | None = None, offload: str = "auto", pin_memory: bool = True,
                 prefetch: bool = True, offload_slots: int = 2, offload_chunk_mib: int = 128, kernel: str = "auto",
                 loss_scaler: DynamicLossScaler | None = None, max_grad_norm: float = 0.0,
                 sharding: Sharding | None = None, **optimizer_kwargs):
        if not isinstance(model, nn.Module):
            raise TypeError(f"HiFTOptimizer needs the model (an nn.Module), got {type(model).__name__}")
        # The same rules and messages as the "hift" block of a DeepSpeed config.
        hift_settings(group_size=group_size, num_groups=num_groups, strategy=strategy, seed=seed, units=units,
                      kernel=kernel, offload=offload, pin_memory=pin_memory, prefetch=prefetch,
                      offload_slots=offload_slots, offload_chunk_mib=offload_chunk_mib)
        if max_grad_norm < 0:
            raise ValueError(f"max_grad_norm must be >= 0 (0 disables clipping), got {max_grad_norm}")
        self.name, self._inner_cls = resolve_optimizer(optimizer)
        self.sharding = sharding or Sharding()
        if self.sharding.stage and self.name is None:
            raise ValueError(f"ZeRO stage {self.sharding.stage} needs a built-in optimizer: {sorted(kernels.DEFAULTS)}")
        # "shuffled" (the official HiFT code's random): groups of units shuffled once, trained in one fixed order.
        self.units, self._unit_groups = model_groups(model, units, group_size, num_groups,
                                                     shuffle_seed=seed if strategy == "shuffled" else None)
        self._names = [[n for u in g for n, _ in u.params] for g in self._unit_groups]
        self._params = [[p for u in g for _, p in u.params] for g in self._unit_groups]
        self.device, self.model_dtype = shared_device_and_dtype([p for ps in self._params for p in ps])
        self.offload = resolve_offload(offload, self.device, builtin=self.name is not None)
        self.keeps_masters = self.model_dtype != torch.float32  # whether fp32 masters are kept (16-bit weights)
        self.schedule = GroupSchedule(len(self._params), strategy, seed)
        fp16 = self.model_dtype == torch.float16
        self.scaler = loss_scaler or (DynamicLossScaler(hysteresis=1) if fp16 else None)
        self.prefetch, self.max_grad_norm = prefetch, float(max_grad_norm)
        self.skipped_steps, self.overflow = 0, False  # DeepSpeed reads overflow after each step
        self._global_grad_norm: float | None = None  # the active group's norm once clipping computes it
        self.group_steps = [0] * len(self._params)  # updates of each group (its parameters share the count)
        if self.name is not None:
            hyper = builtin_hyper(self.name, optimizer_kwargs)
            self.backend = kernels.resolve_backend(kernel, self.device)
            super().__init__([{"params": ps, "hift_group": i} for i, ps in enumerate(self._params)], hyper)
            self.inner = None
            self.store = build_store(self.sharding, self._params, kernels.state_kinds(self.name, hyper),
                                     flat=self.backend == "triton", keeps_masters=self.keeps_masters, offloaded=self.offload == "cpu",
                                     pin_memory=pin_memory, slots=offload_slots,
                                     chunk_mib=offload_chunk_mib)
            self.sync_masters_from_model()
            if self.store.offloaded and len(self.units) > 1:  # copies home wait for the first block (store.py: why)
                start_copy_outs_before(first_module_of(model, self.units[1].params[0][1]), self.store)
        else:
            self.backend, self.store = "inner", None
            self.inner = inner_optimizer(self._inner_cls, self._params, optimizer_kwargs, self.sharding,
                                         offload=self.offload, keeps_masters=self.keeps_masters)
            super().__init__(self.inner.param_groups, self.inner.defaults)
            self.param_groups = self.inner.param_groups  # one list: LR schedulers reach the inner optimizer
        freeze([p for ps in self._params for p in ps])
        self._activate(self.schedule.active)
        logger.info("HiFT: %d units in %d groups (%s), optimizer %s, backend %s, offload %s%s%s", len(self.units),
                    self.num_groups, strategy, self.optimizer_name, self.backend, self.offload,
                    f" (auto: model on {self.device.type})" if offload == "auto" else "",
                    ", pinned" if self.store is not None and self.store.pinned else "")

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
    def optimizer_name(self) -> str:
        """The built-in optimizer's name, or the inner optimizer class's."""
        return self.name or self._inner_cls.__name__

    @property
    def reduces_in_backward(self) -> bool:
        """Whether ZeRO-2 reduces gradients during backward (armed by ``backward()`` each time)."""
        return getattr(self.sharding, "overlap", False)

    def group_params(self, i: int) -> list[nn.Parameter]:
        """The parameters of group ``i``, unit by unit (in model order but under strategy "shuffled")."""
        return list(self._params[i])

    def group_param_names(self, i: int) -> list[str]:
        """Names of the parameters in group ``i``."""
        return list(self._names[i])

    def group_units(self, i: int) -> list[str]:
        """Names of the units in group ``i``."""
        return [u.name for u in self._unit_groups[i]]

    def sync_masters_from_model(self) -> None:
        """Set the fp32 masters from the model's bf16/fp16 weights (at start, and after these changed outside)."""
        # DeepSpeed broadcasts rank 0's weights after the optimizer exists, a module-only checkpoint load overwrites
        # them: stale masters would undo either. One group at a time: no full fp32 copy of the model is ever made.
        if self.store is None or not self.keeps_masters:
            return
        self.store.invalidate()
        for g, bufs in enumerate(self.store.home):
            bufs[MASTER].copy_(self.sharding.masters_from_model(g))
        if self.prefetch:
            self.store.prefetch(*self._upcoming())

    def _activate(self, g: int) -> None:
        for p in self._params[g]:
            p.requires_grad_(True)
        self.sharding.activate(g)
        if self.store is not None and self.prefetch:
            self.store.prefetch(*self._upcoming())  # g first: it is the active group

    def _upcoming(self) -> list[int]:
        """The groups the next steps train, one per offload slot: the store copies them in as slots free up."""
        return [self.schedule.peek(i) for i in range(self.store.lookahead)]

    def reduce_in_next_backward(self, last_micro_batch: bool = True) -> None:
        """ZeRO-2: reduce the coming backward's gradients as produced (only on the last micro-batch)."""
        self.sharding.arm(self.active_group, last_micro_batch)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the active group's gradients (frozen parameters never hold any)."""
        self.sharding.zero_grad(self.active_group, set_to_none)

    def backward(self, loss: Tensor, last_micro_batch: bool = True) -> None:
        """``loss.backward()`` with the fp16 loss scale applied (and ZeRO-2 reduction overlapped)."""
        self.reduce_in_next_backward(last_micro_batch)
        (loss * self.loss_scale if self.scaler is not None else loss).backward()

    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Update the active group, then freeze it and activate the next group of the schedule."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            g = self.active_group
            flat, grads, ranks = self.sharding.gradient(g)
            # _global_grad_norm (the active group's, None without clipping) is read by DeepSpeed's engine.
            inv_scale, self._global_grad_norm = gradient_factor(
                self.sharding, flat, grads, loss_scale=self.scaler.scale if self.scaler is not None else None,
                ranks=ranks, max_grad_norm=self.max_grad_norm, backend=self.backend, device=self.device)
            self.overflow = inv_scale is None
            if self.overflow:  # skip, lower the scale, retry the same group on the next step
                self.scaler.update(True)
                self.skipped_steps += 1
                self.zero_grad()
                logger.warning("fp16 overflow: step skipped, loss scale now %g", self.scaler.scale)
                return loss
            if self.inner is not None:
                inner_step(self.inner, grads, inv_scale)
            else:
                self._update(g, flat, grads, inv_scale)
            if self.scaler is not None:
                self.scaler.update(False)
            freeze(self._params[g])
            self.schedule.advance()
            self._activate(self.active_group)
        return loss

    def _update(self, g: int, flat_grad: Tensor | None, grads: list[Tensor], inv_scale: float) -> None:
        self.group_steps[g] += 1
        weights = self.sharding.update_weights(g)
        bufs = self.store.acquire(g)
        hyper = {k: v for k, v in self.param_groups[g].items() if k not in ("params", "hift_group")}
        update_group(self.name, hyper, bufs, weights, self._params[g], grads, flat_grad,
                     lambda t: self.sharding.split(g, t), self.group_steps[g], self.backend, inv_scale)
        self.store.release(g)
        self.sharding.publish(g, weights)

    # ---- checkpoints (DeepSpeed's engine calls the two events around save and load) ------------
    def state_dict(self) -> dict:
        """Every group's optimizer state (whole, rank-independent), hyper-parameters and schedule."""
        return state.save_state(self)

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore ``state_dict()``; the model and grouping must match the saved run."""
        self.checkpoint_event_prologue()
        state.check_state(self, state_dict)  # before anything is changed
        freeze(self._params[self.active_group])
        state.load_state(self, state_dict)
        self._activate(self.active_group)
        self.checkpoint_event_epilogue()

    def checkpoint_event_prologue(self) -> None:
        """Before DeepSpeed saves or loads a checkpoint (ZeRO-3 releases gathered weights)."""
        self.sharding.before_checkpoint()

    def checkpoint_event_epilogue(self) -> None:
        """After DeepSpeed saved or loaded a checkpoint (ZeRO-3 gathers its persistent weights)."""
        self.sharding.after_checkpoint()

    def memory_report(self) -> dict[str, int]:
        """Bytes by category: model weights, gradients, masters+state on device and on host."""
        return memory_report(self.sharding, self.store, self.inner)

