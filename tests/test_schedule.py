"""GroupSchedule: orders, cycles and resumption."""
import pytest

from hift_ds.schedule import GroupSchedule, steps_to_cycles


def run(s: GroupSchedule, n: int) -> list[int]:
    out = []
    for _ in range(n):
        out.append(s.active)
        s.advance()
    return out


def test_bottom2up_and_top2down_orders():
    assert run(GroupSchedule(3, "bottom2up"), 6) == [0, 1, 2, 0, 1, 2]
    assert run(GroupSchedule(3, "top2down"), 6) == [2, 1, 0, 2, 1, 0]


def test_random_is_a_new_seeded_permutation_every_cycle():
    seq = run(GroupSchedule(6, "random", seed=3), 60)
    cycles = [seq[i:i + 6] for i in range(0, 60, 6)]
    assert all(sorted(c) == list(range(6)) for c in cycles)
    assert len({tuple(c) for c in cycles}) > 1
    assert seq == run(GroupSchedule(6, "random", seed=3), 60)  # same seed, same order (every rank)
    assert seq != run(GroupSchedule(6, "random", seed=4), 60)


def test_cycle_and_advance_report_boundaries():
    s = GroupSchedule(3)
    ends = [s.advance() for _ in range(7)]
    assert ends == [False, False, True, False, False, True, False]
    assert (s.cycle, s.index) == (2, 1)


def test_resume_reproduces_the_order():
    a = GroupSchedule(5, "random", seed=1)
    run(a, 7)
    b = GroupSchedule(5, "random", seed=1)
    b.load_state_dict(a.state_dict())
    assert b.steps_done == 7
    assert run(a, 13) == run(b, 13)


def test_resume_with_other_settings_is_refused():
    saved = GroupSchedule(5, "random", seed=1, steps_done=7).state_dict()
    for strategy in ("bottom2up", "top2down"):
        s = GroupSchedule(5, strategy, seed=1)
        with pytest.raises(ValueError, match=f"checkpoint was trained with HiFT strategy 'random' but this run uses "
                                             f"'{strategy}'; set hift.strategy .* to 'random' to resume"):
            s.load_state_dict(saved)
        assert (s.strategy, s.steps_done) == (strategy, 0)  # refused without switching or moving
    s = GroupSchedule(5, "random", seed=99)
    with pytest.raises(ValueError, match=r"^checkpoint was trained with HiFT seed 1 but this run uses seed 99; set "
                                         r"hift.seed \(HiFTOptimizer seed=\) to 1 to resume the same random order$"):
        s.load_state_dict(saved)
    assert (s.seed, s.steps_done) == (99, 0)
    with pytest.raises(ValueError, match="checkpoint has 5 HiFT groups but this run has 4"):
        GroupSchedule(4, "random", seed=1).load_state_dict(saved)
    # The seed plays no part in a fixed order: such a run resumes under any seed, keeping its own.
    s = GroupSchedule(5, "top2down", seed=2)
    s.load_state_dict(GroupSchedule(5, "top2down", seed=8, steps_done=3).state_dict())
    assert (s.seed, s.steps_done, s.active) == (2, 3, 1)


@pytest.mark.parametrize("strategy,seed", [("bottom2up", 0), ("top2down", 0), ("random", 2), ("random", 11)])
def test_peek_matches_the_future(strategy, seed):
    """From every position of three cycles, peek(k) is the group active after k advances, without moving."""
    n = 4
    for start in range(3 * n):
        s = GroupSchedule(n, strategy, seed=seed, steps_done=start)
        peeks = [s.peek(k) for k in range(2 * n + 1)]
        assert s.steps_done == start and peeks[0] == s.active
        assert peeks == run(GroupSchedule(n, strategy, seed=seed, steps_done=start), 2 * n + 1)
    with pytest.raises(ValueError, match="ahead must be >= 0, got -1"):
        GroupSchedule(n, strategy, seed=seed, steps_done=5).peek(-1)


@pytest.mark.parametrize("strategy,seed", [("bottom2up", 0), ("top2down", 0), ("random", 2), ("random", 5)])
def test_peek_across_a_cycle_boundary(strategy, seed):
    """At a cycle's last step, peek already knows the next cycle's first group (random: its new permutation)."""
    n = 5
    s = GroupSchedule(n, strategy, seed=seed)
    for cycle in range(6):
        run(s, n - 1)  # to the last step of this cycle
        assert s.index == n - 1
        ahead = [s.peek(k) for k in range(1, n + 1)]  # the whole next cycle
        first = s.peek(1)
        assert s.advance() is True and s.cycle == cycle + 1
        assert s.active == first == s.order(cycle + 1)[0]
        assert [s.peek(k) for k in range(n)] == ahead == run(GroupSchedule(n, strategy, seed=seed,
                                                                           steps_done=s.steps_done), n)
    if strategy == "random":
        # The boundary is a real change of permutation, so the checks above could tell the cycles apart.
        assert len({tuple(s.order(c)) for c in range(7)}) > 1


