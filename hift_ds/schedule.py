"""Which HiFT group is active at which optimizer step, and the LR schedule per cycle (pure Python, no torch).

The position is a single counter of completed optimizer steps; the cycle, the index inside the
cycle and the random permutation all derive from it and the seed. That keeps the schedule
identical on every rank and reproducible after a resume without storing any RNG state.
"""
from __future__ import annotations

import math
import random

STRATEGIES = ("bottom2up", "top2down", "random")


class GroupSchedule:
    """Order in which the ``num_groups`` groups are trained, one group per optimizer step."""

    def __init__(self, num_groups: int, strategy: str = "bottom2up", seed: int = 0, steps_done: int = 0):
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown HiFT strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
        if num_groups < 1:
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
        elif self.strategy == "random":
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
