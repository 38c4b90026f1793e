"""GroupStore on its own: one, two or three slots (least recently used refilled, upcoming groups kept), a
group acquired twice in a row, copies home at release or held back to the next forward, copies in chunks
(sizes that do not divide a group, groups smaller than a chunk), release and invalidate, where each buffer
lives, host memory pinned at its exact size, and the CUDA copy ordering on a simulated device.

The simulation (``fake_cuda.py``) runs the store's real CUDA code path on CPU: streams are queues run
in the worst order the store's events allow, so a missing wait gives wrong numbers; the negative
controls at the end show it does, one chunk's wait at a time."""
import gc

import pytest
import torch

from fake_cuda import PAGE, fake_cuda
from hift_ds.optim.pinning import page_round
from hift_ds.optim.store import MASTER, GroupStore, first_module_of, start_copy_outs_before

NUMELS = [3, 5, 2]  # unequal, so a slot holds groups of several sizes
KINDS = {"exp_avg": 0.0, "sum": 0.25}
WIDTH = 1 + len(KINDS)  # masters + two kinds: blocks of 9, 15 and 6 values
# Repeats (2, 2 and 1, 1) and a cycle boundary; every group more than once.
ORDER = [0, 1, 2, 2, 0, 1, 1, 0, 2]
# Four groups, so that three slots are refilled too.
NUMELS_4, ORDER_4 = [3, 5, 2, 4], [0, 1, 2, 3, 3, 0, 1, 2, 1, 0, 3, 2]
# When a released group's copy home starts: at release; held back and started by the next forward (the
# optimizer's pre-hook); held back with no forward reaching the hook (acquire and synchronize start it).
COPY_HOME = ["at-release", "at-forward", "on-demand"]
# Elements per chunk: 4 divides no block (9, 15, 6 -> 3, 4, 2 chunks); 7 neither (2, 3, 1); 100: every
# group is smaller than one chunk; None: the default (128 MiB).
CHUNKS = [4, 7, 100, None]


def make_store(store_class=GroupStore, device="cpu", chunk=None, numels=NUMELS, **kw) -> GroupStore:
    """A store over ``numels`` with masters and two state kinds, each home buffer holding distinct values."""
    kw = {"keeps_masters": True, "offloaded": True, "slots": 2} | kw
    store = store_class(numels, KINDS, device=torch.device(device), **kw)
    if chunk is not None:
        store.chunk = chunk
    for g, bufs in enumerate(store.home):
        for i, buf in enumerate(bufs.values()):
            buf.fill_(100 * g + 10 * i).add_(torch.arange(numels[g], dtype=torch.float32))
    return store


def update(bufs: dict, step: int) -> None:
    """A step's update: every value moves, and how depends on the value read (a stale read shows)."""
    for i, buf in enumerate(bufs.values()):
        buf.mul_(0.5).add_(step + i)


def expected_homes(store: GroupStore, order=ORDER) -> list[dict]:
    """What the home buffers hold after ``order``, computed on plain copies (no store, no slots)."""
    homes = [{k: b.clone() for k, b in bufs.items()} for bufs in store.home]
    for step, g in enumerate(order):
        update(homes[g], step)
    return homes


def run_order(store: GroupStore, prefetch: bool, launch=lambda fn: fn(), copy_home: str = "at-release",
              order=ORDER) -> None:
    """Drive the store as the optimizer does: (the forward,) acquire, update (``launch``ed), release, prefetch
    the upcoming groups (one per slot); then synchronize."""
    store.defer_copy_out = copy_home != "at-release"
    if prefetch:
        store.prefetch(*order[:store.lookahead])
    for step, g in enumerate(order):
        if copy_home == "at-forward":
            store.start_copy_outs()
        bufs = store.acquire(g)
        launch(lambda bufs=bufs, step=step: update(bufs, step))
        store.release(g)
        if prefetch and step + 1 < len(order):
            store.prefetch(*order[step + 1: step + 1 + store.lookahead])
    store.synchronize()


def homes_equal(store: GroupStore, expected: list[dict]) -> bool:
    """Whether every home buffer equals the expected values."""
    return all(torch.equal(b, expected[g][k]) for g, bufs in enumerate(store.home) for k, b in bufs.items())


