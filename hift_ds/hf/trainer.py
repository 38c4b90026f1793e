"""HiFT inside the Hugging Face Trainer and TRL's SFTTrainer: ``Trainer(...)`` becomes ``HiFTTrainer(..., hift={...})``.

The Trainer keeps its loop, logging, evaluation, checkpoints and callbacks. What HiFT changes:

- the optimizer is a ``HiFTOptimizer`` over the model's groups (AdamW from TrainingArguments, or
  ``optimizer_cls_and_kwargs``); it moves to the next group in ``step()``, which the Trainer calls
  once per gradient-accumulation boundary, so the group is kept across micro-batches;
- the LR schedule of ``lr_scheduler_type``/warm-up/``max_steps`` is built in cycles and advances
  once per cycle (hf_schedule.py); the logged ``learning_rate`` is the LR each step trained with;
- ``max_grad_norm`` is the Trainer's clipping, over the parameters that have gradients: only the
  active group's (frozen parameters have none);
- several processes without DeepSpeed: DDP built by accelerate registers only the parameters that
  required grad when it was built (the first group), so its reduction is bypassed and this trainer
  all-reduces the active group's gradients itself after the last micro-batch, before clipping;
- ``deepspeed=``: accelerate's ``deepspeed.initialize`` builds hift_ds.initialize's engine
  (hf_deepspeed.py).

Inputs HiFT cannot honour are refused when the trainer is built (hf_checks.py).
"""
from __future__ import annotations

import inspect
import logging
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from hift_ds.hf.checks import METRIC_SCHEDULES, check_model, check_trainer_inputs, option_value
from hift_ds.hf.deepspeed import add_optimizer_block, hift_engine_for
from hift_ds.hf.schedule import TrainerCycleLRScheduler, trainer_schedule_in_cycles
from hift_ds.optim.optimizer import HiFTOptimizer

logger = logging.getLogger(__name__)

__all__ = ["HiFTTrainerMixin", "HiFTTrainer", "HiFTSFTTrainer", "with_hift", "TrainerCycleLRScheduler"]


def _hift_of(optimizer: Any) -> HiFTOptimizer | None:
    # Through accelerate's AcceleratedOptimizer / DeepSpeedOptimizerWrapper to the HiFTOptimizer.
    while optimizer is not None and not isinstance(optimizer, HiFTOptimizer):
        optimizer = getattr(optimizer, "optimizer", None)
    return optimizer


