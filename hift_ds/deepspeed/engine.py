"""``hift_ds.initialize``: a DeepSpeed engine whose optimizer is a HiFTOptimizer.

The config is first turned into a ``Plan`` (``hift_ds.deepspeed.plan``), where every rule is
checked; this module only acts on it: it sets up the process, builds the HiFT optimizer, the LR
schedule in cycles and DeepSpeed's engine (at ZeRO stage 0, with HiFT's precision, clipping and
sharding), and wires the two together. At stage 3 the model is partitioned by DeepSpeed's ZeRO-3
machinery (``hift_ds.distributed.zero3``). DeepSpeed's throughput timer runs
unsynchronized unless the config asks for timers: a device synchronize each step would serialize the
offload copies with compute (docs/architecture.md).
"""
from __future__ import annotations

import argparse
import copy
import inspect
import logging
import os
import socket
from typing import Any

import torch
from torch import nn

from hift_ds.config import load_ds_config
from hift_ds.deepspeed.plan import Plan, build_plan, thawed
from hift_ds.deepspeed.scheduler import scheduler_from_config
from hift_ds.distributed import is_main_process, zero3
from hift_ds.distributed.zero12 import Zero12Sharding
from hift_ds.optim.optimizer import HiFTOptimizer
from hift_ds.precision import cast_parameters
from hift_ds.schedule import CycleLRScheduler
from hift_ds.units import trainable_parameters

logger = logging.getLogger(__name__)

# Set by a launcher (deepspeed, torchrun, accelerate; mpirun or srun through MPI/PMI) or by a platform
# whose environment DeepSpeed translates itself (AzureML, SageMaker).
_LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK",
                 "MV2_COMM_WORLD_SIZE", "AZUREML_EXPERIMENT_ID", "SM_TRAINING_ENV")
# DeepSpeed's throughput timer, left to its defaults, synchronizes the device at every forward start and
# after every step(): the next group's prefetch (and every other queued copy) must finish before the next
# forward is even launched, so the offload copies cannot overlap compute. Unsynchronized it still reports
# samples/s (host clock) every steps_per_print steps.
UNSYNCHRONIZED_TIMERS = {"throughput": {"enabled": True, "synchronized": False}}
_timer_note_logged = False


def unsynchronize_throughput_timer(ds_config: dict) -> bool:
    """Give a config that asks for no timers an unsynchronized throughput timer; whether it was changed.

    A config with a "timers" block, or with "wall_clock_breakdown": true, asked for DeepSpeed's timing and keeps it.
    """
    if "timers" in ds_config or ds_config.get("wall_clock_breakdown"):
        return False
    ds_config["timers"] = copy.deepcopy(UNSYNCHRONIZED_TIMERS)
    return True


def _note_unsynchronized_timer() -> None:
    global _timer_note_logged
    if _timer_note_logged or not is_main_process():
        return
    _timer_note_logged = True
    logger.info('HiFT: DeepSpeed\'s throughput timer runs unsynchronized ("timers": {"throughput": {"synchronized": '
                'false}}): synchronized, it would wait for the offload copies at every step. To get it back, add '
                '"timers": {"throughput": {"enabled": true, "synchronized": true}} to the DeepSpeed config')


def single_process_env() -> None:
    """Give a launcher-less process the environment DeepSpeed expects: one rank on a free local port."""
    # Without these DeepSpeed falls back to MPI discovery; values a launcher already set are kept.
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])


def launcher_env_present() -> bool:
    """Whether a launcher or a platform DeepSpeed knows has set up this process's distributed environment."""
    return torch.distributed.is_initialized() or any(key in os.environ for key in _LAUNCHER_ENV)


def _device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if acc.device_name() == "cpu":
        return torch.device("cpu")
    return torch.device(acc.device_name(int(os.environ.get("LOCAL_RANK", "0"))))


def _world_size() -> int:
    import deepspeed.comm as dist

    return dist.get_world_size() if dist.is_initialized() else 1


def _reduces_fp16() -> bool:
    # DeepSpeed's engine all-reduces only the dtypes its accelerator lists (the CPU one: fp32, bf16).
    from deepspeed.accelerator import get_accelerator

    return torch.float16 in get_accelerator().supported_dtypes()