# ---- slots -------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("copy_home", COPY_HOME)
@pytest.mark.parametrize("slots", [1, 2, 3])
@pytest.mark.parametrize("prefetch", [False, True])
def test_store_matches_plain_updates_with_repeats(slots, prefetch, copy_home, chunk):
    store = make_store(slots=slots, chunk=chunk)
    expected = expected_homes(store)
    run_order(store, prefetch, copy_home=copy_home)
    assert homes_equal(store, expected)
    assert not store._released and not store._waiting  # every copy started


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
    assert torch.equal(store.in_slot(0)[MASTER], store.home[1][MASTER])


def test_two_slots_copy_the_group_after_next_into_the_slot_going_home():
    """The lead: with two slots, the group two steps ahead refills the slot of the group just updated, behind
    its copy home (held back to the next forward like it); the next group's slot is left alone."""
    store, before = updated_and_held_back(slots=2)
    store.prefetch(1, 2)
    assert (store.slot_of(0), store.slot_of(1), store.slot_of(2)) == (0, 1, None)
    store.start_copy_outs()
    assert (store.slot_of(0), store.slot_of(1), store.slot_of(2)) == (None, 1, 0)
    assert torch.equal(store.home[0][MASTER], before * 0.5)
    assert torch.equal(store.in_slot(0)[MASTER], store.home[2][MASTER])


def test_three_slots_keep_three_upcoming_groups():
    store = make_store(slots=3)
    assert store.lookahead == 3
    store.prefetch(0, 1, 2)
    assert [store.slot_of(g) for g in range(3)] == [0, 1, 2]
    update(store.acquire(0), 0)
    store.release(0)
    store.prefetch(1, 2, 0)  # the group just updated comes back: it stays where it is, nothing moves
    assert [store.slot_of(g) for g in range(3)] == [0, 1, 2] and not store._waiting


def test_acquiring_another_group_starts_the_held_back_copy_home():
    store, before = updated_and_held_back(slots=1)
    assert torch.equal(store.acquire(2)[MASTER], store.home[2][MASTER])
    assert torch.equal(store.home[0][MASTER], before * 0.5)


def test_acquiring_a_group_whose_copy_in_waits_starts_both_copies():
    store, before = updated_and_held_back(slots=1)
    store.prefetch(2)  # waits for group 0's copy home, which waits for a forward that does not come
    assert store._waiting == {2: 0}
    assert torch.equal(store.acquire(2)[MASTER], store.home[2][MASTER])
    assert torch.equal(store.home[0][MASTER], before * 0.5) and not store._waiting


