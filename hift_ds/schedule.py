"""Which HiFT group is active at which optimizer step, and the LR schedule per cycle (pure Python, no torch).

The position is a single counter of completed optimizer steps; the cycle, the index inside the
cycle and the random permutation all derive from it and the seed. That keeps the schedule
identical on every rank and reproducible after a resume without storing any RNG state.
"""
from __future__ import annotations

import math
import random
from typing import NamedTuple

STRATEGIES = ("bottom2up", "top2down", "random", "shuffled")
# DeepSpeed schedules that hold warmup_min_lr for iterations -1 and 0.
DEEPSPEED_WARMUP_SCHEDULES = ("WarmupLR", "WarmupDecayLR", "WarmupCosineLR")


def check_strategy(strategy: str) -> str:
    """``strategy`` if it is one of STRATEGIES; the one message for an unknown order, wherever it is given."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown HiFT strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
    return strategy


class GroupSchedule:
    """Order in which the ``num_groups`` groups are trained, one group per optimizer step."""

    def __init__(self, num_groups: int, strategy: str = "bottom2up", seed: int = 0, steps_done: int = 0):
        check_strategy(strategy)
        if num_groups < 1:  # computed from the units, never given by a user: a programming error
            raise ValueError(f"num_groups must be >= 1, got {num_groups}")
        self.num_groups = num_groups
        self.strategy = strategy
        self.seed = int(seed)
        self.steps_done = int(steps_done)

    def order(self, cycle: int) -> list[int]:
        """Group indices in the order they are trained during ``cycle``."""
        groups = list(range(self.num_groups))
        if self.strategy == "top2down":
            groups.reverse()
        elif self.strategy == "random":  # ("shuffled" shuffles the units once instead: units.model_groups)
            # A fresh generator per cycle, keyed by (seed, cycle): no hidden state to checkpoint.
            random.Random(f"hift-{self.seed}-{cycle}").shuffle(groups)
        return groups

    @property
    def cycle(self) -> int:
        """Number of completed cycles."""
        return self.steps_done // self.num_groups

    @property
    def index(self) -> int:
        """Position of the active group inside the current cycle."""
        return self.steps_done % self.num_groups

    @property
    def active(self) -> int:
        """Index of the group trained by the next optimizer step."""
        return self.peek(0)

    def peek(self, ahead: int = 1) -> int:
        """Group that will be active after ``ahead`` more ``advance()`` calls (``peek(0)`` is ``active``)."""
        # Counted in advances, not optimizer steps: a step skipped on fp16 overflow does not advance.
        # Across a cycle boundary this is the next cycle's order, which depends only on (seed, cycle).
        if ahead < 0:
            raise ValueError(f"peek looks forward only: ahead must be >= 0, got {ahead}")
        n = self.steps_done + ahead
        return self.order(n // self.num_groups)[n % self.num_groups]

    def advance(self) -> bool:
        """Move to the next group; True when this completed a cycle."""
        self.steps_done += 1
        return self.index == 0

    def state_dict(self) -> dict:
        """The schedule position and settings."""
        return {"num_groups": self.num_groups, "strategy": self.strategy, "seed": self.seed,
                "steps_done": self.steps_done}

    def check_state_dict(self, state: dict) -> None:
        """Raise ValueError unless ``state`` was saved by a schedule with this one's settings."""
        if state["num_groups"] != self.num_groups:
            raise ValueError(f"checkpoint has {state['num_groups']} HiFT groups but this run has "
                             f"{self.num_groups}; use the same group_size/num_groups as the saved run")
        # The run's configuration decides the order; adopting the checkpoint's silently would train in an
        # order the config and logs do not show, and a different order mid-cycle repeats or skips groups.
        saved = state["strategy"]
        if saved != self.strategy:
            raise ValueError(f"checkpoint was trained with HiFT strategy {saved!r} but this run uses "
                             f"{self.strategy!r}; set hift.strategy (HiFTOptimizer strategy=) to {saved!r} "
                             "to resume")
        # The seed only shapes the random order; other strategies resume under any seed.
        if self.strategy == "random" and int(state["seed"]) != self.seed:
            raise ValueError(f"checkpoint was trained with HiFT seed {state['seed']} but this run uses seed "
                             f"{self.seed}; set hift.seed (HiFTOptimizer seed=) to {state['seed']} to resume "
                             "the same random order")

    def load_state_dict(self, state: dict) -> None:
        """Restore a position saved by ``state_dict``; groups, strategy and (random) seed must match."""
        self.check_state_dict(state)
        self.steps_done = int(state["steps_done"])