def initialize(args: Any = None, model: nn.Module | None = None, model_parameters: Any = None,
               training_data: Any = None, lr_scheduler: Any = None, config: Any = None, **kwargs):
    """``deepspeed.initialize`` with a HiFT optimizer built from the config's "hift" block."""
    import deepspeed

    if model is None:
        raise ValueError("hift_ds.initialize needs model=<your nn.Module>")
    if config is None:  # DeepSpeed's deprecated name for config, then --deepspeed_config
        config = kwargs.pop("config_params", None)
    if config is None and args is not None:
        config = getattr(args, "deepspeed_config", None)
    if config is None:
        raise ValueError("no DeepSpeed config: pass config=<dict or path> or --deepspeed <path>")
    ds_config = load_ds_config(config)
    if kwargs.get("optimizer") is not None:
        raise ValueError("hift_ds.initialize builds the optimizer from the config's \"optimizer\" block; "
                         "do not pass optimizer=")
    plan = build_plan(ds_config, model_parallel=kwargs.get("mpu") is not None)
    if plan.scheduler is not None and lr_scheduler is not None:
        raise ValueError("an LR scheduler is both in the config and passed as lr_scheduler=; keep one")
    _check_model_parameters(model, model_parameters)
    if not ds_config.get("optimizer"):
        logger.info("no \"optimizer\" block in the DeepSpeed config: using AdamW with its defaults")

    if not launcher_env_present():
        # A plain `python script.py` runs as one process, as it does with the HF Trainer; without
        # this DeepSpeed would go looking for MPI (and fail on the missing mpi4py).
        single_process_env()
        logger.info("HiFT: no launcher environment (RANK, WORLD_SIZE, ...): running as a single process")
    deepspeed.init_distributed(dist_backend=kwargs.get("dist_backend"))
    world = _world_size()
    plan.check_fp16_reduction(world, _reduces_fp16())
    model, optimizer = _hift_optimizer(plan, model)
    lr_scheduler = _cycle_scheduler(plan, lr_scheduler, optimizer)

    engine_config = plan.deepspeed_config()
    if unsynchronize_throughput_timer(engine_config):
        _note_unsynchronized_timer()
    if args is not None and getattr(args, "deepspeed_config", None) is not None:
        args = copy.copy(args) if not isinstance(args, argparse.Namespace) else argparse.Namespace(**vars(args))
        args.deepspeed_config = None  # the plan's config below replaces the file
    engine, ds_opt, loader, sched = deepspeed.initialize(
        args=args, model=model, model_parameters=None, training_data=training_data, lr_scheduler=lr_scheduler,
        optimizer=optimizer, config=engine_config, **{k: v for k, v in kwargs.items() if k != "optimizer"})
    # DeepSpeed has just broadcast rank 0's weights into the model; the masters must follow.
    optimizer.sync_masters_from_model()
    _resync_after_partial_loads(engine, optimizer)
    if plan.zero.stage or world == 1:
        # Stages 1/2: the optimizer reduce-scatters the active group itself. One process: there is
        # nothing to reduce, and DeepSpeed's CPU all-reduce would refuse fp16 gradients.
        engine.enable_backward_allreduce = False
    if optimizer.reduces_in_backward:
        _arm_reduction_in_backward(engine, optimizer)
    if plan.zero.stage == 3:
        zero3.attach_to_engine(engine, optimizer, thawed(plan.zero.block))
    # DeepSpeed's own zero_grad sets every .grad to None, which would drop the optimizer's views
    # into its flat gradient buffer (the optimizer recovers, but at the cost of a copy).
    engine.zero_grad = lambda: optimizer.zero_grad()
    if plan.precision.loss_scaler is not None:
        _scale_engine_backward(engine, optimizer)
    return engine, ds_opt, loader, sched


def _check_model_parameters(model: nn.Module, model_parameters: Any) -> None:
    if model_parameters is None:  # habitually passed as model.parameters(); a subset cannot be honoured
        return
    given = {id(p) for item in model_parameters for p in (item["params"] if isinstance(item, dict) else [item])}
    if not given >= {id(p) for _, p in trainable_parameters(model)}:
        raise ValueError("model_parameters= leaves out some of the model's trainable parameters, but HiFT trains "
                         "every one of them group by group; set requires_grad=False on those to keep frozen, "
                         "or drop model_parameters=")