@pytest.mark.parametrize("chunk", [4, None])
def test_the_same_group_again_skips_its_held_back_copy_home(chunk):
    """Acquired again before its copy home started, a group is updated from its slot (the newest values),
    and only the second release copies it home: one copy per chunk of its block."""
    with fake_cuda("copies") as sim:
        store = make_store(device="cuda:1", chunk=chunk)
        store.defer_copy_out = True
        before = store.home[0][MASTER].clone()
        for step in range(2):
            bufs = store.acquire(0)
            sim.launch(lambda bufs=bufs, step=step: update(bufs, step))
            store.release(0)
        store.synchronize()
    assert torch.equal(store.home[0][MASTER], (before * 0.5) * 0.5 + 1)
    copies_home = [c for c in sim.copies if c[0] is store._d2h]
    assert len(copies_home) == (-(-WIDTH * NUMELS[0] // chunk) if chunk else 1)


def test_a_group_that_follows_itself_is_not_updated_while_its_copy_home_reads_it():
    """Its copy home started (the forward came), the same group is acquired again: the update must wait for
    that copy, or home would receive a mix of two updates (the copy late, so it would read the second)."""
    with fake_cuda("copies") as sim:
        store = make_store(device="cuda:1", chunk=4)
        store.defer_copy_out = True
        bufs = store.acquire(0)
        sim.launch(lambda: update(bufs, 0))
        store.release(0)
        store.start_copy_outs()  # the next forward's first block
        after_first = {k: v.clone() for k, v in store.in_slot(0).items()}
        bufs = store.acquire(0)
        sim.launch(lambda: update(bufs, 1))
        store._d2h.synchronize()  # the first copy home lands; the second is not queued yet (no release)
        assert all(torch.equal(store.home[0][k], v) for k, v in after_first.items())


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
    store.prefetch(2, 0)  # group 2's slot is the older one, but 2 comes next: 0 refills group 1's slot
    assert (store.slot_of(0), store.slot_of(1), store.slot_of(2)) == (0, None, 1)


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


@pytest.mark.parametrize("chunk", [4, None])
@pytest.mark.parametrize("slots", [1, 2, 3])
def test_invalidate_then_load_acquires_the_loaded_values(slots, chunk):
    """As a checkpoint load does: invalidate, then overwrite the home buffers. No copy still queued or held
    back from before may land on the loaded values, and no slot may serve the old ones."""
    with fake_cuda("copies") as sim:  # copies run only when something waits for them
        store = make_store(device="cuda:1", slots=slots, chunk=chunk)
        run_order(store, prefetch=True, launch=sim.launch, copy_home="at-forward")
        store.acquire(0)
        store.release(0)  # its copy home is held back
        store.prefetch(*[1, 2, 0][:slots])  # with one slot (and with two), held back behind it
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


@pytest.mark.parametrize("chunk", [4, None])
@pytest.mark.parametrize("slots", [1, 2, 3])
def test_synchronize_flushes_held_back_and_queued_copies(slots, chunk):
    """What a checkpoint needs: after synchronize every home buffer is current, whatever was held back or queued
    (copies late: nothing ran before)."""
    with fake_cuda("copies") as sim:
        store = make_store(device="cuda:1", slots=slots, chunk=chunk)
        store.defer_copy_out = True
        expected = [{k: b.clone() for k, b in bufs.items()} for bufs in store.home]
        store.prefetch(*[0, 1, 2][:slots])
        for step, g in enumerate([0, 1]):
            bufs = store.acquire(g)
            sim.launch(lambda bufs=bufs, step=step: update(bufs, step))
            update(expected[g], step)
            store.release(g)
            store.prefetch(*[0, 1, 2, 0][step + 1: step + 1 + slots])
        store.synchronize()
    assert homes_equal(store, expected) and not store._released and not store._waiting


def test_slots_must_be_one_two_or_three_and_chunks_positive():
    for slots in (0, 4):
        with pytest.raises(ValueError) as err:
            make_store(slots=slots)
        assert str(err.value) == f"offload slots must be 1, 2 or 3, got {slots}"
    with pytest.raises(ValueError) as err:
        make_store(chunk_mib=0)
    assert str(err.value) == "offload chunk_mib must be a positive integer, got 0"


# ---- where the buffers live --------------------------------------------------------------------
def test_defaults_offloaded_to_cuda_two_slots_pinned_fp32_even_with_a_float64_default():
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with fake_cuda("copies") as sim:
            store = GroupStore(NUMELS, KINDS, keeps_masters=True, offloaded=True, device=torch.device("cuda:1"))
    finally:
        torch.set_default_dtype(default)
    assert len(store.slots) == 2 and store.pinned and store.chunk == 128 * 2 ** 20 // 4
    assert all(set(b) == {MASTER, *KINDS} for b in store.home)
    home = [t for b in store.home for t in b.values()]
    assert all(t.dtype == torch.float32 for t in home + store.slots)
    assert {sim.where(t) for t in home} == {(torch.device("cpu"), True)}
    assert {sim.where(t) for t in store.slots} == {(torch.device("cuda:1"), False)}
    assert all(s.numel() == WIDTH * max(NUMELS) for s in store.slots)


STATE_BYTES = 4 * sum(NUMELS) * WIDTH  # fp32 x (master + two kinds)
SLOT_BYTES = 4 * max(NUMELS) * WIDTH


@pytest.mark.parametrize("device,offload,pin,home_at,slots,report", [  # report: device, host pinned, host pageable
    ("cuda:1", True, True, ("cpu", True), 2, (2 * SLOT_BYTES, page_round(STATE_BYTES), 0)),
    ("cuda:1", True, False, ("cpu", False), 2, (2 * SLOT_BYTES, 0, STATE_BYTES)),
    ("cpu", True, True, ("cpu", False), 2, (2 * SLOT_BYTES, 0, STATE_BYTES)),
    ("cuda:1", False, True, ("cuda:1", False), 0, (STATE_BYTES, 0, 0)),
    ("cpu", False, True, ("cpu", False), 0, (STATE_BYTES, 0, 0)),
], ids=["cuda-pinned", "cuda-pageable", "cpu-offload", "cuda-resident", "cpu-resident"])
def test_buffers_live_where_the_settings_say(device, offload, pin, home_at, slots, report, store_allocations):
    with fake_cuda("copies") as sim:
        store = make_store(device=device, offloaded=offload, pin_memory=pin)
    assert store.pinned == (home_at[1] is True)
    assert {sim.where(t) for b in store.home for t in b.values()} == {(torch.device(home_at[0]), home_at[1])}
    assert len(store.slots) == slots
    assert {sim.where(t) for t in store.slots} <= {(torch.device(device), False)}
    assert len(store_allocations) == 1 + slots  # one block for every group's home, one buffer per slot
    assert store.bytes_by_location() == dict(zip(("device", "host_pinned", "host_pageable"), report))
    assert bool(sim.registered) == store.pinned and not sim.errors


def test_without_masters_only_the_state_kinds_are_kept():
    store = make_store(keeps_masters=False)
    assert all(set(b) == set(KINDS) for b in store.home)
    assert all(s.numel() == len(KINDS) * max(NUMELS) for s in store.slots)
    assert all(torch.equal(b["sum"], torch.full((n,), 0.25)) for b, n in zip(
        GroupStore(NUMELS, KINDS, keeps_masters=False, offloaded=False, device=torch.device("cpu")).home, NUMELS))


def test_a_store_with_nothing_to_keep_has_no_slots():
    store = GroupStore(NUMELS, {}, keeps_masters=False, offloaded=True, device=torch.device("cpu"))
    assert store.slots == [] and store.acquire(1) == {}
    store.release(1)  # nothing to copy home


def test_each_group_is_one_block_kind_after_kind_and_a_slot_holds_it_in_the_same_layout():
    """So any byte range of a group's state is one copy, and each kind is one contiguous view for the update."""
    store = make_store(slots=1)
    for g, n in enumerate(NUMELS):
        block = store._home_blocks[g]
        assert block.numel() == WIDTH * n
        for i, buf in enumerate(store.home[g].values()):
            assert buf.data_ptr() == block.data_ptr() + 4 * i * n and buf.numel() == n
        slot = store.acquire(g)
        assert [t.data_ptr() for t in slot.values()] == [store.slots[0].data_ptr() + 4 * i * n for i in range(WIDTH)]
        store.release(g)


# ---- pinned at the exact size ----------------------------------------------------------------------
def test_home_is_pinned_exactly_once_in_whole_pages_inside_its_own_allocation(store_allocations):
    with fake_cuda("copies") as sim:
        store = make_store(device="cuda:1")
    (ptr, size), = sim.registered.items()
    assert ptr % PAGE == 0 and size == page_round(STATE_BYTES) == store.pinned_bytes
    assert store.bytes_by_location()["host_pinned"] == size
    (numel, _), = [a for a in store_allocations if a[1].type == "cpu"]
    home = store._home_blocks
    assert home[0].data_ptr() == ptr and home[-1].data_ptr() + home[-1].numel() * 4 <= ptr + size
    raw = home[0].untyped_storage()
    assert raw.data_ptr() <= ptr and ptr + size <= raw.data_ptr() + raw.nbytes() == raw.data_ptr() + 4 * numel


def test_pages_are_unpinned_after_queued_copies_and_views_that_outlive_the_store_stay_valid():
    """The store freed with copies still queued (late): the copies run first, then the pages are unregistered,
    and a view kept from it still holds the values copied home."""
    with fake_cuda("copies") as sim:
        store = make_store(device="cuda:1", chunk=4)
        store.defer_copy_out = False
        bufs = store.acquire(1)
        sim.launch(lambda b=bufs: update(b, 0))
        store.release(1)  # its copy home is queued, not run
        kept = store.home[1][MASTER]
        expected = kept.clone() * 0.5
        (ptr, size), = sim.registered.items()
        del store, bufs
        gc.collect()
        assert not sim.registered and sim.unregistered == [(ptr, size)] and not sim.errors
        assert torch.equal(kept, expected)


def test_a_failed_registration_says_so_and_how_to_avoid_pinning(monkeypatch):
    with fake_cuda("copies") as sim:
        monkeypatch.setattr(type(torch.cuda.cudart()), "cudaHostRegister", lambda self, ptr, size, flags: 2)
        with pytest.raises(RuntimeError, match=r"cudaHostRegister of \d+ bytes .* failed with cudaError 2 "
                                               r"\(pin_memory=false keeps the store in pageable memory\)"):
            make_store(device="cuda:1")
        store = make_store(device="cuda:1", pin_memory=False)
    assert not store.pinned and not sim.registered


def test_two_stores_register_disjoint_pages():
    with fake_cuda("copies") as sim:
        stores = [make_store(device="cuda:1") for _ in range(3)]
    assert len(sim.registered) == 3 and not sim.errors
    assert sum(s.pinned_bytes for s in stores) == sum(sim.registered.values())


# ---- CUDA ordering, simulated --------------------------------------------------------------------
@pytest.mark.parametrize("groups", [3, 4])
@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("copy_home", COPY_HOME)
@pytest.mark.parametrize("late", ["copies", "compute"])
@pytest.mark.parametrize("slots", [1, 2, 3])
@pytest.mark.parametrize("prefetch", [False, True])
def test_simulated_cuda_copies_overlap_and_are_ordered(late, slots, prefetch, copy_home, chunk, groups):
    """Copies run on the store's own streams (not the compute stream), never block the host, and the
    events alone keep the numbers right when either the copies or the compute run as late as allowed."""
    numels, order = (NUMELS, ORDER) if groups == 3 else (NUMELS_4, ORDER_4)
    with fake_cuda(late) as sim:
        store = make_store(device="cuda:1", slots=slots, chunk=chunk, numels=numels)
        expected = expected_homes(store, order)
        run_order(store, prefetch, launch=sim.launch, copy_home=copy_home, order=order)
    assert homes_equal(store, expected) and not sim.errors
    assert sim.copies and all(non_blocking for _, non_blocking in sim.copies)
    assert all(s is not sim.compute and s.device == torch.device("cuda:1") for s, _ in sim.copies)


def test_simulated_copies_move_one_chunk_per_copy_with_one_event_each():
    with fake_cuda("copies") as sim:
        store = make_store(device="cuda:1", slots=1, chunk=4)  # blocks 9, 15, 6: 3, 4 and 2 chunks
        for g in range(3):
            sim.launch(lambda bufs=store.acquire(g), g=g: update(bufs, g))
            store.release(g)
        store.synchronize()
    ins = [c for c in sim.copies if c[0] is store._h2d]
    outs = [c for c in sim.copies if c[0] is store._d2h]
    assert len(ins) == len(outs) == 3 + 4 + 2
    # Group 2's copy home read chunks 0 and 1 last; chunks 2 and 3 were last read by group 1's (a bigger group
    # copied in later waits for those).
    assert set(store._read[0]) == {0, 1, 2, 3} and store._last_read[0] is store._read[0][1]


def test_simulated_one_slot_copy_in_chases_the_copy_home_chunk_by_chunk():
    """With one slot, chunk c of the next group is copied in once chunk c of the group leaving is home, not
    once all of it is: both directions move at once."""
    with fake_cuda("copies") as sim:
        store = make_store(device="cuda:1", slots=1, chunk=4)
        store.defer_copy_out = True
        bufs = store.acquire(1)  # 15 values: 4 chunks
        sim.launch(lambda: update(bufs, 0))
        store.release(1)
        store.prefetch(0)  # 9 values: 3 chunks, held back behind group 1's copy home
        old_home, new_home = store._home_blocks[1].clone(), store._home_blocks[0].clone()
        h2d, d2h = len(store._h2d.work), len(store._d2h.work)
        store.start_copy_outs()
        slot = store.slots[0]
        assert (store._h2d.done, store._d2h.done) == (h2d, d2h)  # queued, nothing ran (copies late)
        store._h2d.run_until(h2d + 2)  # the copy-in's first chunk: [wait for chunk 0 home, copy chunk 0]
        home = store._home_blocks[1]
        assert not torch.equal(home[:4], old_home[:4])  # chunk 0 of group 1 is home (updated values)...
        assert torch.equal(home[4:], old_home[4:])  # ...and only chunk 0
        assert torch.equal(slot[:4], new_home[:4]) and not torch.equal(slot[4:9], new_home[4:9])
        store.synchronize()
        assert torch.equal(slot[:9], new_home)


class ComputeSkipsCopyWaits(GroupStore):
    """Bug: the compute stream does not wait for the copy-in (nor the copy home) of its slot."""

    def acquire(self, g):
        if g not in self._slot_group:
            self.start_copy_outs()  # as GroupStore.acquire: a held-back copy-in is needed now
        self.prefetch(g)
        s = self.slot_of(g)
        self._filled[s] = self._last_read[s] = None
        return super().acquire(g)


class ComputeWaitsForTheFirstChunkOnly(GroupStore):
    """Bug: the update waits for the copy-in's first chunk, not for all of it."""

    def _copy_in(self, g, s):
        ranges = GroupStore._ranges

        def first_then_event(store, elements):
            for i, (c, a, b) in enumerate(ranges(store, elements)):
                yield c, a, b
                if i == 0 and store._h2d is not None:
                    store._first = torch.cuda.Event()
                    store._first.record(store._h2d)
        self._ranges = lambda elements: first_then_event(self, elements)
        try:
            super()._copy_in(g, s)
        finally:
            del self._ranges
        if self._h2d is not None:
            self._filled[s] = self._first


class CopyInSkipsCopyOutWait(GroupStore):
    """Bug: nothing waits for a slot's copy home before the slot is written again."""

    def _start_copy_out(self, s):
        super()._start_copy_out(s)
        self._read[s].clear()
        self._last_read[s] = None


class CopyInSkipsOneChunkWait(GroupStore):
    """Bug: the copy-in waits for every chunk of the copy home it replaces but one (``skip``: the first or the
    last chunk both copies have)."""

    skip = "first"

    def _copy_in(self, g, s):
        chunks = -(-self._home_blocks[g].numel() // self.chunk)
        shared = [c for c in self._read[s] if c < chunks]
        if shared:
            self._read[s].pop(min(shared) if self.skip == "first" else max(shared))
        super()._copy_in(g, s)


class CopyInSkipsLastChunkWait(CopyInSkipsOneChunkWait):
    skip = "last"


class CopyOutSkipsUpdateWait(GroupStore):
    """Bug: the copy home does not wait for the update on the compute stream."""

    def _start_copy_out(self, s):
        self._d2h.wait_event = lambda event: None
        try:
            super()._start_copy_out(s)
        finally:
            del self._d2h.wait_event


@pytest.mark.parametrize("copy_home", ["at-release", "at-forward"])
@pytest.mark.parametrize("store_class,late,slots,chunk", [
    (ComputeSkipsCopyWaits, "copies", 2, None),
    (ComputeWaitsForTheFirstChunkOnly, "copies", 2, 4),
    (ComputeWaitsForTheFirstChunkOnly, "copies", 1, 7),
    (CopyInSkipsCopyOutWait, "copies", 1, None),
    (CopyInSkipsOneChunkWait, "copies", 1, 4),
    (CopyInSkipsLastChunkWait, "copies", 1, 4),
    (CopyInSkipsOneChunkWait, "copies", 2, 4),
    (CopyInSkipsLastChunkWait, "copies", 2, 7),
    (CopyInSkipsLastChunkWait, "copies", 3, 4),
    (CopyInSkipsOneChunkWait, "copies", 3, 7),
    (ComputeWaitsForTheFirstChunkOnly, "copies", 3, 4),
    (CopyOutSkipsUpdateWait, "compute", 2, None),
    (CopyOutSkipsUpdateWait, "compute", 1, 4),
], ids=lambda v: v.__name__ if isinstance(v, type) else str(v))
def test_simulation_catches_a_missing_wait(store_class, late, slots, chunk, copy_home):
    """Negative controls: each missing wait, one chunk's included, gives wrong home buffers in the schedule
    made for it."""
    numels, order = (NUMELS, ORDER) if slots < 3 else (NUMELS_4, ORDER_4)  # three slots: four groups
    with fake_cuda(late) as sim:
        store = make_store(store_class, device="cuda:1", slots=slots, chunk=chunk, numels=numels)
        expected = expected_homes(store, order)
        run_order(store, prefetch=True, launch=sim.launch, copy_home=copy_home, order=order)
    assert not homes_equal(store, expected)


def test_simulated_resident_store_makes_no_copies():
    with fake_cuda("copies") as sim:
        store = make_store(device="cuda:1", offloaded=False)
        expected = expected_homes(store)
        run_order(store, prefetch=True, launch=sim.launch)
        sim.compute.synchronize()
    assert homes_equal(store, expected) and not sim.copies and not sim.registered


def test_simulated_prefetch_returns_before_its_copy_has_run():
    with fake_cuda("copies"):
        store = make_store(device="cuda:1")
        store.prefetch(1)
        slot = store.in_slot(store.slot_of(1))[MASTER]
        assert not torch.equal(slot, store.home[1][MASTER])  # still queued: nothing waited for it
        assert torch.equal(store.acquire(1)[MASTER], store.home[1][MASTER])


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
