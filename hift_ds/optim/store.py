"""Home of every HiFT group's fp32 masters and optimizer state, with asynchronous prefetch in chunks.

Each group's state is one block of ``len(kinds) x n`` fp32 values, kind after kind ("master",
"exp_avg", ...). With offload the blocks live in one host allocation, pinned at its exact size
(``pinning.py``), and a group is copied into a device *slot* to be updated: one buffer per slot,
of the largest block's size, holding the group in the same layout, so a kind is a contiguous view
for the fused update and any byte range of a block is one copy. Without CUDA the same code runs
with plain synchronous copies, which CPU CI exercises (and ``tests/fake_cuda.py`` runs the CUDA path
on a simulated device).

Copies move in chunks (``chunk_mib``, 128 MiB by default) on two side streams, one per direction,
with one event per chunk of a copy home. A slot is refilled chunk by chunk: chunk c of the next
group is copied in as soon as chunk c of the slot's previous group is home, so both copy engines
run at once even with one slot, and a group copied into a slot that is still draining does not
wait for the whole copy home. The update reads the whole group (one fused launch), so ``acquire``
waits for the group's last chunk (the chunks of one copy are queued in order on one stream).

The lead: after each step the optimizer prefetches as many upcoming groups as there are slots. The
slot of the group just updated receives the group ``slots`` steps ahead, chunk by chunk behind its
copy home, so copies run ahead into earlier, longer steps as far as slot memory allows. Two slots
give a lead of about two steps at the cost of one more group's state on the device; one slot still
overlaps both directions.

The copy home starts late on purpose: at the next forward's first block (``start_copy_outs``,
called by a forward pre-hook), not at the end of the step. A GPU has one copy engine per
direction, and it runs copies in the order they were queued, whatever their stream: a small
device-to-host read queued behind a group's copy-out waits for all of it, and so does the CPU
that asked for it. Hugging Face models make such a read at the start of every forward (the mask
code checks the inputs with ``.all()``), and on an H200 it held each step for the whole copy-out
(47 ms of 66 at the LLaMA-2-7B shape), with no kernel running. Past the model's input
preparation the copy-out overlaps compute only; the copy-ins that follow it into its slot are
queued there too. A checkpoint (``synchronize``) or an ``acquire`` that needs the slot starts them
earlier.
"""
from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from hift_ds.optim.pinning import padded_numel, pin_exact

MASTER = "master"
MAX_SLOTS = 3
DEFAULT_CHUNK_MIB = 128


