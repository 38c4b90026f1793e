"""The Trainer's LR schedule (lr_scheduler_type, warm-up, max_steps) written in HiFT cycles.

The Trainer steps its scheduler after every optimizer step; HiFT's LR moves once per cycle of k
steps (docs/architecture.md, "LR schedule"). The schedule is therefore built with its lengths
converted to cycles and wrapped in a ``CycleLRScheduler``; ``get_last_lr`` reports the LR the last
optimizer step trained with, which is what the Trainer logs as ``learning_rate`` (under DeepSpeed
it asks only after the engine has already stepped the scheduler).
"""
from __future__ import annotations

import logging
import warnings
import weakref

from hift_ds.deepspeed.scheduler import warn_if_warmup_vanishes
from hift_ds.distributed import is_main_process
from hift_ds.hf.checks import option_value
from hift_ds.optim.optimizer import HiFTOptimizer
from hift_ds.schedule import CycleLRScheduler, steps_to_cycles, trainer_warmup_shift

logger = logging.getLogger(__name__)

# lr_scheduler_kwargs counted in optimizer steps (transformers.get_scheduler's WSD and inverse-sqrt options).
STEP_KWARGS = ("num_decay_steps", "num_stable_steps", "timescale")


class TrainerCycleLRScheduler(CycleLRScheduler):
    """CycleLRScheduler whose ``get_last_lr`` is the LR the last optimizer step trained with."""

    def __init__(self, scheduler, optimizer: HiFTOptimizer):
        super().__init__(scheduler, optimizer)
        self._trained_lr: list[float] | None = None
        me = weakref.ref(self)

        def record(opt, args, kwargs) -> None:
            sched = me()
            if sched is not None:
                sched._trained_lr = [group["lr"] for group in opt.param_groups]

        # A pre-hook sees the LR before anything (the engine's scheduler step) can move it.
        handle = optimizer.register_step_pre_hook(record)
        weakref.finalize(self, handle.remove)

    def get_last_lr(self) -> list[float]:
        """LR of every param group during the last optimizer step (the current LR before the first)."""
        return list(self._trained_lr) if self._trained_lr is not None else super().get_last_lr()


def trainer_schedule_in_cycles(args, optimizer: HiFTOptimizer, num_training_steps: int) -> TrainerCycleLRScheduler:
    """The schedule TrainingArguments describe, in cycles of ``optimizer.num_groups`` steps, advanced once per cycle."""
    from transformers import get_scheduler

    k = optimizer.num_groups
    total = steps_to_cycles(num_training_steps, k)
    warmup_steps = args.get_warmup_steps(num_training_steps)
    warmup = steps_to_cycles(warmup_steps, k)
    kwargs = dict(args.lr_scheduler_kwargs or {})
    for key in STEP_KWARGS:
        if isinstance(kwargs.get(key), int):
            kwargs[key] = steps_to_cycles(kwargs[key], k)
    # Cycle c trains at the schedule's step c + 1, not at the warm-up's LR 0 (trainer_warmup_shift).
    shift = trainer_warmup_shift(warmup)
    inner = get_scheduler(args.lr_scheduler_type, optimizer=optimizer, num_warmup_steps=warmup,
                          num_training_steps=total + shift.extra, scheduler_specific_kwargs=kwargs)
    with warnings.catch_warnings():  # torch warns that the optimizer has not stepped yet: intended
        warnings.simplefilter("ignore")
        for _ in range(shift.steps_in):
            inner.step()
    if is_main_process():
        # The warm-up starts at LR 0 (transformers' schedules); cycle 0 trains at the LR it has now.
        warn_if_warmup_vanishes(warmup_steps, k, 0.0, float(inner.get_last_lr()[0]), float(inner.base_lrs[0]),
                                "warmup_steps (or warmup_ratio)")
        logger.info("HiFT: %s LR schedule advances once per cycle of %d steps: %d steps -> %d cycles, warm-up "
                    "%d steps -> %d cycles%s", option_value(args.lr_scheduler_type), k,
                    num_training_steps, total, warmup_steps, warmup,
                    " (cycle c trains at the schedule's step c + 1)" if shift.steps_in else "")
    return TrainerCycleLRScheduler(inner, optimizer)
