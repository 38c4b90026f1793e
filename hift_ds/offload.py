"""Home of every HiFT group's fp32 masters and optimizer state, with asynchronous prefetch.

Each group owns one contiguous fp32 buffer per kind ("master", "exp_avg", ...), allocated once.
With offload the buffers live in (pinned) host memory and the active group is copied into one
device slot; the finished group's copy-out and then the next group's copy-in run on a side CUDA
stream ordered by events, so both overlap the next forward/backward. Without CUDA the same code runs
with plain synchronous copies, which is what CPU CI exercises.
"""
from __future__ import annotations

import torch
from torch import Tensor

MASTER = "master"


class GroupStore:
    """Flat per-group buffers of masters and optimizer state, resident or offloaded."""

    def __init__(self, numels: list[int], kinds: dict[str, float], *, masters: bool,
                 offload: bool, device: torch.device, pin_memory: bool = True):
        self.device = torch.device(device)
        self.offload = offload
        # The owner fills the masters (from its weights) once the buffers exist.
        self.kinds = ({MASTER: 0.0} if masters else {}) | dict(kinds)
        self.numels = list(numels)
        self.allocations = 0  # counted so tests can prove nothing is allocated per step
        on_cuda = self.device.type == "cuda"
        self.pinned = offload and pin_memory and on_cuda and torch.cuda.is_available()
        home_device = torch.device("cpu") if offload else self.device
        self.home: list[dict[str, Tensor]] = []
        for g, n in enumerate(self.numels):
            self.home.append({k: self._alloc(n, home_device, fill) for k, fill in self.kinds.items()})
        # One device slot suffices: the next group is prefetched right after the finished one's
        # write-back is queued on the same copy stream, so the copy-in cannot overtake the
        # copy-out, and both run during the next forward/backward. A second slot would only
        # help if prefetch started before the active group's update, and would cost a group's
        # worth of device memory.
        self._slot: dict[str, Tensor] = {}
        self._slot_group: int | None = None
        self._ready: torch.cuda.Event | None = None
        if offload and self.kinds:
            biggest = max(self.numels)
            self._slot = {k: self._alloc(biggest, self.device, 0.0) for k in self.kinds}
        self._stream = torch.cuda.Stream(self.device) if offload and on_cuda else None

    def _alloc(self, n: int, device: torch.device, fill: float) -> Tensor:
        self.allocations += 1
        pin = self.pinned and device.type == "cpu"
        return torch.full((n,), fill, dtype=torch.float32, device=device, pin_memory=pin)

    def prefetch(self, g: int) -> None:
        """Start copying group ``g``'s buffers to the device (no-op when resident or not offloaded)."""
        if not self.offload or not self.kinds or self._slot_group == g:
            return
        self._slot_group = g
        n = self.numels[g]
        if self._stream is None:
            for k, dst in self._slot.items():
                dst[:n].copy_(self.home[g][k])
            return
        with torch.cuda.stream(self._stream):
            for k, dst in self._slot.items():
                dst[:n].copy_(self.home[g][k], non_blocking=True)
                # If the store is freed with this copy queued, the allocator must not hand the
                # slot to the compute stream before the copy has run.
                dst.record_stream(self._stream)
            self._ready = torch.cuda.Event()
            self._ready.record(self._stream)

    def acquire(self, g: int) -> dict[str, Tensor]:
        """Group ``g``'s flat buffers on the device, ready for the compute stream to update."""
        if not self.offload or not self.kinds:
            return self.home[g]
        self.prefetch(g)
        if self._ready is not None:
            torch.cuda.current_stream(self.device).wait_event(self._ready)
            self._ready = None
        n = self.numels[g]
        return {k: buf[:n] for k, buf in self._slot.items()}

    def release(self, g: int) -> None:
        """Write group ``g``'s updated device buffers back home, asynchronously on CUDA."""
        if not self.offload or not self.kinds:
            return
        if self._slot_group != g:
            raise RuntimeError(f"GroupStore.release({g}) but the device slot holds group {self._slot_group}")
        n = self.numels[g]
        if self._stream is None:
            for k, src in self._slot.items():
                self.home[g][k].copy_(src[:n])
            return
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(self.device))
        self._stream.wait_event(done)
        with torch.cuda.stream(self._stream):
            for k, src in self._slot.items():
                self.home[g][k].copy_(src[:n], non_blocking=True)
                src.record_stream(self._stream)
            # If the same group is acquired again next (one group, or a random order repeating
            # across a cycle boundary) no prefetch is queued, and its update must not overwrite
            # the slot while this copy-out still reads it.
            self._ready = torch.cuda.Event()
            self._ready.record(self._stream)

    def synchronize(self) -> None:
        """Wait for every pending copy so the home buffers are current (before reading them)."""
        if self._stream is not None:
            self._stream.synchronize()

    def invalidate(self) -> None:
        """Forget slot contents after the home buffers were overwritten (checkpoint load)."""
        self.synchronize()
        self._slot_group = None
        self._ready = None

    def bytes_by_location(self) -> dict[str, int]:
        """Bytes of masters + state on the device (home if resident, else the slot) and on the host."""
        def size(bufs: list[dict[str, Tensor]]) -> int:
            return sum(t.numel() * t.element_size() for b in bufs for t in b.values())
        home, slots = size(self.home), size([self._slot])
        if not self.offload:
            return {"device": home, "host_pinned": 0, "host_pageable": 0}
        return {"device": slots, "host_pinned": home if self.pinned else 0,
                "host_pageable": 0 if self.pinned else home}