def test_one_group_is_a_cycle_every_step():
    s = GroupSchedule(1)
    assert [s.advance() for _ in range(3)] == [True] * 3 and (s.active, s.cycle) == (0, 3)
    assert s.peek() == s.peek(1) == 0


def test_defaults_and_state_dict():
    assert GroupSchedule(3).state_dict() == {"num_groups": 3, "strategy": "bottom2up", "seed": 0, "steps_done": 0}


def test_peek_looks_one_step_ahead_by_default():
    s = GroupSchedule(4, steps_done=2)
    assert (s.active, s.peek()) == (2, 3)


@pytest.mark.parametrize("steps,k,cycles", [(250, 8, 32), (256, 8, 32), (257, 8, 33), (8, 8, 1), (1, 8, 1), (5, 1, 5),
                                             (0, 8, 0), (-1, 8, -1)])
def test_steps_to_cycles_rounds_up_and_keeps_zero_and_negatives(steps, k, cycles):
    """A length in steps as cycles of k steps: rounded up, at least one; 0 and -1 (DeepSpeed's "not set") kept."""
    assert steps_to_cycles(steps, k) == cycles


def test_bad_input():
    with pytest.raises(ValueError, match=r"^unknown HiFT strategy 'sideways'; use one of bottom2up, top2down, random, "
                                         r"shuffled$"):
        GroupSchedule(3, "sideways")
    with pytest.raises(ValueError, match=r"^num_groups must be >= 1, got 0$"):
        GroupSchedule(0)
    s = GroupSchedule(3)
    with pytest.raises(ValueError, match="checkpoint has 4 HiFT groups but this run has 3"):
        s.load_state_dict(GroupSchedule(4).state_dict())


class _Optimizer:
    """What CycleLRScheduler reads of a HiFTOptimizer: its cycle count and param_groups."""

    def __init__(self, cycle: int = 0):
        self.cycle = cycle
        self.param_groups = [{"lr": 0.5}, {"lr": 0.25}]


class _Scheduler:
    """An inner LR scheduler that records its step() calls."""

    def __init__(self):
        self.calls = []

    def step(self, *args, **kwargs):
        self.calls.append((args, kwargs))

    def state_dict(self):
        return {"calls": len(self.calls)}

    def load_state_dict(self, state):
        self.calls = [((), {})] * state["calls"]


def test_cycle_lr_scheduler_steps_the_inner_one_once_per_completed_cycle():
    from hift_ds import lr_cycle_scheduler

    opt, inner = _Optimizer(cycle=2), _Scheduler()
    sched = lr_cycle_scheduler(inner, opt)
    assert sched.scheduler is inner and sched.optimizer is opt
    sched.step()
    assert inner.calls == []  # cycles completed before the wrapper existed are not replayed
    opt.cycle = 3
    sched.step(7, epoch=1)
    sched.step()  # still cycle 3
    assert inner.calls == [((7,), {"epoch": 1})]
    opt.cycle = 5  # two cycles since the last call: both are stepped
    sched.step()
    assert len(inner.calls) == 3
    assert sched.get_last_lr() == [0.5, 0.25]
    state = sched.state_dict()
    assert state == {"inner": {"calls": 3}, "cycles_seen": 5}

    resumed = lr_cycle_scheduler(_Scheduler(), _Optimizer(cycle=0))
    resumed.load_state_dict(state)
    assert len(resumed.scheduler.calls) == 3 and resumed.state_dict() == state
    resumed.optimizer.cycle = 6
    resumed.step()
    assert len(resumed.scheduler.calls) == 4  # counts on from the saved cycle, not from 0

    # The optimizer restarted at cycle 0 without its state: count cycles from there.
    resumed.optimizer.cycle = 0
    resumed.restart_cycle_count()
    resumed.optimizer.cycle = 1
    resumed.step()
    assert len(resumed.scheduler.calls) == 5


def test_cycle_lr_scheduler_needs_a_hift_optimizer():
    from hift_ds import lr_cycle_scheduler

    with pytest.raises(TypeError, match=r"^lr_cycle_scheduler needs a HiFTOptimizer, got list$"):
        lr_cycle_scheduler(object(), [])
    no_cycle = _Optimizer()
    del no_cycle.cycle
    no_groups = _Optimizer()
    del no_groups.param_groups
    for bad in (no_cycle, no_groups):
        with pytest.raises(TypeError, match="needs a HiFTOptimizer, got _Optimizer"):
            lr_cycle_scheduler(_Scheduler(), bad)
