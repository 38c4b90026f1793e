"""``deepspeed=`` through the Trainer: accelerate's ``deepspeed.initialize`` call builds hift_ds.initialize's engine.

The Trainer hands the model, the DeepSpeed config (its "auto" values filled from TrainingArguments)
and its LR schedule to accelerate, which calls ``deepspeed.initialize`` itself. While a HiFT trainer
trains, that one call for its model goes to ``hift_ds.initialize`` with the same arguments, so the
engine is exactly the one the DeepSpeed path builds: ZeRO stage 0 underneath with HiFT's own
sharding at stages 1/2, HiFT's mixed precision (no fp32 copy of every parameter), clipping and
loss scaling, and the schedule stepped once per cycle. Every other call passes through untouched.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from hift_ds.deepspeed.engine import initialize as hift_initialize
from hift_ds.hf.checks import check_model
from hift_ds.hf.schedule import TrainerCycleLRScheduler
from hift_ds.schedule import CycleLRScheduler


def add_optimizer_block(ds_config: dict, args) -> None:
    """Give a config without an "optimizer" block the AdamW the Trainer would build from TrainingArguments."""
    # hift_ds.initialize builds the optimizer from this block; without it the Trainer would build a
    # torch optimizer over every parameter and hand it to DeepSpeed.
    ds_config.setdefault("optimizer", {"type": "AdamW", "params": {
        "lr": args.learning_rate, "betas": [args.adam_beta1, args.adam_beta2], "eps": args.adam_epsilon,
        "weight_decay": args.weight_decay}})


def _engine(hift_block: dict, model, config_params: dict, lr_scheduler: Any = None, optimizer: Any = None,
            **kwargs) -> tuple:
    if optimizer is not None:  # add_optimizer_block makes the Trainer pass a DummyOptim, i.e. none here
        raise RuntimeError("internal: the Trainer passed a built optimizer to DeepSpeed under HiFT")
    config = dict(config_params)
    config.setdefault("hift", hift_block)
    if callable(lr_scheduler) and not hasattr(lr_scheduler, "step"):
        # The Trainer's own schedule (no "scheduler" block): the trainer builds it in cycles already
        # wrapped; initialize wraps what it gets, so it gets the inner schedule.
        trainer_schedule = lr_scheduler
        lr_scheduler = lambda opt: trainer_schedule(opt).scheduler  # noqa: E731
    engine, optimizer, loader, scheduler = hift_initialize(model=model, config=config, lr_scheduler=lr_scheduler,
                                                           **kwargs)
    if type(scheduler) is CycleLRScheduler:  # report the LR each step trained with, as the Trainer logs it
        scheduler = TrainerCycleLRScheduler(scheduler.scheduler, optimizer)
        engine.lr_scheduler = scheduler
    return engine, optimizer, loader, scheduler


@contextlib.contextmanager
def hift_engine_for(trainer, hift_block: dict, ds_config: dict) -> Iterator[None]:
    """While open, ``deepspeed.initialize(model=trainer.model, ...)`` builds a HiFT engine; other calls pass through."""
    import deepspeed

    # accelerate treats every "auto" value in the config as its own to fill and fails on the HiFT
    # block's (kernel: "auto"): the block stays out of the config while accelerate reads it.
    saved = ds_config.pop("hift", None)
    original = deepspeed.initialize
    building = False

    def initialize(*args, **kwargs):
        nonlocal building
        # hift_ds.initialize calls deepspeed.initialize itself: that inner call must reach DeepSpeed.
        # trainer.model, read now: model_init replaces the model inside train().
        if building or args or kwargs.get("model") is not trainer.model:
            return original(*args, **kwargs)
        building = True
        try:
            check_model(trainer.model, deepspeed=True)
            return _engine(hift_block, **kwargs)
        finally:
            building = False

    deepspeed.initialize = initialize
    try:
        yield
    finally:
        deepspeed.initialize = original
        if saved is not None:
            ds_config["hift"] = saved
