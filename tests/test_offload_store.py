"""GroupStore on its own: one or two slots (least recently used refilled), a group acquired twice in a row,
copies home at release or held back to the next forward, release and invalidate, where each buffer lives,
and the CUDA copy ordering on a simulated device.

The simulation (``fake_cuda.py``) runs the store's real CUDA code path on CPU: streams are queues run
in the worst order the store's events allow, so a missing wait gives wrong numbers; the negative
controls at the end show it does."""
import gc

import pytest
import torch

from fake_cuda import fake_cuda
from hift_ds.optim.store import MASTER, GroupStore, first_module_of, start_copy_outs_before

NUMELS = [3, 5, 2]  # unequal, so a slot holds groups of several sizes
KINDS = {"exp_avg": 0.0, "sum": 0.25}
# Repeats (2, 2 and 1, 1) and a cycle boundary; every group more than once.
ORDER = [0, 1, 2, 2, 0, 1, 1, 0, 2]
# When a released group's copy home starts: at release; held back and started by the next forward (the
# optimizer's pre-hook); held back with no forward reaching the hook (acquire and synchronize start it).
COPY_HOME = ["at-release", "at-forward", "on-demand"]


def make_store(store_class=GroupStore, device="cpu", **kw) -> GroupStore:
    """A store over NUMELS with masters and two state kinds, each home buffer holding distinct values."""
    kw = {"masters": True, "offload": True, "slots": 2} | kw
    store = store_class(NUMELS, KINDS, device=torch.device(device), **kw)
    for g, bufs in enumerate(store.home):
        for i, buf in enumerate(bufs.values()):
            buf.fill_(100 * g + 10 * i).add_(torch.arange(NUMELS[g], dtype=torch.float32))
    return store


def update(bufs: dict, step: int) -> None:
    """A step's update: every value moves, and how depends on the value read (a stale read shows)."""
    for i, buf in enumerate(bufs.values()):
        buf.mul_(0.5).add_(step + i)


def expected_homes(store: GroupStore) -> list[dict]:
    """What the home buffers hold after ORDER, computed on plain copies (no store, no slots)."""
    homes = [{k: b.clone() for k, b in bufs.items()} for bufs in store.home]
    for step, g in enumerate(ORDER):
        update(homes[g], step)
    return homes


def run_order(store: GroupStore, prefetch: bool, launch=lambda fn: fn(), copy_home: str = "at-release") -> None:
    """Drive the store as the optimizer does: (the forward,) acquire, update (``launch``ed), release, prefetch
    the next group; then synchronize."""
    store.defer_copy_out = copy_home != "at-release"
    if prefetch:
        store.prefetch(ORDER[0])
    for step, g in enumerate(ORDER):
        if copy_home == "at-forward":
            store.start_copy_outs()
        bufs = store.acquire(g)
        launch(lambda bufs=bufs, step=step: update(bufs, step))
        store.release(g)
        if prefetch and step + 1 < len(ORDER):
            store.prefetch(ORDER[step + 1])
    store.synchronize()


def homes_equal(store: GroupStore, expected: list[dict]) -> bool:
    """Whether every home buffer equals the expected values."""
    return all(torch.equal(b, expected[g][k]) for g, bufs in enumerate(store.home) for k, b in bufs.items())


# ---- slots -------------------------------------------------------------------------------------
@pytest.mark.parametrize("copy_home", COPY_HOME)
@pytest.mark.parametrize("slots", [1, 2])
@pytest.mark.parametrize("prefetch", [False, True])
def test_store_matches_plain_updates_with_repeats(slots, prefetch, copy_home):
    store = make_store(slots=slots)
    expected = expected_homes(store)
    run_order(store, prefetch, copy_home=copy_home)
    assert homes_equal(store, expected)
    assert not store._released  # every copy home started


def updated_and_held_back(slots: int) -> tuple[GroupStore, torch.Tensor]:
    """A store that holds copies home back, after group 0's first update and release; group 0's masters before."""
    store = make_store(slots=slots)
    store.defer_copy_out = True
    before = store.home[0][MASTER].clone()
    update(store.acquire(0), 0)
    store.release(0)
    return store, before


