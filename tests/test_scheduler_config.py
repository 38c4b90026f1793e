"""The "scheduler" block in cycles: the conversion is logged in words, and short runs are warned about."""
import logging

import pytest
import torch

from hift_ds.deepspeed.scheduler import convert_steps_to_cycles, scheduler_from_config

LOGGER = "hift_ds.deepspeed.scheduler"


def _optimizer(num_groups: int, lr: float = 1e-4) -> torch.optim.Optimizer:
    """A torch optimizer with HiFT's cycle length: all scheduler_from_config reads of a HiFTOptimizer."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    opt.num_groups = num_groups
    return opt


def _build(caplog, kind: str, k: int, **params):
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        scheduler = scheduler_from_config({"type": kind, "params": params}, _optimizer(k))
    records = [r for r in caplog.records if r.name == LOGGER]
    info = [r.getMessage() for r in records if r.levelno == logging.INFO]
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    return scheduler, info, warnings


def test_conversion_log_shows_the_extra_warmup_cycles_in_words(caplog):
    # The '12 -> 4' with k = 4: three cycles, plus the one the shifted warm-up needs.
    _, info, _ = _build(caplog, "WarmupDecayLR", 4, warmup_num_steps=4, total_num_steps=12, warmup_max_lr=1e-3)
    assert len(info) == 1
    assert "once per cycle of 4 optimizer steps" in info[0]
    assert "warmup_num_steps: 4 steps / 4 per cycle, rounded up = 1 cycle;" in info[0]
    assert "total_num_steps: 12 steps / 4 per cycle, rounded up = 3 cycles, + 1 so that" in info[0]
    assert info[0].endswith("= 4 cycles")
    # The '2 -> 3': one cycle, one more to stay above the warm-up, one for the shift.
    _, info, _ = _build(caplog, "WarmupDecayLR", 4, warmup_num_steps=1, total_num_steps=2, warmup_max_lr=1e-3)
    assert "2 steps / 4 per cycle, rounded up = 1 cycle, raised to 2 to stay above the 1 cycle of warm-up, + 1" \
        in info[0] and info[0].endswith("= 3 cycles")
    _, info, _ = _build(caplog, "WarmupCosineLR", 4, warmup_num_steps=4, total_num_steps=40)
    assert "40 steps / 4 per cycle, rounded up = 10 cycles, + 2 so that" in info[0] and info[0].endswith("= 12 cycles")


def test_conversion_numbers():
    out, how = convert_steps_to_cycles("WarmupDecayLR", {"warmup_num_steps": 25, "total_num_steps": 250}, 8)
    assert out == {"warmup_num_steps": 4, "total_num_steps": 33} and set(how) == set(out)
    out, _ = convert_steps_to_cycles("OneCycle", {"cycle_first_step_size": 9}, 4)
    assert out == {"cycle_first_step_size": 3}  # not a warm-up schedule: no extra cycle
    out, _ = convert_steps_to_cycles("WarmupDecayLR", {"total_num_steps": 8, "last_batch_iteration": 3}, 4)
    assert out["total_num_steps"] == 2  # placed by the config itself: no shift, no extra cycle


def test_run_shorter_than_one_cycle_is_warned(caplog):
    # The issue's --lr 1e-4 --max-steps 3 on MiniLM's 8 groups: one cycle at half the peak LR.
    scheduler, _, warnings = _build(caplog, "WarmupDecayLR", 8, warmup_num_steps=1, total_num_steps=3,
                                    warmup_max_lr=1e-4, warmup_type="linear")
    assert scheduler.optimizer.param_groups[0]["lr"] == pytest.approx(5e-5)
    assert len(warnings) == 1, warnings
    assert "3 optimizer steps is shorter than one cycle (8 steps" in warnings[0]
    assert "only 3 of the 8 groups are trained" in warnings[0] and "LR 5e-05 (the peak is 0.0001)" in warnings[0]
    assert "at least 9 steps" in warnings[0]


def test_run_that_ends_before_the_peak_lr_is_warned(caplog):
    # Four cycles of a warm-up of 10: the LR climbs all run and never reaches 1e-3.
    _, _, warnings = _build(caplog, "WarmupLR", 4, warmup_num_steps=40, warmup_max_lr=1e-3)
    assert not warnings  # WarmupLR has no total_num_steps parameter, so it cannot know the run's length
    _, _, warnings = _build(caplog, "WarmupDecayLR", 4, warmup_num_steps=40, total_num_steps=48,
                            warmup_max_lr=1e-3, warmup_type="linear")
    assert not warnings  # 12 cycles: the warm-up of 10 ends inside the run
    _, _, warnings = _build(caplog, "WarmupCosineLR", 4, warmup_num_steps=40, total_num_steps=16,
                            warmup_type="linear")
    assert len(warnings) == 1, warnings
    assert "too short for its WarmupCosineLR schedule to reach the peak LR 0.0001" in warnings[0]
    assert "its 4 cycles train at LR 1e-05, 2e-05, 3e-05, 4e-05" in warnings[0]


def test_runs_long_enough_are_not_warned(caplog):
    for kind, params in [("WarmupDecayLR", {"warmup_num_steps": 25, "total_num_steps": 250, "warmup_max_lr": 1e-4}),
                         ("WarmupDecayLR", {"warmup_num_steps": 1, "total_num_steps": 9, "warmup_max_lr": 1e-4}),
                         # 3 cycles of warm-up: at 8 steps (one cycle) the first cycle would train at the peak (warned)
                         ("WarmupCosineLR", {"warmup_num_steps": 24, "total_num_steps": 400})]:
        _, info, warnings = _build(caplog, kind, 8, **params)
        assert info and not warnings, (kind, params, warnings)


def test_a_shifted_warmup_schedule_is_built_without_deepspeeds_not_started_warning(caplog):
    from deepspeed.utils import logger as ds_logger

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    ds_logger.addHandler(handler)
    try:
        scheduler, _, _ = _build(caplog, "WarmupDecayLR", 4, warmup_num_steps=8, total_num_steps=40,
                                 warmup_max_lr=1e-3, warmup_type="linear")
    finally:
        ds_logger.removeHandler(handler)
    assert not [r for r in records if "before it has started" in r.getMessage()]
    assert scheduler.last_batch_iteration == 1 and scheduler.get_last_lr() == pytest.approx([5e-4])
