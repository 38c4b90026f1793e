"""A DeepSpeed config with a "hift" block as a typed, validated plan: every config rule is checked here.

``hift_ds.initialize`` builds the plan first and then only acts on it; the HiFT Trainer checks its
DeepSpeed config with the same functions when it is constructed (``check_config``, ``zero_stage``);
launch/train.py reaches them through hift_ds.initialize. So one mistake gets one message, whichever
way it came in. Nothing here touches torch.distributed or a model: a config can be checked anywhere,
before anything is built.

What the plan decides for DeepSpeed: HiFT owns mixed precision (fp32 masters per group instead of
DeepSpeed's fp32 copy of every weight), loss scaling, gradient clipping and the LR schedule (stepped
once per cycle), so those blocks never reach ``deepspeed.initialize``. DeepSpeed's own ZeRO-1/2 cannot
wrap a rotating trainable set (docs/architecture.md): its engine runs stage 0 underneath, and at
stages 1-3 HiFT shards the active group itself.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch

from hift_ds.config import HiFTConfig, check_zero_stage, parse_hift_config
from hift_ds.deepspeed.scheduler import check_scheduler_block
from hift_ds.distributed.zero12 import DEFAULT_BUCKET_NUMEL
from hift_ds.distributed.zero3 import check_zero3_config
from hift_ds.optim.hyperparams import builtin_hyper
from hift_ds.precision import DynamicLossScaler, loss_scaler_settings

# DeepSpeed optimizer "type" -> HiFT built-in; DeepSpeed's "Adam" is AdamW unless adam_w_mode is false.
DS_OPTIMIZERS = {"adam": "adamw", "adamw": "adamw", "sgd": "sgd", "adagrad": "adagrad"}
_DS_ONLY_PARAMS = ("torch_adam", "adam_w_mode", "fused")
# Blocks HiFT takes over; none of them reaches deepspeed.initialize.
_HIFT_OWNED = ("hift", "optimizer", "scheduler", "bf16", "bfloat16", "fp16")
MISSING_HIFT = ('the DeepSpeed config has no "hift" block; add "hift": {"group_size": 1} (its default offload, "auto", '
                'keeps inactive groups\' state in pinned host memory when the model is on CUDA), or use '
                'deepspeed.initialize for plain full fine-tuning')


def _frozen(value: Any) -> Any:
    # JSON values made read-only all the way down: the plan is decided once and cannot drift.
    if isinstance(value, Mapping):
        return MappingProxyType({k: _frozen(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    return value


def thawed(value: Any) -> Any:
    """A fresh, mutable (dict / list) copy of a frozen plan value, for code that takes JSON dicts."""
    if isinstance(value, Mapping):
        return {k: thawed(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [thawed(v) for v in value]
    return value


def _block(value: Any, where: str) -> dict:
    """A config block that must be a JSON object when present ({} when absent or null)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f'the "{where}" config block must be a JSON object, got {type(value).__name__}')
    return dict(value)


@dataclass(frozen=True)
class Precision:
    """The weights' dtype and, for fp16, the loss scaler's settings (HiFT keeps the fp32 masters)."""

    dtype: torch.dtype = torch.float32
    loss_scaler: Mapping[str, Any] | None = None  # DynamicLossScaler keyword arguments; None: no loss scaling

    def make_loss_scaler(self) -> DynamicLossScaler | None:
        """A fresh loss scaler of these settings (None without fp16)."""
        return DynamicLossScaler(**self.loss_scaler) if self.loss_scaler is not None else None


@dataclass(frozen=True)
class OptimizerPlan:
    """The HiFT built-in optimizer a DeepSpeed "optimizer" block stands for, with its checked options."""

    name: str  # "adamw", "adam", "sgd" or "adagrad"
    params: Mapping[str, Any]  # its keyword arguments (DeepSpeed-only keys dropped, DeepSpeed's defaults applied)

    def kwargs(self) -> dict:
        """The options as keyword arguments for HiFTOptimizer (or a torch optimizer of the same kind)."""
        return thawed(self.params)


@dataclass(frozen=True)
class ZeroPlan:
    """The ZeRO stage HiFT shards at (DeepSpeed's engine runs stage 0 underneath) and its settings."""

    stage: int
    block: Mapping[str, Any]  # zero_optimization as given (stage 3 reads its gather-on-save setting)
    reduce_bucket_size: int = DEFAULT_BUCKET_NUMEL  # stage 2: elements per reduce-scatter bucket
    overlap_comm: bool = True  # stage 2: reduce each bucket while backward still runs

    def sharding_kwargs(self) -> dict:
        """HiFTOptimizer's sharding keyword arguments at stages 0-2 (bucketing is stage 2's alone)."""
        if self.stage != 2:
            return {}
        return {"reduce_bucket_size": self.reduce_bucket_size, "overlap_comm": self.overlap_comm}