def steps_to_cycles(steps: int, num_groups: int) -> int:
    """A length written in optimizer steps as HiFT cycles of ``num_groups`` steps (ceil; 0 and negatives kept)."""
    return max(1, math.ceil(steps / num_groups)) if steps > 0 else steps


class WarmupShift(NamedTuple):
    """Where a warm-up schedule is placed so that no step (no HiFT cycle) trains at its floor LR.

    ``steps_in``: the iteration the first update trains at (0: the schedule is left where it is built;
    1: it is stepped once before training, ``scheduler.step(1)`` for DeepSpeed's, one ``step()`` for
    the Trainer's). ``extra``: iterations added to the schedule's total length (``total_num_steps``,
    ``num_training_steps``), so that the last update still trains above the floor.
    """

    steps_in: int
    extra: int


def deepspeed_warmup_shift(block: dict | None) -> WarmupShift:
    """The shift a DeepSpeed ``"scheduler"`` block needs (in iterations: cycles under HiFT, steps otherwise)."""
    # DeepSpeed's warm-up schedules give warmup_min_lr (often 0) to iterations -1 and 0: two steps of
    # plain DeepSpeed, two whole cycles (every group's first two updates) under HiFT. Starting one
    # iteration in, the last update sits at iteration total - 1 (decay: above 0), or total - 2 for
    # the cosine, whose progress reaches 1 (its floor) one iteration earlier. A config that places
    # the schedule itself (last_batch_iteration) is left where it says.
    block = block or {}
    kind, params = block.get("type"), block.get("params") or {}
    if kind not in DEEPSPEED_WARMUP_SCHEDULES or params.get("last_batch_iteration", -1) != -1:
        return WarmupShift(0, 0)
    return WarmupShift(1, 2 if kind == "WarmupCosineLR" else 1)


def trainer_warmup_shift(num_warmup_steps: int) -> WarmupShift:
    """The shift a Trainer schedule (transformers.get_scheduler) with ``num_warmup_steps`` of warm-up needs."""
    # Its warm-up gives step 0 LR 0: one wasted step for the Trainer, a whole cycle under HiFT. Its
    # decays reach their floor at num_training_steps itself, so one more step keeps the last above it.
    return WarmupShift(1, 1) if num_warmup_steps > 0 else WarmupShift(0, 0)


def lr_cycle_scheduler(scheduler, optimizer) -> "CycleLRScheduler":
    """Wrap a torch/DeepSpeed LR scheduler so it advances once per HiFT cycle, not per step."""
    return CycleLRScheduler(scheduler, optimizer)


class CycleLRScheduler:
    """LR scheduler wrapper: ``step()`` is called every optimizer step, the inner one every cycle."""

    def __init__(self, scheduler, optimizer):
        # Duck-typed so this module stays free of torch: anything with HiFT's cycle counter.
        if not hasattr(optimizer, "cycle") or not hasattr(optimizer, "param_groups"):
            raise TypeError(f"lr_cycle_scheduler needs a HiFTOptimizer, got {type(optimizer).__name__}")
        self.scheduler = scheduler
        self.optimizer = optimizer
        self._cycles_seen = optimizer.cycle

    def step(self, *args, **kwargs) -> None:
        """Advance the inner scheduler once for each cycle completed since the last call."""
        while self._cycles_seen < self.optimizer.cycle:
            self.scheduler.step(*args, **kwargs)
            self._cycles_seen += 1

    def restart_cycle_count(self) -> None:
        """Count cycles from the optimizer's current one (after it was reset without the scheduler)."""
        self._cycles_seen = self.optimizer.cycle

    def get_last_lr(self) -> list[float]:
        """The learning rates the inner scheduler set last."""
        return [pg["lr"] for pg in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        """Inner scheduler state plus the number of cycles it has seen."""
        return {"inner": self.scheduler.state_dict(), "cycles_seen": self._cycles_seen}

    def load_state_dict(self, state: dict) -> None:
        """Restore from ``state_dict``."""
        self.scheduler.load_state_dict(state["inner"])
        self._cycles_seen = state["cycles_seen"]