def test_held_back_copy_home_starts_at_start_copy_outs():
    store, before = updated_and_held_back(slots=2)
    store.prefetch(1)  # the other slot: nothing to wait for
    assert torch.equal(store.home[0][MASTER], before) and store.slot_of(1) == 1
    store.start_copy_outs()
    assert torch.equal(store.home[0][MASTER], before * 0.5)


def test_one_slot_copy_in_waits_for_the_held_back_copy_home():
    """With one slot the next group's copy-in must follow the copy home: it is held back too, then follows it."""
    store, _ = updated_and_held_back(slots=1)
    store.prefetch(1)
    assert (store.slot_of(0), store.slot_of(1)) == (0, None)
    store.start_copy_outs()
    assert (store.slot_of(0), store.slot_of(1)) == (None, 0)
    assert torch.equal(store.slots[0][MASTER][:NUMELS[1]], store.home[1][MASTER])


def test_acquiring_another_group_starts_the_held_back_copy_home():
    store, before = updated_and_held_back(slots=1)
    assert torch.equal(store.acquire(2)[MASTER], store.home[2][MASTER])
    assert torch.equal(store.home[0][MASTER], before * 0.5)


def test_the_same_group_again_skips_its_held_back_copy_home():
    """Acquired again before its copy home started, a group is updated from its slot (the newest values),
    and only the second release copies it home."""
    with fake_cuda("copies") as sim:
        store = make_store(device="cuda:1")
        store.defer_copy_out = True
        before = store.home[0][MASTER].clone()
        for step in range(2):
            bufs = store.acquire(0)
            sim.launch(lambda bufs=bufs, step=step: update(bufs, step))
            store.release(0)
        store.synchronize()
    assert torch.equal(store.home[0][MASTER], (before * 0.5) * 0.5 + 1)
    copies_home = [c for c in sim.copies if c[0] is store._d2h]
    assert len(copies_home) == len(KINDS) + 1  # one copy home per kind and the masters


def test_two_slots_refill_the_least_recently_used():
    store = make_store(slots=2)
    store.prefetch(0)
    store.prefetch(1)  # the second slot: group 0 stays
    assert (store.slot_of(0), store.slot_of(1)) == (0, 1)
    store.prefetch(0)  # already in a slot: nothing moves
    assert (store.slot_of(0), store.slot_of(1)) == (0, 1)
    store.acquire(0)  # group 0 used last, so group 1's slot is the one refilled
    store.release(0)
    store.prefetch(2)
    assert (store.slot_of(0), store.slot_of(1), store.slot_of(2)) == (0, None, 1)
    store.acquire(2)
    store.release(2)
    store.prefetch(1)  # now group 0's slot is the older one
    assert (store.slot_of(0), store.slot_of(1), store.slot_of(2)) == (None, 0, 1)


def test_one_slot_holds_the_last_group_prefetched():
    store = make_store(slots=1)
    store.prefetch(0)
    store.prefetch(1)
    assert (store.slot_of(0), store.slot_of(1)) == (None, 0)
    assert torch.equal(store.acquire(0)[MASTER], store.home[0][MASTER])  # brought back on acquire
    assert (store.slot_of(0), store.slot_of(1)) == (0, None)


def test_release_of_a_group_in_no_slot_names_the_slots():
    store = make_store(slots=2)
    store.acquire(0)
    with pytest.raises(RuntimeError) as err:
        store.release(1)
    assert str(err.value) == "GroupStore.release(1) but no device slot holds group 1 (slots hold [0, None])"


@pytest.mark.parametrize("slots", [1, 2])
def test_invalidate_then_load_acquires_the_loaded_values(slots):
    """As a checkpoint load does: invalidate, then overwrite the home buffers. No copy still queued or held
    back from before may land on the loaded values, and no slot may serve the old ones."""
    with fake_cuda("copies") as sim:  # copies run only when something waits for them
        store = make_store(device="cuda:1", slots=slots)
        run_order(store, prefetch=True, launch=sim.launch, copy_home="at-forward")
        store.acquire(0)
        store.release(0)  # its copy home is held back
        store.prefetch(1)  # one slot: held back behind it
        store.invalidate()
        for bufs in store.home:
            for buf in bufs.values():
                buf.fill_(-1.0)
        store.start_copy_outs()
        store.synchronize()
        loaded = [{k: torch.full_like(b, -1.0) for k, b in bufs.items()} for bufs in store.home]
        assert homes_equal(store, loaded)
        for g in range(len(NUMELS)):
            assert all(torch.equal(v, loaded[g][k]) for k, v in store.acquire(g).items()), g
            store.release(g)


