"""Home of every HiFT group's fp32 masters and optimizer state, with asynchronous prefetch.

Each group owns one contiguous fp32 buffer per kind ("master", "exp_avg", ...), allocated once.
With offload the buffers live in (pinned) host memory and the active group is copied into a
device *slot*. Two slots and two copy streams (one per direction) make a step's copies run
concurrently: the next group is copied into the other slot on the host-to-device stream right
after a step, and the group just updated is copied home on the device-to-host stream, both
overlapping the next forward/backward. CUDA events order the streams; the compute stream only
waits for the copy it needs. Without CUDA the same code runs with plain synchronous copies,
which CPU CI exercises.

The copy home starts late on purpose: at the next forward's first block (``start_copy_outs``,
called by a forward pre-hook), not at the end of the step. A GPU has one copy engine per
direction, and it runs copies in the order they were queued, whatever their stream: a small
device-to-host read queued behind a group's copy-out waits for all of it, and so does the CPU
that asked for it. Hugging Face models make such a read at the start of every forward (the mask
code checks the inputs with ``.all()``), and on an H200 it held each step for the whole copy-out
(47 ms of 66 at the LLaMA-2-7B shape), with no kernel running. Past the model's input
preparation the copy-out overlaps compute only; with one slot the next group's copy-in follows it
there. A checkpoint (``synchronize``) or an ``acquire`` that needs the slot starts them earlier.
"""
from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

MASTER = "master"


