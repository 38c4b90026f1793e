"""The ``"hift"`` block of a DeepSpeed JSON config, validated with pydantic as DeepSpeed does.

The one place HiFT's settings are checked: ``parse_hift_config`` for the block (hift_ds.initialize,
the Trainer's ``hift=``, launch/train.py), ``hift_settings`` for HiFTOptimizer's keyword arguments,
so the same mistake gets the same message whichever way it came in.
"""
from __future__ import annotations

import json
import os
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from hift_ds.schedule import check_strategy

# ZeRO stages a DeepSpeed config may name; which of them an entry point supports is its own rule.
ZERO_STAGES = (0, 1, 2, 3)


class OffloadConfig(BaseModel):
    """Where inactive groups' masters and optimizer state live."""

    model_config = ConfigDict(extra="forbid")
    # "auto": pinned host memory when the model is on CUDA (where it saves device memory), none on CPU.
    device: Literal["auto", "cpu", "none"] = "auto"
    pin_memory: bool = True
    prefetch: bool = True
    # Device buffers, each one group's masters + state: with more, copies run further ahead of the step that
    # needs them (a lead of about `slots` steps); one still overlaps both copy directions, chunk by chunk.
    slots: Literal[1, 2, 3] = 2
    chunk_mib: int = 128  # copies move in chunks of this many MiB (one event each)

    @field_validator("chunk_mib")
    @classmethod
    def _chunk(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"must be >= 1 (MiB), got {v}")
        return v


class HiFTConfig(BaseModel):
    """Settings of the HiFT optimizer wrapper (``"hift": {...}`` in the DeepSpeed config)."""

    model_config = ConfigDict(extra="forbid")
    group_size: Optional[int] = None
    num_groups: Optional[int] = None
    strategy: str = "bottom2up"
    seed: int = 0
    units: Optional[list[str]] = None
    offload: OffloadConfig = OffloadConfig()
    kernel: Literal["auto", "triton", "torch"] = "auto"

    @field_validator("strategy")
    @classmethod
    def _strategy(cls, v: str) -> str:
        return check_strategy(v)

    @field_validator("group_size", "num_groups")
    @classmethod
    def _positive(cls, v: Optional[int]) -> Optional[int]:
        if v is not None and v < 1:
            raise ValueError(f"must be >= 1, got {v}")
        return v

    @model_validator(mode="after")
    def _one_of(self) -> "HiFTConfig":
        if self.group_size is not None and self.num_groups is not None:
            raise ValueError(f"set either group_size ({self.group_size}) or num_groups ({self.num_groups}), not both")
        return self

    def optimizer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``HiFTOptimizer`` (everything but the optimizer's own)."""
        kw = dict(strategy=self.strategy, seed=self.seed, units=self.units, offload=self.offload.device,
                  pin_memory=self.offload.pin_memory, prefetch=self.offload.prefetch,
                  offload_slots=self.offload.slots, offload_chunk_mib=self.offload.chunk_mib, kernel=self.kernel)
        group_size, num_groups = self.grouping()
        kw.update({"num_groups": num_groups} if num_groups is not None else {"group_size": group_size})
        return kw

    def grouping(self) -> tuple[int | None, int | None]:
        """(group_size, num_groups) for ``units.group_units``: exactly one is set (group_size 1 by default)."""
        if self.num_groups is not None:
            return None, self.num_groups
        return self.group_size or 1, None


def parse_hift_config(block: Any) -> HiFTConfig:
    """Validate a ``"hift"`` block; errors name the offending key and the valid ones."""
    if not isinstance(block, dict):
        raise TypeError(f'the "hift" config block must be a JSON object, got {type(block).__name__}')
    try:
        return HiFTConfig(**block)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            where = ".".join(str(x) for x in err["loc"])
            if err["type"] == "extra_forbidden":
                model = OffloadConfig if err["loc"][0] == "offload" and len(err["loc"]) > 1 else HiFTConfig
                problems.append(f"unknown key {where!r} (valid keys: {', '.join(model.model_fields)})")
            elif err["type"] == "value_error":  # one of the validators above: its message already names the value
                problems.append(f"{where}: {err['ctx']['error']}" if where else str(err["ctx"]["error"]))
            else:
                problems.append(f"{where or 'hift'}: {err['msg']} (got {err.get('input')!r})")
        raise ValueError('invalid "hift" settings: ' + "; ".join(problems)) from None


def hift_settings(*, group_size: int | None = None, num_groups: int | None = None, strategy: str = "bottom2up",
                  seed: int = 0, units: list[str] | None = None, offload: str = "auto", pin_memory: bool = True,
                  prefetch: bool = True, offload_slots: int = 2, offload_chunk_mib: int = 128,
                  kernel: str = "auto") -> HiFTConfig:
    """HiFTOptimizer's keyword arguments checked as the "hift" block is: the same rules, the same messages.

    An error names the block's key (``offload.slots`` for ``offload_slots``, ``offload.chunk_mib`` for
    ``offload_chunk_mib``, ``offload.device`` for ``offload``), as it does for a config.
    """
    return parse_hift_config({
        "group_size": group_size, "num_groups": num_groups, "strategy": strategy, "seed": seed, "units": units,
        "offload": {"device": offload, "pin_memory": pin_memory, "prefetch": prefetch, "slots": offload_slots,
                    "chunk_mib": offload_chunk_mib},
        "kernel": kernel})


def check_zero_stage(stage: Any, key: str = "zero_optimization.stage") -> int:
    """``stage`` if it is a ZeRO stage (0-3); the one message for any other value, naming ``key``."""
    if stage not in ZERO_STAGES:
        raise ValueError(f"{key}={stage!r} is not one of 0, 1, 2, 3")
    return stage


def load_ds_config(config: Any) -> dict:
    """A DeepSpeed config given as a dict or a JSON file path, as a fresh dict."""
    if isinstance(config, dict):
        return json.loads(json.dumps(config))
    if isinstance(config, (str, os.PathLike)):
        path = os.fspath(config)
        if not os.path.isfile(path):
            raise ValueError(f"DeepSpeed config file {path!r} does not exist; pass --deepspeed <path to a JSON "
                             "config>, e.g. ds_configs/hift.json")
        try:
            with open(path) as f:
                return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"DeepSpeed config {path!r} is not valid JSON: {e}") from None
    raise TypeError(f"config must be a dict or a path to a JSON file, got {type(config).__name__}")