def test_slots_must_be_one_or_two():
    with pytest.raises(ValueError) as err:
        make_store(slots=3)
    assert str(err.value) == "offload slots must be 1 or 2, got 3"


# ---- where the buffers live --------------------------------------------------------------------
def test_defaults_offloaded_to_cuda_two_slots_pinned_fp32_even_with_a_float64_default():
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with fake_cuda("copies") as sim:
            store = GroupStore(NUMELS, KINDS, masters=True, offload=True, device=torch.device("cuda:1"))
    finally:
        torch.set_default_dtype(default)
    assert len(store.slots) == 2 and store.pinned
    assert all(set(b) == {MASTER, *KINDS} for b in store.home + store.slots)
    home = [t for b in store.home for t in b.values()]
    slots = [t for b in store.slots for t in b.values()]
    assert all(t.dtype == torch.float32 for t in home + slots)
    assert {sim.where(t) for t in home} == {(torch.device("cpu"), True)}
    assert {sim.where(t) for t in slots} == {(torch.device("cuda:1"), False)}


STATE_BYTES = 4 * sum(NUMELS) * 3  # fp32 x (master + two kinds)
SLOT_BYTES = 4 * max(NUMELS) * 3


@pytest.mark.parametrize("device,offload,pin,home_at,slots,report", [  # report: device, host pinned, host pageable
    ("cuda:1", True, True, ("cpu", True), 2, (2 * SLOT_BYTES, STATE_BYTES, 0)),
    ("cuda:1", True, False, ("cpu", False), 2, (2 * SLOT_BYTES, 0, STATE_BYTES)),
    ("cpu", True, True, ("cpu", False), 2, (2 * SLOT_BYTES, 0, STATE_BYTES)),
    ("cuda:1", False, True, ("cuda:1", False), 0, (STATE_BYTES, 0, 0)),
    ("cpu", False, True, ("cpu", False), 0, (STATE_BYTES, 0, 0)),
], ids=["cuda-pinned", "cuda-pageable", "cpu-offload", "cuda-resident", "cpu-resident"])
def test_buffers_live_where_the_settings_say(device, offload, pin, home_at, slots, report, store_allocations):
    with fake_cuda("copies") as sim:
        store = make_store(device=device, offload=offload, pin_memory=pin)
    assert store.pinned == (home_at[1] is True)
    assert {sim.where(t) for b in store.home for t in b.values()} == {(torch.device(home_at[0]), home_at[1])}
    assert len(store.slots) == slots
    assert {sim.where(t) for b in store.slots for t in b.values()} <= {(torch.device(device), False)}
    assert len(store_allocations) == (len(NUMELS) + slots) * 3
    assert store.bytes_by_location() == dict(zip(("device", "host_pinned", "host_pageable"), report))


def test_without_masters_only_the_state_kinds_are_kept():
    store = make_store(masters=False)
    assert all(set(b) == set(KINDS) for b in store.home + store.slots)
    assert all(torch.equal(b["sum"], torch.full((n,), 0.25)) for b, n in zip(
        GroupStore(NUMELS, KINDS, masters=False, offload=False, device=torch.device("cpu")).home, NUMELS))


def test_a_store_with_nothing_to_keep_has_no_slots():
    store = GroupStore(NUMELS, {}, masters=False, offload=True, device=torch.device("cpu"))
    assert store.slots == [] and store.acquire(1) == {}
    store.release(1)  # nothing to copy home