class HiFTTrainerMixin:
    """Put before a ``transformers.Trainer`` subclass to train with HiFT; ``hift=`` is the "hift" config block."""

    def __init__(self, *args, hift: dict | None = None, **kwargs):
        from transformers import TrainingArguments

        given = inspect.signature(super().__init__).bind_partial(*args, **kwargs).arguments
        # A subclass whose __init__ takes (*args, **kwargs) binds its positionals as "args": checked
        # once the Trainer has parsed them.
        training_args = given.get("args") if isinstance(given.get("args"), TrainingArguments) else None
        check = dict(hift=hift, model=given.get("model"), args=training_args, optimizers=given.get("optimizers"),
                     optimizer_cls_and_kwargs=given.get("optimizer_cls_and_kwargs"),
                     peft_config=given.get("peft_config"))
        check_trainer_inputs(**check)
        super().__init__(*args, **kwargs)
        # Again on what the Trainer made of them: a model TRL loaded by name, default arguments.
        self.hift_config, self._hift_block = check_trainer_inputs(**{**check, "model": self.model, "args": self.args})
        if (self.args.weight_decay and not self.is_deepspeed_enabled and self.optimizer_cls_and_kwargs is None
                and self.is_world_process_zero()):
            logger.warning("HiFT applies weight_decay=%g to every parameter of the active group, biases and norm "
                           "weights included (the Trainer's own AdamW exempts those)", self.args.weight_decay)

    # ---- optimizer and schedule ------------------------------------------------------------------
    @property
    def hift_optimizer(self) -> HiFTOptimizer | None:
        """The HiFTOptimizer once training has built it (also under DeepSpeed)."""
        return _hift_of(self.optimizer)

    def create_optimizer(self, model: nn.Module | None = None):
        """Build the HiFTOptimizer (AdamW from TrainingArguments, or ``optimizer_cls_and_kwargs``)."""
        if self.optimizer is not None:
            return self.optimizer
        if model is not None and model is not self.model:
            raise ValueError("HiFT builds its groups from the trainer's model; a model wrapped before the optimizer "
                             "(FSDP) is not supported")
        check_model(self.model, deepspeed=self.is_deepspeed_enabled)
        if self.accelerator.num_processes > 1:
            # DDP broadcasts rank 0's weights after this; the masters must be made from those same weights.
            for tensor in [*self.model.parameters(), *self.model.buffers()]:
                dist.broadcast(tensor.data, src=0)
        if self.optimizer_cls_and_kwargs is not None:
            optimizer, options = self.optimizer_cls_and_kwargs[0], dict(self.optimizer_cls_and_kwargs[1])
            options.setdefault("lr", self.args.learning_rate)
        else:
            args = self.args
            optimizer, options = "adamw", dict(lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                               eps=args.adam_epsilon, weight_decay=args.weight_decay)
        # max_grad_norm stays the Trainer's: it clips the active group (the only one with gradients).
        hift = HiFTOptimizer(self.model, optimizer, **self.hift_config.optimizer_kwargs(), **options)
        # device_placement=False: accelerate would round-trip every group's state through the device
        # (all offloaded masters and moments on the GPU at once); the flag stops the Trainer's prepare
        # from wrapping it again.
        self.optimizer = self.accelerator.prepare_optimizer(hift, device_placement=False)
        self.optimizer._is_accelerate_prepared = True
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        """The Trainer's LR schedule in HiFT cycles, advanced once per cycle."""
        if self.lr_scheduler is not None:
            return self.lr_scheduler
        hift = _hift_of(optimizer if optimizer is not None else self.optimizer)
        if hift is None or option_value(self.args.lr_scheduler_type) in METRIC_SCHEDULES:
            return super().create_scheduler(num_training_steps, optimizer)  # stepped on metrics, not per step
        self.lr_scheduler = trainer_schedule_in_cycles(self.args, hift, num_training_steps)
        self._created_lr_scheduler = True  # the Trainer rebuilds it on the next train(), as its own
        return self.lr_scheduler

    # ---- training ----------------------------------------------------------------------------------
    def train(self, *args, **kwargs):
        """``Trainer.train``; with DeepSpeed, the engine accelerate builds is hift_ds.initialize's."""
        if not self.is_deepspeed_enabled:
            return super().train(*args, **kwargs)
        ds_config = self.accelerator.state.deepspeed_plugin.deepspeed_config
        add_optimizer_block(ds_config, self.args)
        with hift_engine_for(self, self._hift_block, ds_config):
            return super().train(*args, **kwargs)

    def training_step(self, model: nn.Module, inputs: dict, num_items_in_batch: Any = None) -> torch.Tensor:
        """Forward/backward of one micro-batch; in several processes, the active group all-reduced at the boundary."""
        if self.is_deepspeed_enabled:  # the engine reduces (HiFT's ZeRO at stages 1/2)
            return super().training_step(model, inputs, num_items_in_batch)
        # DDP reduces only the parameters that required grad when it was built, the first group (the
        # others were measured to drift apart across ranks): skip it (accelerate's autocast sits on the
        # inner module's forward) and reduce each step's active group here.
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.accelerator.num_processes > 1 and self.accelerator.sync_gradients:
            self._all_reduce_active_group()  # after the last micro-batch, before the Trainer clips and steps
        return loss

    def _all_reduce_active_group(self) -> None:
        hift = self.hift_optimizer
        params = hift.param_groups[hift.active_group]["params"]
        world = self.accelerator.num_processes
        handles = []
        for p in params:
            if p.grad is None:  # unused on this rank: every rank must join the same collectives
                p.grad = torch.zeros_like(p)
            p.grad.div_(world)  # the data-parallel mean, divided first as DDP does
            handles.append(dist.all_reduce(p.grad, async_op=True))
        for handle in handles:
            handle.wait()

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        # The Trainer maps the optimizer state onto the GPU in multi-GPU runs: for HiFT that is every
        # group's masters and moments at once. Map it to the CPU; load_state_dict copies group by group.
        from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME

        files = [os.path.join(checkpoint or "", name) for name in (OPTIMIZER_NAME, SCHEDULER_NAME)]
        if checkpoint is None or self.is_deepspeed_enabled or not all(map(os.path.isfile, files)):
            return super()._load_optimizer_and_scheduler(checkpoint)
        self.optimizer.load_state_dict(torch.load(files[0], map_location="cpu", weights_only=True))
        self.lr_scheduler.load_state_dict(torch.load(files[1], weights_only=True))


def with_hift(trainer_cls: type) -> type:
    """A subclass of ``trainer_cls`` (any transformers.Trainer subclass) that trains with HiFT."""
    from transformers import Trainer

    if not (isinstance(trainer_cls, type) and issubclass(trainer_cls, Trainer)):
        raise TypeError(f"with_hift needs a transformers.Trainer subclass, got {trainer_cls!r}")
    if issubclass(trainer_cls, HiFTTrainerMixin):
        return trainer_cls
    doc = f"{trainer_cls.__name__} training with HiFT: the same arguments plus ``hift={{...}}``."
    return type(f"HiFT{trainer_cls.__name__}", (HiFTTrainerMixin, trainer_cls),
                {"__module__": __name__, "__doc__": doc})


def __getattr__(name: str) -> type:
    # Built on first use, so that importing this module needs neither transformers nor trl.
    if name == "HiFTTrainer":
        from transformers import Trainer
        cls = with_hift(Trainer)
    elif name == "HiFTSFTTrainer":
        try:
            from trl import SFTTrainer
        except ImportError:
            raise ImportError("HiFTSFTTrainer needs TRL: pip install 'hift-ds[hf]' (or pip install trl)") from None
        cls = with_hift(SFTTrainer)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = cls
    return cls
