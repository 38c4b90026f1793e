"""The config's ``"scheduler"`` block as a DeepSpeed LR schedule that moves once per HiFT cycle.

Step counts in the block are written in optimizer steps, as for plain DeepSpeed; under HiFT the
schedule advances once per cycle (k steps, one per group), so they are converted to cycles. The
conversion is logged once, in words, and a run too short to train every group or to reach the
peak LR is warned about.
"""
from __future__ import annotations

import logging
import math
from typing import Any

from hift_ds.distributed import is_main_process
from hift_ds.schedule import DEEPSPEED_WARMUP_SCHEDULES, deepspeed_warmup_shift, steps_to_cycles

logger = logging.getLogger(__name__)

WARMUP_SCHEDULES = DEEPSPEED_WARMUP_SCHEDULES
# Scheduler parameters counted in optimizer steps, which HiFT converts to cycles.
STEP_PARAMS = ("warmup_num_steps", "total_num_steps", "cycle_first_step_size", "cycle_second_step_size",
               "decay_step_size", "lr_range_test_step_size")
# Share of the peak LR below which a run counts as not reaching it (a cosine never quite does).
_PEAK_TOLERANCE = 0.01


def check_scheduler_block(block: Any) -> dict | None:
    """The "scheduler" block if DeepSpeed has its type and its step counts are integers; else a ValueError."""
    if block is None:
        return None
    from deepspeed.runtime import lr_schedules

    if not isinstance(block, dict):
        raise ValueError(f'the "scheduler" config block must be a JSON object, got {type(block).__name__}')
    kind = block.get("type")
    if getattr(lr_schedules, str(kind), None) is None or kind not in lr_schedules.VALID_LR_SCHEDULES:
        raise ValueError(f"scheduler type {kind!r} is not one of DeepSpeed's {lr_schedules.VALID_LR_SCHEDULES}")
    params = block.get("params") or {}
    if not isinstance(params, dict):
        raise ValueError(f'scheduler.params must be a JSON object, got {type(params).__name__}')
    for key in STEP_PARAMS:
        value = params.get(key)
        if value == "auto":
            raise ValueError(f"scheduler.params.{key} is \"auto\", which only launch/train.py fills in (from the "
                             "data size and epochs); set it to a number of optimizer steps")
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"scheduler.params.{key} must be an integer number of optimizer steps, got {value!r}")
    return block


def _cycles(n: int) -> str:
    return f"{n} cycle{'s' if n != 1 else ''}"


def convert_steps_to_cycles(kind: str | None, params: dict, num_groups: int) -> tuple[dict, dict[str, str]]:
    """Step counts converted to cycles, and per converted key how the number came about, in words.

    A warm-up schedule placed by HiFT (``deepspeed_warmup_shift``) gets extra cycles in
    ``total_num_steps``: it starts one iteration in, so that no cycle trains at warmup_min_lr,
    and its last cycle must still be above the floor.
    """
    out, how = dict(params), {}
    for key in STEP_PARAMS:
        steps = params.get(key)
        if steps is not None and steps > 0:
            out[key] = steps_to_cycles(steps, num_groups)
            how[key] = f"{steps} steps / {num_groups} per cycle, rounded up = {_cycles(out[key])}"
    warm, total = out.get("warmup_num_steps"), out.get("total_num_steps")
    if isinstance(warm, int) and isinstance(total, int) and warm >= total:
        # A run shorter than its warm-up in cycles: keep DeepSpeed's invariant warmup < total.
        out["total_num_steps"] = warm + 1
        how["total_num_steps"] += f", raised to {warm + 1} to stay above the {_cycles(warm)} of warm-up"
    extra = deepspeed_warmup_shift({"type": kind, "params": params}).extra
    if extra and isinstance(total, int):
        out["total_num_steps"] += extra
        how["total_num_steps"] += (f", + {extra} so that neither the first cycle (HiFT starts the schedule one "
                                   f"iteration in, past warmup_min_lr) nor the last trains at the schedule's "
                                   f"floor = {_cycles(out['total_num_steps'])}")
    return out, how