class GroupStore:
    """Per-group blocks of masters and optimizer state, resident or offloaded (copied in chunks).

    ``home[g]``: group g's kind views where its state rests between its steps: host memory when
    ``offloaded`` (``acquire`` copies it into a device slot), the device itself when resident.
    """

    def __init__(self, numels: list[int], kinds: dict[str, float], *, keeps_masters: bool, offloaded: bool,
                 device: torch.device, pin_memory: bool = True, slots: int = 2,
                 chunk_mib: int = DEFAULT_CHUNK_MIB):
        if slots not in range(1, MAX_SLOTS + 1):
            raise ValueError(f"offload slots must be 1, 2 or 3, got {slots!r}")
        if not isinstance(chunk_mib, int) or chunk_mib < 1:
            raise ValueError(f"offload chunk_mib must be a positive integer, got {chunk_mib!r}")
        self.device = torch.device(device)
        self.offloaded = offloaded
        # The owner fills the masters (from its weights) once the buffers exist.
        self.kinds = ({MASTER: 0.0} if keeps_masters else {}) | dict(kinds)
        self.numels = list(numels)
        width = len(self.kinds)
        self._block = [width * n for n in self.numels]  # elements of each group's block (every kind)
        on_cuda = self.device.type == "cuda"
        self.pinned = offloaded and pin_memory and on_cuda and torch.cuda.is_available()
        cuda_copies = offloaded and on_cuda
        self._h2d = torch.cuda.Stream(self.device) if cuda_copies else None
        self._d2h = torch.cuda.Stream(self.device) if cuda_copies else None
        self.pinned_bytes = 0  # bytes page-locked for the home blocks (registered: exactly these)
        self._home_blocks = self._alloc_home(torch.device("cpu") if offloaded else self.device)
        self.home: list[dict[str, Tensor]] = [self._kinds_of(b, n) for b, n in zip(self._home_blocks, self.numels)]
        for bufs in self.home:
            for k, buf in bufs.items():
                buf.fill_(self.kinds[k])
        self.slots: list[Tensor] = []
        if offloaded and self.kinds:
            self.slots = [self._alloc(max(self._block), self.device, 0.0) for _ in range(slots)]
            for slot in self.slots:
                for stream in (self._h2d, self._d2h):
                    if stream is not None:
                        # Once is enough: if the store is freed with copies queued, the allocator waits for
                        # the work queued on these streams at that time before reusing the slot.
                        slot.record_stream(stream)
        self.chunk = max(1, chunk_mib * 2 ** 20 // 4)  # fp32 elements per chunk (tests set fewer, before any copy)
        self.lookahead = len(self.slots)  # upcoming groups worth prefetching: one per slot
        n = len(self.slots)
        self._slot_group: list[int | None] = [None] * n
        self._last_use = [0] * n  # when each slot was last assigned or acquired (least recently used is refilled)
        self._uses = 0
        # Per slot: the event after its group's copy-in (None when nothing to wait for); per chunk of the slot,
        # the event after the last copy home that read it; the slot's last copy home (for a group that
        # follows itself: the update must not overwrite what its copy home is still reading).
        self._filled: list[torch.cuda.Event | None] = [None] * n
        self._read: list[dict[int, torch.cuda.Event]] = [{} for _ in range(n)]
        self._last_read: list[torch.cuda.Event | None] = [None] * n
        # Released slots whose copy home has not started: slot -> the compute stream's event after the update.
        self._released: dict[int, torch.cuda.Event | None] = {}
        self.defer_copy_out = False  # set by start_copy_outs_before: copies home wait for that module
        # Groups whose copy-in waits for a held-back copy home: group -> the slot it will refill.
        self._waiting: dict[int, int] = {}

    # ---- allocation --------------------------------------------------------------------------
    def _alloc(self, n: int, device: torch.device, fill: float | None) -> Tensor:
        if fill is None:  # the home blocks: each kind is filled once, after the layout is known
            return torch.empty(n, dtype=torch.float32, device=device)
        return torch.full((n,), fill, dtype=torch.float32, device=device)

    def _alloc_home(self, device: torch.device) -> list[Tensor]:
        """Every group's block, as views into one allocation (pinned at its exact size when ``pinned``)."""
        total = sum(self._block)
        if self.pinned:
            raw = self._alloc(padded_numel(total, 4), device, None)
            arena, self.pinned_bytes = pin_exact(raw, total, self, [s for s in (self._h2d, self._d2h) if s])
        else:
            arena = self._alloc(total, device, None)
        starts = [sum(self._block[:g]) for g in range(len(self._block))]
        return [arena[a: a + n] for a, n in zip(starts, self._block)]

    def _kinds_of(self, block: Tensor, n: int) -> dict[str, Tensor]:
        """The kind views of a block (or of a slot holding a group of ``n`` elements)."""
        return {k: block[i * n: (i + 1) * n] for i, k in enumerate(self.kinds)}

    def _chunks(self, elements: int) -> int:
        return -(-elements // self.chunk)

    def _ranges(self, elements: int):
        """(chunk index, start, end) of each chunk of a block of ``elements``: the last one may be shorter."""
        for c in range(self._chunks(elements)):
            yield c, c * self.chunk, min((c + 1) * self.chunk, elements)

    # ---- slots -------------------------------------------------------------------------------
    def slot_of(self, g: int) -> int | None:
        """Index of the slot holding (or receiving) group ``g``, or None."""
        return self._slot_group.index(g) if g in self._slot_group else None

    def in_slot(self, s: int) -> dict[str, Tensor]:
        """The kind views of slot ``s``'s group (as the update will see them)."""
        return self._kinds_of(self.slots[s], self.numels[self._slot_group[s]])

    def prefetch(self, *groups: int) -> None:
        """Start copying the groups the next steps train (in that order) into slots, as many as there are
        slots; a group already in a slot stays there. No-op when resident."""
        if not self.offloaded or not self.kinds:
            return
        wanted = list(dict.fromkeys(groups))[:len(self.slots)]
        for g in wanted:
            if g in self._slot_group or g in self._waiting:
                continue
            free = [s for s in range(len(self.slots)) if self._slot_group[s] not in wanted
                    and s not in self._waiting.values()]
            if not free:
                return
            s = min(free, key=lambda i: self._last_use[i])
            if s in self._released:  # the group leaving must go home first
                if self.defer_copy_out:  # and its copy home waits for the next forward: so does this copy-in
                    self._waiting[g] = s
                    continue
                self._start_copy_out(s)
            self._copy_in(g, s)

    def _copy_in(self, g: int, s: int) -> None:
        self._slot_group[s] = g
        self._last_use[s] = self._uses = self._uses + 1  # not refilled before it is acquired
        src, dst = self._home_blocks[g], self.slots[s]
        if self._h2d is None:
            dst[:src.numel()].copy_(src)
            return
        with torch.cuda.stream(self._h2d):
            for c, a, b in self._ranges(src.numel()):
                read = self._read[s].pop(c, None)
                if read is not None:  # the slot's previous group is still on its way home: this chunk of it first
                    self._h2d.wait_event(read)
                dst[a:b].copy_(src[a:b], non_blocking=True)
            self._filled[s] = torch.cuda.Event()
            self._filled[s].record(self._h2d)
        # The compute stream's wait for the copy-in covers the copy home this copy-in waited for.
        self._last_read[s] = None

    def acquire(self, g: int) -> dict[str, Tensor]:
        """Group ``g``'s kind views on the device, ready for the compute stream to update."""
        if not self.offloaded or not self.kinds:
            return self.home[g]
        if g not in self._slot_group:
            self.start_copy_outs()  # a copy-in waiting for a copy home is needed now
        self.prefetch(g)
        s = self.slot_of(g)
        self._last_use[s] = self._uses = self._uses + 1
        # The same group again before its copy home started: the slot still holds its newest state, so
        # that copy is not needed (the next release queues one after this update); a copy-in that was to
        # refill the slot after it will be fetched when asked for.
        self._released.pop(s, None)
        self._waiting = {h: t for h, t in self._waiting.items() if t != s}
        if self._h2d is not None:
            compute = torch.cuda.current_stream(self.device)
            # The whole copy-in must have landed (its chunks run in order on one stream: the last one's
            # event covers them); and if the same group was just released (it follows itself: one group,
            # or a random order repeating across a cycle boundary), its copy home must have read the slot
            # before this update overwrites it.
            for pending in (self._filled, self._last_read):
                if pending[s] is not None:
                    compute.wait_event(pending[s])
                    pending[s] = None
        return self.in_slot(s)

    def release(self, g: int) -> None:
        """Group ``g``'s slot is updated: copy it home, now or (``defer_copy_out``) at ``start_copy_outs``."""
        if not self.offloaded or not self.kinds:
            return
        s = self.slot_of(g)
        if s is None:
            raise RuntimeError(f"GroupStore.release({g}) but no device slot holds group {g} "
                               f"(slots hold {self._slot_group})")
        updated = None
        if self._d2h is not None:
            updated = torch.cuda.Event()
            updated.record(torch.cuda.current_stream(self.device))  # the copy must not read a half-done update
        self._released[s] = updated
        if not self.defer_copy_out:
            self._start_copy_out(s)

    def start_copy_outs(self) -> None:
        """Start copying every released slot home (queued on the device-to-host stream on CUDA), then the
        copy-ins that were waiting for them, each chunk behind the chunk of the copy home it replaces."""
        for s in list(self._released):
            self._start_copy_out(s)
        waiting, self._waiting = self._waiting, {}
        for g, s in waiting.items():
            self._copy_in(g, s)

    def _start_copy_out(self, s: int) -> None:
        updated = self._released.pop(s)
        src, dst = self.slots[s], self._home_blocks[self._slot_group[s]]
        if self._d2h is None:
            dst.copy_(src[:dst.numel()])
            return
        self._d2h.wait_event(updated)
        with torch.cuda.stream(self._d2h):
            for c, a, b in self._ranges(dst.numel()):
                dst[a:b].copy_(src[a:b], non_blocking=True)
                self._read[s][c] = self._last_read[s] = torch.cuda.Event()  # the chunk may be refilled after it
                self._read[s][c].record(self._d2h)

    def synchronize(self) -> None:
        """Start the copies home not yet started and wait for every copy: the home buffers are current."""
        self.start_copy_outs()
        for stream in (self._h2d, self._d2h):
            if stream is not None:
                stream.synchronize()

    def invalidate(self) -> None:
        """Forget slot contents after the home buffers were overwritten (checkpoint load)."""
        self.synchronize()
        n = len(self.slots)
        self._slot_group, self._filled, self._last_read = [None] * n, [None] * n, [None] * n
        self._read = [{} for _ in range(n)]

    def bytes_by_location(self) -> dict[str, int]:
        """Bytes of masters + state on the device (home if resident, else the slots) and on the host; pinned
        host bytes are the bytes page-locked (the state rounded up to whole pages)."""
        state = 4 * sum(self._block)
        if not self.offloaded:
            return {"device": state, "host_pinned": 0, "host_pageable": 0}
        return {"device": sum(t.numel() * t.element_size() for t in self.slots), "host_pinned": self.pinned_bytes,
                "host_pageable": 0 if self.pinned else state}


def start_copy_outs_before(module: nn.Module | None, store: GroupStore) -> RemovableHandle | None:
    """Start ``store``'s released copy-outs whenever ``module`` is about to run forward (a pre-hook; or no hook)."""
    if module is None:  # copies home then start at release
        return None
    ref = weakref.ref(store)  # the hook must not keep the store (and its pinned memory) alive

    def pre_hook(_module: nn.Module, _args: tuple) -> None:
        st = ref()
        if st is not None:
            st.start_copy_outs()

    handle = module.register_forward_pre_hook(pre_hook)
    weakref.finalize(store, handle.remove)
    store.defer_copy_out = True
    return handle


def first_module_of(model: nn.Module, param: nn.Parameter) -> nn.Module | None:
    """The module that holds ``param`` directly (not through a child), or None."""
    return next((m for m in model.modules() if any(q is param for q in m.parameters(recurse=False))), None)


def build_store(sharding, groups: list[list[nn.Parameter]], kinds: dict[str, float], *, flat: bool, keeps_masters: bool,
                offloaded: bool, pin_memory: bool, slots: int, chunk_mib: int) -> GroupStore:
    """Lay ``groups`` out for the update (``sharding``; flat if asked or sharded) and allocate their masters, state."""
    sharding.bind(groups, flat=flat or sharding.always_flat, keeps_masters=keeps_masters)
    device = groups[0][0].device
    if sharding.grads is not None and device.type == "cuda":
        # The per-parameter storages the flat buffers replaced stay reserved by the caching
        # allocator, and no later allocation (a group-sized buffer, activations) fits their
        # sizes well: without this the reserved memory holds the weights twice.
        torch.cuda.empty_cache()
    return GroupStore(sharding.store_numels, kinds, keeps_masters=keeps_masters, offloaded=offloaded, device=device,
                      pin_memory=pin_memory, slots=slots, chunk_mib=chunk_mib)


def memory_report(sharding, store: GroupStore | None, inner: torch.optim.Optimizer | None) -> dict[str, int]:
    """Bytes by category: model weights and gradients (``sharding``), masters+state on device and on host."""
    report = sharding.memory_bytes()
    if store is not None:
        loc = store.bytes_by_location()
        report.update(state_device=loc["device"], state_host_pinned=loc["host_pinned"],
                      state_host_pageable=loc["host_pageable"])
    else:
        report.update(state_device=sum(t.numel() * t.element_size() for s in inner.state.values()
                                       for t in s.values() if torch.is_tensor(t)),
                      state_host_pinned=0, state_host_pageable=0)
    return report
