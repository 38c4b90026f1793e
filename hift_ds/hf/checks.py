"""What a Hugging Face Trainer may ask of HiFT: every refusal, checked before anything is built.

Each check raises one ValueError/TypeError naming the setting and what to do instead. They run when
the trainer is constructed (with the arguments given) and again on what the Trainer made of them
(a model TRL loaded from a name, default TrainingArguments), so a bad combination stops before a
HiFT optimizer or DeepSpeed engine exists. A DeepSpeed config is checked by hift_ds.initialize's
own rules (``hift_ds.deepspeed.plan``); only what the Trainer itself cannot do is refused here.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from hift_ds.config import HiFTConfig, parse_hift_config
from hift_ds.deepspeed.plan import check_config, zero_stage  # hift_ds.initialize's rules, messages and all

logger = logging.getLogger(__name__)

# TrainingArguments.optim values that mean the AdamW HiFT builds from the same arguments.
ADAMW_OPTIMS = ("adamw_torch", "adamw_torch_fused")
# Schedules the Trainer steps on evaluation metrics, not per optimizer step: nothing to convert to cycles.
METRIC_SCHEDULES = ("reduce_lr_on_plateau", "greedy")


def option_value(value: Any) -> str:
    """A TrainingArguments choice (an enum member or a string) as its string value."""
    return str(getattr(value, "value", value))


def check_hift_block(hift: Any, ds_config: dict | None) -> tuple[HiFTConfig, dict]:
    """The validated HiFT settings and their raw block, from ``hift=`` or the DeepSpeed config."""
    if hift is not None and ds_config is not None and "hift" in ds_config:
        raise ValueError('HiFT settings are given twice: as hift= and as the DeepSpeed config\'s "hift" block; '
                         "keep one of them")
    block = hift if hift is not None else (ds_config or {}).get("hift", {})
    return parse_hift_config(block), block


def check_model(model: Any, deepspeed: bool) -> None:
    """Refuse models HiFT cannot train through the Trainer: PEFT adapters, fp16 weights without DeepSpeed."""
    if not isinstance(model, nn.Module):
        return  # a name TRL loads later, or model_init: checked once the model exists
    if getattr(model, "peft_config", None) is not None or getattr(model, "_hf_peft_config_loaded", False):
        raise ValueError(
            f"{type(model).__name__} carries PEFT adapters (LoRA, ...), but HiFT is full-parameter fine-tuning: it "
            "would train only the adapters, group by group, which saves nothing over plain LoRA. Either fine-tune "
            "the full model with HiFT (model.merge_and_unload(), or the base model without peft_config), or train "
            "the adapters with the plain Trainer")
    dtypes = {p.dtype for p in model.parameters() if p.requires_grad}
    if torch.float16 in dtypes and not deepspeed:
        raise ValueError(
            "the model's weights are float16, which needs HiFT's loss scaling, and the Trainer does not scale the "
            "loss for it; load the model in bfloat16 (fp32 masters are kept by HiFT) or float32 (with fp16=True "
            "for autocast), or use --deepspeed with fp16 enabled")


def check_training_arguments(args: Any, optimizer_cls_and_kwargs: Any) -> dict | None:
    """Refuse TrainingArguments that conflict with HiFT; the DeepSpeed config (or None) once checked."""
    if args is None:
        return None
    optim = option_value(args.optim)
    if optim not in ADAMW_OPTIMS:
        raise ValueError(f"optim={optim!r} is set, but HiFT builds its own optimizer (AdamW from learning_rate, "
                         "adam_beta1/2, adam_epsilon, weight_decay); remove optim=, or pass optimizer_cls_and_kwargs="
                         "(torch.optim.SGD, {...}) for another torch optimizer")
    if args.optim_args:
        raise ValueError(f"optim_args={args.optim_args!r} is set, but HiFT builds its own optimizer; remove it and set "
                         "the optimizer's options with TrainingArguments (learning_rate, adam_*, weight_decay)")
    if getattr(args, "fsdp", None):
        raise ValueError("fsdp= is set: FSDP shards every parameter, HiFT trains one group per step and shards "
                         "that group itself; use deepspeed= with ZeRO stage 1 or 2, or plain DDP (torchrun)")
    if args.n_gpu > 1:
        raise ValueError(f"this process drives {args.n_gpu} GPUs (torch.nn.DataParallel), which HiFT does not "
                         "support; launch one process per GPU with torchrun --nproc_per_node N")
    ds_config = args.hf_deepspeed_config.config if getattr(args, "hf_deepspeed_config", None) else None
    if ds_config is None:
        return None
    stage = zero_stage(ds_config)
    if stage == 3:
        raise ValueError(f"zero_optimization.stage={stage} in the DeepSpeed config is not supported by the HiFT "
                         "Trainer; use stage 0, 1 or 2 (HiFT shards the active group's masters and state itself at "
                         "stages 1/2), or train at ZeRO-3 with hift_ds.initialize or launch/train.py")
    if optimizer_cls_and_kwargs is not None:
        raise ValueError("optimizer_cls_and_kwargs= is set together with deepspeed=; with DeepSpeed the optimizer "
                         'comes from the config\'s "optimizer" block (Adam, AdamW, SGD, Adagrad): set it there')
    schedule = option_value(args.lr_scheduler_type)
    if schedule in METRIC_SCHEDULES:
        raise ValueError(f"lr_scheduler_type={schedule!r} steps on evaluation metrics, which the DeepSpeed engine "
                         "cannot do; use a step-based schedule (linear, cosine, ...) or run without deepspeed=")
    return ds_config


def check_trainer_inputs(hift: Any, model: Any, args: Any, optimizers: Any, optimizer_cls_and_kwargs: Any,
                         peft_config: Any = None) -> tuple[HiFTConfig, dict]:
    """Every check on a HiFT trainer's inputs; the validated HiFT settings and their raw block."""
    if hift is not None and not isinstance(hift, dict):
        raise TypeError(f"hift= must be a dict of HiFT settings (group_size, strategy, ...), got {type(hift).__name__}")
    if optimizers is not None and any(x is not None for x in optimizers):
        raise ValueError("optimizers= is set, but HiFT builds the optimizer (one group trained per step) and the LR "
                         "schedule (advanced once per cycle) itself; drop optimizers= and set lr_scheduler_type, "
                         "warmup_steps and the optimizer's TrainingArguments, or optimizer_cls_and_kwargs=")
    if optimizer_cls_and_kwargs is not None:
        cls = optimizer_cls_and_kwargs[0] if isinstance(optimizer_cls_and_kwargs, (tuple, list)) else None
        if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)) or len(optimizer_cls_and_kwargs) != 2:
            raise TypeError("optimizer_cls_and_kwargs must be (a torch.optim.Optimizer subclass, dict of its "
                            f"options), got {optimizer_cls_and_kwargs!r}")
    if peft_config is not None:
        raise ValueError("peft_config= is set, but HiFT is full-parameter fine-tuning and would train only the "
                         "adapters; drop peft_config= to fine-tune the full model with HiFT, or train the adapters "
                         "with the plain trainer")
    ds_config = check_training_arguments(args, optimizer_cls_and_kwargs)
    settings, block = check_hift_block(hift, ds_config)
    if ds_config is not None:  # the rest of the config, as hift_ds.initialize will check it once it is filled
        check_config({**ds_config, "hift": block})
    check_model(model, deepspeed=ds_config is not None)
    return settings, block