def _hift_optimizer(plan: Plan, model: nn.Module) -> tuple[nn.Module, HiFTOptimizer]:
    # The model in the plan's dtype on this rank's device (stage 3: partitioned by DeepSpeed, which
    # gathers and releases each module's weights), and the HiFT optimizer over it.
    dtype = plan.precision.dtype
    if plan.zero.stage == 3:
        sharding = zero3.Zero3Sharding(zero3.partition_model(model, plan.partition_config(), dtype, _device()))
    else:
        model = cast_parameters(model.to(_device()), dtype)
        sharding = Zero12Sharding(plan.zero.stage, **plan.zero.sharding_kwargs()) if plan.zero.stage else None
    return model, HiFTOptimizer(model, plan.optimizer.name, loss_scaler=plan.precision.make_loss_scaler(),
                                max_grad_norm=plan.max_grad_norm, sharding=sharding, **plan.hift.optimizer_kwargs(),
                                **plan.optimizer.kwargs())


def _cycle_scheduler(plan: Plan, lr_scheduler: Any, optimizer: HiFTOptimizer) -> CycleLRScheduler | None:
    # The config's schedule with its step counts in cycles, or the caller's (a scheduler or a
    # callable building one), advanced once per cycle either way.
    if plan.scheduler is not None:
        return CycleLRScheduler(scheduler_from_config(plan.scheduler_block(), optimizer), optimizer)
    if lr_scheduler is None:
        return None
    if callable(lr_scheduler) and not hasattr(lr_scheduler, "step"):
        lr_scheduler = lr_scheduler(optimizer)
    return CycleLRScheduler(lr_scheduler, optimizer)


def _resync_after_partial_loads(engine, optimizer: HiFTOptimizer) -> None:
    # A load without optimizer states replaces the weights but not the masters the next update
    # reads, and may restore the LR scheduler while the optimizer's cycle count starts over.
    load = engine.load_checkpoint
    signature = inspect.signature(load)

    def load_checkpoint(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        partial = bound.arguments["load_module_only"] or not bound.arguments["load_optimizer_states"]
        if partial and optimizer.sharding.stage == 3:
            raise ValueError("at ZeRO stage 3 the checkpoint's weights live in the HiFT optimizer state (the module "
                             "state holds empty partitions), so load_module_only=True / load_optimizer_states=False "
                             "cannot restore them; load the whole checkpoint, or start from a consolidated 16-bit "
                             "model (launch/train.py's final/, engine.save_16bit_model)")
        try:
            out = load(*args, **kwargs)
        except RuntimeError as e:
            if "size mismatch" not in str(e):
                raise
            raise ValueError(f"the checkpoint's module weights do not fit this model ({str(e).splitlines()[-1].strip()}"
                             "); a checkpoint saved at ZeRO stage 3 resumes only at stage 3 (on any number of ranks) "
                             "and one saved at stage 0/1/2 only at those stages; also check it is the same model") \
                from None
        loaded = out[0] is not None
        if loaded and partial:
            optimizer.sync_masters_from_model()
            # The scheduler may have been restored while the optimizer restarts at cycle 0: it
            # must count cycles from here, or the LR would stay put until the old count is reached.
            if isinstance(engine.lr_scheduler, CycleLRScheduler):
                engine.lr_scheduler.restart_cycle_count()
        return out

    engine.load_checkpoint = load_checkpoint


def _arm_reduction_in_backward(engine, optimizer: HiFTOptimizer) -> None:
    # ZeRO-2: gradients are reduced while the last micro-batch's backward produces them.
    backward = engine.backward

    def reducing_backward(loss, *args, **kwargs):
        optimizer.reduce_in_next_backward(engine.is_gradient_accumulation_boundary())
        return backward(loss, *args, **kwargs)

    engine.backward = reducing_backward


def _scale_engine_backward(engine, optimizer: HiFTOptimizer) -> None:
    # DeepSpeed only scales the loss inside its own FP16 wrapper, which HiFT replaces.
    backward = engine.backward

    def scaled_backward(loss, *args, **kwargs):
        backward(loss * optimizer.loss_scale, *args, **kwargs)
        return loss

    engine.backward = scaled_backward