@dataclass(frozen=True)
class Plan:
    """Everything hift_ds.initialize does, decided from the config alone and checked once."""

    hift: HiFTConfig  # the "hift" block
    precision: Precision
    max_grad_norm: float  # HiFT's clipping of the active group (0: off); DeepSpeed's own is set to 0
    optimizer: OptimizerPlan
    zero: ZeroPlan
    scheduler: Mapping[str, Any] | None  # the "scheduler" block, converted to cycles once the groups are known
    deepspeed: Mapping[str, Any]  # the config deepspeed.initialize gets: stage 0, no bf16/fp16, no clipping
    partition: Mapping[str, Any] | None  # stage 3: the config zero.Init partitions the model with

    def deepspeed_config(self) -> dict:
        """A fresh copy of the config for deepspeed.initialize."""
        return thawed(self.deepspeed)

    def partition_config(self) -> dict | None:
        """A fresh copy of the config zero.Init reads the precision and ZeRO-3 settings from (stage 3), else None."""
        return thawed(self.partition) if self.partition is not None else None

    def scheduler_block(self) -> dict | None:
        """A fresh copy of the "scheduler" block, or None."""
        return thawed(self.scheduler) if self.scheduler is not None else None

    def check_fp16_reduction(self, world: int, reduces_fp16: bool) -> None:
        """Refuse fp16 at stage 0 on several ranks where DeepSpeed's all-reduce cannot add fp16 gradients."""
        if self.precision.dtype == torch.float16 and world > 1 and self.zero.stage == 0 and not reduces_fp16:
            raise ValueError(f"fp16 at ZeRO stage 0 with {world} ranks is not supported on this device: DeepSpeed's "
                             "gradient all-reduce here (gloo on CPU) cannot reduce fp16 gradients; use \"bf16\": "
                             "{\"enabled\": true}, GPUs, or zero_optimization.stage 1 or 2 (HiFT reduces those "
                             "itself)")


def zero_stage(config: Mapping) -> int:
    """The ZeRO stage a DeepSpeed config asks for (0 when it names none), checked."""
    return check_zero_stage(_block(config.get("zero_optimization"), "zero_optimization").get("stage", 0))


def zero_plan(block: Any, *, model_parallel: bool = False) -> ZeroPlan:
    """The "zero_optimization" block as a ZeroPlan; settings HiFT cannot honour are refused, naming the fix."""
    block = _block(block, "zero_optimization")
    stage = check_zero_stage(block.get("stage", 0))
    if stage == 3:
        check_zero3_config(block)  # offload_param, hpZ, quantized weights: each with its stage-3 reason
    if model_parallel and stage:
        raise ValueError(f"model parallelism (mpu=) is not supported with zero_optimization.stage={stage} under "
                         "HiFT, which shards over the whole world; use stage 0")
    for key in ("offload_optimizer",) if stage == 3 else ("offload_optimizer", "offload_param"):
        if (_block(block.get(key), f"zero_optimization.{key}").get("device") or "none") != "none":
            raise ValueError(f'zero_optimization.{key} does not apply to HiFT; remove it and set "hift": {{"offload": '
                             '{"device": "cpu"}} (hift= for a HiFT trainer) to keep inactive groups\' masters and '
                             "state in host memory")
    if stage != 2:
        return ZeroPlan(stage, _frozen(block))
    bucket = block.get("reduce_bucket_size", DEFAULT_BUCKET_NUMEL)
    if isinstance(bucket, bool) or not isinstance(bucket, (int, float)) or not 1 <= bucket < math.inf:
        raise ValueError(f"zero_optimization.reduce_bucket_size must be a number of elements >= 1, got {bucket!r}")
    return ZeroPlan(stage, _frozen(block), int(bucket), bool(block.get("overlap_comm", True)))


def precision_plan(config: Mapping) -> Precision:
    """The dtype and loss scaling of the config's "bf16" (or its old name "bfloat16") and "fp16" blocks."""
    for key in ("amp", "torch_autocast"):
        if _block(config.get(key), key).get("enabled"):
            raise ValueError(f'"{key}" is not supported with the hift block; use "bf16": {{"enabled": true}} (bf16 '
                             'weights, fp32 masters kept by HiFT) or "fp16"')
    if "bfloat16" in config and "bf16" in config:  # "bfloat16": DeepSpeed's old name for the bf16 block
        raise ValueError('the config has both "bf16" and its old name "bfloat16"; keep "bf16"')
    bf16 = _block(config.get("bf16", config.get("bfloat16")), "bf16")
    fp16 = _block(config.get("fp16"), "fp16")
    if fp16.get("enabled"):
        if bf16.get("enabled"):
            raise ValueError("both bf16 and fp16 are enabled in the config; enable one")
        return Precision(torch.float16, _frozen(loss_scaler_settings(fp16)))
    return Precision(torch.bfloat16 if bf16.get("enabled") else torch.float32)