class GroupStore:
    """Flat per-group buffers of masters and optimizer state, resident or offloaded."""

    def __init__(self, numels: list[int], kinds: dict[str, float], *, masters: bool,
                 offload: bool, device: torch.device, pin_memory: bool = True, slots: int = 2):
        if slots not in (1, 2):
            raise ValueError(f"offload slots must be 1 or 2, got {slots!r}")
        self.device = torch.device(device)
        self.offload = offload
        # The owner fills the masters (from its weights) once the buffers exist.
        self.kinds = ({MASTER: 0.0} if masters else {}) | dict(kinds)
        self.numels = list(numels)
        on_cuda = self.device.type == "cuda"
        self.pinned = offload and pin_memory and on_cuda and torch.cuda.is_available()
        home_device = torch.device("cpu") if offload else self.device
        self.home: list[dict[str, Tensor]] = []
        for n in self.numels:
            self.home.append({k: self._alloc(n, home_device, fill) for k, fill in self.kinds.items()})
        # Two slots let the copy-out of the group just updated and the copy-in of the next one run
        # at once, on the two copy engines (one per direction). One slot serialises them (the copy-in
        # must wait until the copy-out has read the slot) and saves one group's state of memory.
        self.slots: list[dict[str, Tensor]] = []
        if offload and self.kinds:
            biggest = max(self.numels)
            self.slots = [{k: self._alloc(biggest, self.device, 0.0) for k in self.kinds} for _ in range(slots)]
        self._slot_group: list[int | None] = [None] * len(self.slots)
        self._last_use = [0] * len(self.slots)  # when each slot was last acquired (least recently used is refilled)
        self._uses = 0
        # Per slot: the copy-in that fills it, and the copy-out still reading it (None when nothing is pending).
        self._filled: list[torch.cuda.Event | None] = [None] * len(self.slots)
        self._emptied: list[torch.cuda.Event | None] = [None] * len(self.slots)
        # Released slots whose copy home has not started: slot -> the compute stream's event after the update.
        self._released: dict[int, torch.cuda.Event | None] = {}
        self.defer_copy_out = False  # set by start_copy_outs_before: copies home wait for that module
        self._prefetch_after_copy_out: int | None = None  # a group whose slot is still to be copied home
        cuda_copies = offload and on_cuda
        self._h2d = torch.cuda.Stream(self.device) if cuda_copies else None
        self._d2h = torch.cuda.Stream(self.device) if cuda_copies else None

    def _alloc(self, n: int, device: torch.device, fill: float) -> Tensor:
        pin = self.pinned and device.type == "cpu"
        return torch.full((n,), fill, dtype=torch.float32, device=device, pin_memory=pin)

    def slot_of(self, g: int) -> int | None:
        """Index of the slot holding (or receiving) group ``g``, or None."""
        return self._slot_group.index(g) if g in self._slot_group else None

    def prefetch(self, g: int) -> None:
        """Start copying group ``g``'s buffers to the device (no-op when resident or already in a slot)."""
        if not self.offload or not self.kinds or g in self._slot_group:
            return
        s = min(range(len(self.slots)), key=lambda i: self._last_use[i])
        if s in self._released:  # one slot, or a short cycle: the group leaving must go home first,
            if self.defer_copy_out:  # and its copy home waits for the next forward: so does this copy-in
                self._prefetch_after_copy_out = g
                return
            self._start_copy_out(s)
        self._slot_group[s] = g
        self._last_use[s] = self._uses = self._uses + 1  # not refilled before it is acquired
        n = self.numels[g]
        if self._h2d is None:
            for k, dst in self.slots[s].items():
                dst[:n].copy_(self.home[g][k])
            return
        with torch.cuda.stream(self._h2d):
            if self._emptied[s] is not None:  # the slot's previous group may still be on its way home
                self._h2d.wait_event(self._emptied[s])
                self._emptied[s] = None
            for k, dst in self.slots[s].items():
                dst[:n].copy_(self.home[g][k], non_blocking=True)
                # If the store is freed with this copy queued, the allocator must not hand the
                # slot to the compute stream before the copy has run.
                dst.record_stream(self._h2d)
            self._filled[s] = torch.cuda.Event()
            self._filled[s].record(self._h2d)

    def acquire(self, g: int) -> dict[str, Tensor]:
        """Group ``g``'s flat buffers on the device, ready for the compute stream to update."""
        if not self.offload or not self.kinds:
            return self.home[g]
        if g not in self._slot_group:
            self.start_copy_outs()  # a copy-in waiting for a copy-out is needed now
        self.prefetch(g)
        s = self.slot_of(g)
        self._last_use[s] = self._uses = self._uses + 1
        # The same group again before its copy home started: the slot still holds its newest state, so
        # that copy is not needed (the next release queues one after this update).
        self._released.pop(s, None)
        compute = torch.cuda.current_stream(self.device) if self._h2d is not None else None
        for pending in (self._filled, self._emptied):
            # The copy-in must have landed; and if the same group was just released (it follows
            # itself: one group, or a random order repeating across a cycle boundary), its copy-out
            # must have read the slot before this update overwrites it.
            if pending[s] is not None:
                compute.wait_event(pending[s])
                pending[s] = None
        n = self.numels[g]
        return {k: buf[:n] for k, buf in self.slots[s].items()}

    def release(self, g: int) -> None:
        """Group ``g``'s slot is updated: copy it home, now or (``defer_copy_out``) at ``start_copy_outs``."""
        if not self.offload or not self.kinds:
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
        copy-in that was waiting for one of them."""
        for s in list(self._released):
            self._start_copy_out(s)
        g, self._prefetch_after_copy_out = self._prefetch_after_copy_out, None
        if g is not None:
            self.prefetch(g)

    def _start_copy_out(self, s: int) -> None:
        updated = self._released.pop(s)
        g = self._slot_group[s]
        n = self.numels[g]
        if self._d2h is None:
            for k, src in self.slots[s].items():
                self.home[g][k].copy_(src[:n])
            return
        self._d2h.wait_event(updated)
        with torch.cuda.stream(self._d2h):
            for k, src in self.slots[s].items():
                self.home[g][k].copy_(src[:n], non_blocking=True)
                src.record_stream(self._d2h)
            self._emptied[s] = torch.cuda.Event()
            self._emptied[s].record(self._d2h)

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
        self._slot_group, self._filled, self._emptied = [None] * n, [None] * n, [None] * n
        self._prefetch_after_copy_out = None

    def bytes_by_location(self) -> dict[str, int]:
        """Bytes of masters + state on the device (home if resident, else the slots) and on the host."""
        def size(bufs: list[dict[str, Tensor]]) -> int:
            return sum(t.numel() * t.element_size() for b in bufs for t in b.values())
        home, slots = size(self.home), size(self.slots)
        if not self.offload:
            return {"device": home, "host_pinned": 0, "host_pageable": 0}
        return {"device": slots, "host_pinned": home if self.pinned else 0,
                "host_pageable": 0 if self.pinned else home}


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


def build_store(sharding, groups: list[list[nn.Parameter]], kinds: dict[str, float], *, flat: bool, masters: bool,
                offload: bool, pin_memory: bool, slots: int) -> GroupStore:
    """Lay ``groups`` out for the update (``sharding``; flat if asked or sharded) and allocate their masters, state."""
    sharding.bind(groups, flat=flat or sharding.always_flat, masters=masters)
    device = groups[0][0].device
    if sharding.grads is not None and device.type == "cuda":
        # The per-parameter storages the flat buffers replaced stay reserved by the caching
        # allocator, and no later allocation (a group-sized buffer, activations) fits their
        # sizes well: without this the reserved memory holds the weights twice.
        torch.cuda.empty_cache()
    return GroupStore(sharding.store_numels, kinds, masters=masters, offload=offload, device=device,
                      pin_memory=pin_memory, slots=slots)


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