# ---- CUDA ordering, simulated --------------------------------------------------------------------
@pytest.mark.parametrize("copy_home", COPY_HOME)
@pytest.mark.parametrize("late", ["copies", "compute"])
@pytest.mark.parametrize("slots", [1, 2])
@pytest.mark.parametrize("prefetch", [False, True])
def test_simulated_cuda_copies_overlap_and_are_ordered(late, slots, prefetch, copy_home):
    """Copies run on the store's own streams (not the compute stream), never block the host, and the
    events alone keep the numbers right when either the copies or the compute run as late as allowed."""
    with fake_cuda(late) as sim:
        store = make_store(device="cuda:1", slots=slots)
        expected = expected_homes(store)
        run_order(store, prefetch, launch=sim.launch, copy_home=copy_home)
    assert homes_equal(store, expected)
    assert sim.copies and all(non_blocking for _, non_blocking in sim.copies)
    assert all(s is not sim.compute and s.device == torch.device("cuda:1") for s, _ in sim.copies)


def test_simulated_prefetch_returns_before_its_copy_has_run():
    with fake_cuda("copies"):
        store = make_store(device="cuda:1")
        store.prefetch(1)
        slot = store.slots[store.slot_of(1)][MASTER][:NUMELS[1]]
        assert not torch.equal(slot, store.home[1][MASTER])  # still queued: nothing waited for it
        assert torch.equal(store.acquire(1)[MASTER], store.home[1][MASTER])


def test_simulated_resident_store_makes_no_copies():
    with fake_cuda("copies") as sim:
        store = make_store(device="cuda:1", offload=False)
        expected = expected_homes(store)
        run_order(store, prefetch=True, launch=sim.launch)
        sim.compute.synchronize()
    assert homes_equal(store, expected) and not sim.copies


class ComputeSkipsCopyWaits(GroupStore):
    """Bug: the compute stream does not wait for the copy-in (nor the copy-out) of its slot."""

    def acquire(self, g):
        if g not in self._slot_group:
            self.start_copy_outs()  # as GroupStore.acquire: a held-back copy-in is needed now
        self.prefetch(g)
        s = self.slot_of(g)
        self._filled[s] = self._emptied[s] = None
        return super().acquire(g)


class CopyInSkipsCopyOutWait(GroupStore):
    """Bug: nothing waits for a slot's copy-out before the slot is written again."""

    def _start_copy_out(self, s):
        super()._start_copy_out(s)
        self._emptied[s] = None


class CopyOutSkipsUpdateWait(GroupStore):
    """Bug: the copy-out does not wait for the update on the compute stream."""

    def _start_copy_out(self, s):
        self._d2h.wait_event = lambda event: None
        try:
            super()._start_copy_out(s)
        finally:
            del self._d2h.wait_event


@pytest.mark.parametrize("copy_home", ["at-release", "at-forward"])
@pytest.mark.parametrize("store_class,late,slots", [(ComputeSkipsCopyWaits, "copies", 2),
                                                    (CopyInSkipsCopyOutWait, "copies", 1),
                                                    (CopyOutSkipsUpdateWait, "compute", 2)])
def test_simulation_catches_a_missing_wait(store_class, late, slots, copy_home):
    """Negative controls: each missing wait gives wrong home buffers in the schedule made for it."""
    with fake_cuda(late) as sim:
        store = make_store(store_class, device="cuda:1", slots=slots)
        expected = expected_homes(store)
        run_order(store, prefetch=True, launch=sim.launch, copy_home=copy_home)
    assert not homes_equal(store, expected)


# ---- the forward pre-hook that starts the copies home ----------------------------------------------
def test_copies_home_start_when_the_hooked_module_runs_and_the_hook_goes_with_the_store():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    assert first_module_of(model, model[1].bias) is model[1]
    assert first_module_of(model, torch.nn.Parameter(torch.zeros(1))) is None
    store = make_store(slots=2)
    handle = start_copy_outs_before(model[1], store)
    assert store.defer_copy_out
    before = store.home[0][MASTER].clone()
    update(store.acquire(0), 0)
    store.release(0)
    model[0](torch.zeros(1, 2))  # another module: not yet
    assert torch.equal(store.home[0][MASTER], before)
    model(torch.zeros(1, 2))
    assert torch.equal(store.home[0][MASTER], before * 0.5)
    assert handle.id in model[1]._forward_pre_hooks
    del store
    gc.collect()
    assert not model[1]._forward_pre_hooks  # the hook held no reference to the store, and is removed with it