def clipping(config: Mapping) -> float:
    """HiFT's max_grad_norm from "gradient_clipping" (DeepSpeed's default when absent; null: off)."""
    # HiFT clips by the active group's norm (after unscaling); DeepSpeed must not clip as well: its
    # default is 1.0 when the key is absent, and it would clip fp16 gradients while still scaled.
    from deepspeed.runtime.constants import GRADIENT_CLIPPING_DEFAULT

    value = config.get("gradient_clipping", GRADIENT_CLIPPING_DEFAULT)
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"gradient_clipping must be >= 0 (0 disables clipping), got {value!r}")
    return float(value)


def optimizer_plan(block: Any) -> OptimizerPlan:
    """The HiFT built-in a DeepSpeed "optimizer" block names, its options checked (AdamW when there is none)."""
    block = _block(block, "optimizer")
    if not block:
        return OptimizerPlan("adamw", _frozen({}))
    kind = str(block.get("type", "")).lower()
    if kind not in DS_OPTIMIZERS:
        raise ValueError(f"optimizer.type: unknown optimizer {block.get('type')!r}; use one of Adam, AdamW, SGD, "
                         "Adagrad")
    params = _block(block.get("params"), "optimizer.params")
    name = DS_OPTIMIZERS[kind]
    if kind == "adam" and params.get("adam_w_mode", True) is False:
        name = "adam"
    for key in _DS_ONLY_PARAMS:
        params.pop(key, None)
    if name in ("adam", "adamw"):
        if params.pop("bias_correction", True) is not True:
            raise ValueError("optimizer.params.bias_correction=false is not supported with HiFT; remove it")
        # DeepSpeed's Adam/AdamW default to no weight decay (torch's AdamW to 0.01): a config
        # that works with plain DeepSpeed must train the same way here.
        params.setdefault("weight_decay", 0.0)
    try:
        builtin_hyper(name, params)  # HiFTOptimizer's own rules and messages, with the config key in front
    except (TypeError, ValueError) as e:
        raise ValueError(f"optimizer.params: {e}") from None
    return OptimizerPlan(name, _frozen(params))


def optimizer_from_config(block: dict | None) -> tuple[str, dict]:
    """(HiFT built-in name, its keyword arguments) of a DeepSpeed "optimizer" block: ``optimizer_plan`` as a pair."""
    plan = optimizer_plan(block)
    return plan.name, plan.kwargs()


def build_plan(config: Mapping, *, model_parallel: bool = False) -> Plan:
    """The plan of a DeepSpeed config (a dict, as ``load_ds_config`` returns it) with a "hift" block.

    ``model_parallel``: a model-parallel unit (``mpu=``) was passed, which HiFT's sharding cannot honour.
    """
    config = copy.deepcopy(dict(config))
    if "hift" not in config:
        raise ValueError(MISSING_HIFT)
    hift = parse_hift_config(config["hift"])
    zero = zero_plan(config.get("zero_optimization"), model_parallel=model_parallel)
    precision = precision_plan(config)
    max_grad_norm = clipping(config)
    optimizer = optimizer_plan(config.get("optimizer"))
    scheduler = check_scheduler_block(config.get("scheduler"))
    # zero.Init reads the precision and the ZeRO-3 settings from the config as written.
    partition = {k: v for k, v in config.items() if k != "hift"} if zero.stage == 3 else None
    for_deepspeed = {k: v for k, v in config.items() if k not in _HIFT_OWNED}
    for_deepspeed["zero_optimization"] = {**zero.block, "stage": 0}
    for_deepspeed["gradient_clipping"] = 0.0
    return Plan(hift=hift, precision=precision, max_grad_norm=max_grad_norm, optimizer=optimizer, zero=zero,
                scheduler=_frozen(scheduler), deepspeed=_frozen(for_deepspeed), partition=_frozen(partition))


def _without_auto(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _without_auto(v) for k, v in value.items() if not (isinstance(v, str) and v == "auto")}
    return value


def check_config(config: Mapping) -> None:
    """Every rule of ``build_plan`` on a config whose "auto" values are still to be filled in.

    The Trainer fills "auto" values (bucket sizes, schedule lengths) only once training starts, when
    hift_ds.initialize builds the plan of the filled config; until then the rest is checked here.
    The "hift" block keeps its own "auto" values (offload, kernel), which are settings of their own.
    """
    config = dict(config)
    hift = config.pop("hift", {})
    build_plan({**_without_auto(config), "hift": hift})