def scheduler_from_config(block: dict, optimizer: Any):
    """The DeepSpeed LR scheduler of a ``"scheduler"`` block, with its step counts in cycles."""
    from deepspeed.runtime import lr_schedules

    check_scheduler_block(block)  # hift_ds.initialize's plan has checked it already; a direct caller has not
    kind = block.get("type")
    cls = getattr(lr_schedules, kind)
    params = block.get("params") or {}
    k = optimizer.num_groups
    converted, how = convert_steps_to_cycles(kind, params, k)
    rank0 = is_main_process()
    if how and rank0:
        logger.info("HiFT: the %s schedule moves once per cycle of %d optimizer steps (one per group), so its step "
                    "counts are converted to cycles: %s", kind, k, "; ".join(f"{key}: {text}" for key, text in
                                                                              how.items()))
    shift = deepspeed_warmup_shift(block)
    # Built at iteration -1, DeepSpeed would set (and warn about) an LR no cycle trains at.
    scheduler = cls(optimizer, **converted, **({"last_batch_iteration": shift.steps_in - 1} if shift.steps_in else {}))
    if shift.steps_in:
        # Cycle c trains at iteration c + 1: no cycle (every group's first update) at warmup_min_lr.
        scheduler.step(shift.steps_in)
        if rank0:
            peak = float((getattr(scheduler, "max_lrs", None) or scheduler.org_lrs)[0])
            warn_if_warmup_vanishes(params.get("warmup_num_steps"), k, _lr_at(scheduler, 0),
                                    _lr_at(scheduler, scheduler.last_batch_iteration), peak,
                                    "scheduler.params.warmup_num_steps")
            _warn_if_short(kind, scheduler, params.get("total_num_steps"), k)
    return scheduler


def warn_if_warmup_vanishes(warmup_steps: int | None, k: int, start_lr: float, first_lr: float, peak: float,
                            setting: str) -> None:
    """Warn when a warm-up (from ``start_lr``) is gone once in cycles: the first cycle already trains at the peak.

    Shared by hift_ds.initialize's schedules and the Trainer's (hift_ds.hf.schedule); ``setting`` names the
    option that sets the warm-up's length.
    """
    # A warm-up of one step is one step at the start LR (often 0), which HiFT skips on purpose (hift_ds.schedule).
    if not isinstance(warmup_steps, int) or warmup_steps <= 1:
        return
    if start_lr < peak * (1 - _PEAK_TOLERANCE) <= first_lr:
        logger.warning("HiFT: the warm-up of %d optimizer steps is gone: the LR moves once per cycle of %d steps (one "
                       "per group), and the first cycle already trains at the peak LR %.3g. For a warm-up, set %s to "
                       "several cycles (a few times %d steps), or use fewer groups (a larger group_size)", warmup_steps,
                       k, peak, setting, k)


def _lr_at(scheduler, iteration: int) -> float:
    # DeepSpeed's schedules compute the LR from last_batch_iteration alone; nothing else changes.
    saved = scheduler.last_batch_iteration
    scheduler.last_batch_iteration = iteration
    try:
        return float(scheduler.get_lr()[0])
    finally:
        scheduler.last_batch_iteration = saved


def _warn_if_short(kind: str, scheduler, total_steps: int | None, k: int) -> None:
    # Only a schedule that knows the run's length can tell; total_steps is in optimizer steps.
    if not isinstance(total_steps, int) or total_steps <= 0:
        return
    first = scheduler.last_batch_iteration  # the iteration cycle 0 trains at
    cycles = math.ceil(total_steps / k)
    lrs = [_lr_at(scheduler, first + c) for c in range(cycles)]
    peak = float((getattr(scheduler, "max_lrs", None) or scheduler.org_lrs)[0])
    if total_steps < k:
        logger.warning("HiFT: this run of %d optimizer steps is shorter than one cycle (%d steps, one per group): "
                       "only %d of the %d groups are trained, once each, all at LR %.3g (the peak is %.3g). Train "
                       "for at least %d steps (--max-steps/--epochs; several cycles are better), or use fewer "
                       "groups (a larger group_size)", total_steps, k, total_steps, k, lrs[0], peak, k + 1)
    elif max(lrs) < peak * (1 - _PEAK_TOLERANCE):
        reach = next((c for c in range(scheduler.warmup_num_steps + 2) if _lr_at(scheduler, first + c)
                      >= peak * (1 - _PEAK_TOLERANCE)), None)
        advice = (f"it is reached from optimizer step {reach * k + 1} (cycle {reach + 1}); train for longer"
                  if reach is not None else "train for longer")
        logger.warning("HiFT: this run is too short for its %s schedule to reach the peak LR %.3g: the LR moves "
                       "once per cycle of %d steps, and its %s train at LR %s; %s, or lower warmup_num_steps",
                       kind, peak, k, _cycles(cycles), ", ".join(f"{lr:.3g}" for lr in lrs), advice)
