"""BAdam as a DeepSpeed client optimizer, for ``launch/train.py --mode badam`` (a baseline to compare HiFT with).

BAdam (Luo et al., 2024; the ``badam`` package, MIT) runs AdamW on one block of parameters for
K optimizer steps, then switches to another block. The blocks here are hift-ds units
(embeddings, each transformer block, final norm + head), so BAdam and HiFT with ``group_size`` 1
cut a model the same way. What BAdam discards that HiFT keeps:

- **optimizer state**: at every switch the AdamW moments (and step counts) are dropped; a block
  that becomes active again starts from zero moments and restarts bias correction. HiFT keeps
  every group's state across cycles.
- **fp32 master weights**: only the active block has an fp32 copy; at a switch the block keeps
  only its bf16 weights, so the part of its updates below bf16 resolution is lost. HiFT keeps
  every group's fp32 masters (in host memory when offloaded).
- **LR schedule**: it advances every step, not once per cycle of blocks.

BAdam owns mixed precision (bf16 weights, an fp32 copy of the active block), so the DeepSpeed
engine underneath runs without its own bf16/fp16 machinery, at ZeRO stage 0.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from hift_ds.precision import cast_parameters
from hift_ds.units import discover_units

log = logging.getLogger(__name__)
BADAM_ORDERS = ("random", "ascending", "descending")  # "random" is what the BAdam README uses


def recommended_switch_every(num_examples: int, batch_size: int, num_blocks: int) -> int:
    """BAdam README's rule for K (steps per block): max(n / (B * D), 50), n examples, B effective batch, D blocks."""
    return max(round(num_examples / (batch_size * num_blocks)), 50)


def block_prefixes(model: nn.Module) -> list[list[str]]:
    """BAdam blocks as lists of full parameter names: one block per hift-ds unit, bottom to top."""
    blocks = [[name for name, _ in unit.params] for unit in discover_units(model)]
    # BAdam matches blocks by substring (`prefix in name`): make sure no name catches another's.
    for name, _ in model.named_parameters():
        owners = [i for i, b in enumerate(blocks) if any(p in name for p in b)]
        if len(owners) != 1:
            raise ValueError(f"parameter {name!r} falls in {len(owners)} BAdam blocks (substring matching); "
                             "this model's parameter names are not distinct enough for BAdam")
    return blocks


def active_block(optimizer) -> int | None:
    """Index of the block a BAdam BlockOptimizer trains now (its ``active_param_prefixs``), None if not BAdam's."""
    blocks, active = getattr(optimizer, "block_prefix_list", None), getattr(optimizer, "active_param_prefixs", None)
    if blocks is None or active is None:
        return None
    # BlockOptimizer appends its always-active modules (none here) to the block's prefixes.
    own = active[:len(active) - len(getattr(optimizer, "active_modules", []))]
    return blocks.index(own) if own in blocks else None


def build_badam(model: nn.Module, ds_config: dict, order: str = "random", switch_every: int = 0,
                num_examples: int = 0, world: int = 1):
    """(BlockOptimizer, DeepSpeed config for it); the model is cast to bf16 if the config asks for bf16.

    ``switch_every`` 0 takes BAdam's recommended interval for ``num_examples`` training examples
    and the config's effective batch (micro-batch x accumulation x ``world`` ranks).
    """
    try:
        from badam import BlockOptimizer
    except ImportError:
        raise ValueError("--mode badam needs the badam package: pip install 'hift-ds[train]' "
                         "(or pip install badam)") from None
    from hift_ds.deepspeed.plan import optimizer_from_config

    if order not in BADAM_ORDERS:
        raise ValueError(f"BAdam block order {order!r} is not one of {BADAM_ORDERS}")
    if switch_every < 0:
        raise ValueError(f"BAdam switch interval must be >= 1 step (0: BAdam's recommended), got {switch_every}")
    cfg = {k: v for k, v in ds_config.items() if k not in ("hift", "optimizer", "bf16", "fp16")}
    if ds_config.get("fp16", {}).get("enabled"):
        raise ValueError("--mode badam supports bf16 or fp32, not fp16 (BAdam has no loss scaling); use a bf16 "
                         "config such as ds_configs/hift.json")
    if (ds_config.get("zero_optimization") or {}).get("stage", 0) != 0:
        raise ValueError("--mode badam runs at ZeRO stage 0 (BAdam switches the trainable block, which DeepSpeed's "
                         "ZeRO-1/2 cannot follow); use a config with zero_optimization.stage 0")
    name, params = optimizer_from_config(ds_config.get("optimizer"))
    if name != "adamw":
        raise ValueError(f"--mode badam runs AdamW (BAdam's update); the config asks for {name}")
    if ds_config.get("bf16", {}).get("enabled"):
        cast_parameters(model, torch.bfloat16)  # BAdam's mixed precision: fp32 copy of the active block only
    blocks = block_prefixes(model)
    if switch_every == 0:
        batch = ds_config.get("train_micro_batch_size_per_gpu", 1) * ds_config.get("gradient_accumulation_steps", 1)
        switch_every = recommended_switch_every(num_examples, batch * world, len(blocks))
    base = torch.optim.AdamW(model.parameters(), **params)
    optimizer = BlockOptimizer(base, list(model.named_parameters()), block_prefix_list=blocks,
                               switch_block_every=switch_every, switch_mode=order, verbose=0)
    log.info("BAdam: %d blocks (hift-ds units), switching every %d steps, %s order", len(blocks), switch_every,
             order)
    return optimizer, cfg
