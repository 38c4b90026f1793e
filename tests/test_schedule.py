"""GroupSchedule: orders, cycles and resumption."""
import pytest

from hift_ds.schedule import GroupSchedule


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
    b = GroupSchedule(5, "random", seed=99)
    b.load_state_dict(a.state_dict())
    assert run(a, 13) == run(b, 13)


def test_peek_matches_the_future():
    s = GroupSchedule(4, "random", seed=2)
    peeks = [s.peek(1) for _ in range(1)]
    run(s, 1)
    assert peeks[0] == s.active


def test_bad_input():
    with pytest.raises(ValueError, match="unknown HiFT strategy 'sideways'"):
        GroupSchedule(3, "sideways")
    with pytest.raises(ValueError, match="num_groups must be >= 1"):
        GroupSchedule(0)
    s = GroupSchedule(3)
    with pytest.raises(ValueError, match="checkpoint has 4 HiFT groups but this run has 3"):
        s.load_state_dict(GroupSchedule(4).state_dict())
