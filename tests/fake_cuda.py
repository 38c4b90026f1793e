"""A simulated CUDA device, so CPU tests can check the offload store's streams, events and pinning.

Each stream is a queue of work. One schedule is chosen per simulation, each the worst case for one
kind of missing wait:
- ``late="copies"``: the compute stream (the default stream of ``compute_device``, where a test
  launches its updates) runs its work at once, every other stream as late as the ordering allows:
  only when the host synchronizes it or makes a blocking copy, or when a stream that runs waits for
  one of its events. A compute that does not wait for a copy-in reads a stale slot, and a copy-in
  that does not wait for a copy-out overwrites the slot before it was read.
- ``late="compute"``: the compute stream is the late one and every other stream runs at once. A
  copy-out that does not wait for the update copies the old values home.
As in torch, a copy runs on the current stream of the CUDA device its tensor is on, and the defaults
are kept: ``Stream(None)``, ``current_stream(None)``: the current device; ``Event.record(None)``: the
current stream; ``torch.cuda.stream(None)``: no change. Tensors "on" a simulated device are CPU
tensors remembered by storage; pinning is recorded, not done (torch here may have no CUDA):
``pin_memory=True`` marks a storage, ``torch.cuda.cudart().cudaHostRegister`` a byte range, as the
driver does (whole pages; a range overlapping one already registered, an unregister of an address
not registered and an unregister while a stream still has queued work are errors, recorded in
``errors``).
"""
from __future__ import annotations

import contextlib
from typing import Callable

import pytest
import torch
from torch.overrides import TorchFunctionMode

_SIM: FakeCuda | None = None  # the simulation in progress (torch.cuda.Stream(device) has no other way to find it)


class FakeStream:
    """A queue of work on one simulated device."""

    def __init__(self, device: torch.device | int | str | None = None, priority: int = 0):
        self.device = _SIM.resolve(device)
        _SIM.streams.append(self)
        self.work: list[Callable[[], None]] = []
        self.done = 0  # how many queued items have run

    def enqueue(self, fn: Callable[[], None]) -> int:
        """Queue ``fn`` (run now unless this stream is late); its position, for events."""
        self.work.append(fn)
        if not _SIM.is_late(self):
            self.run_until(len(self.work))
        return len(self.work)

    def run_until(self, position: int) -> None:
        """Run the queued work up to ``position``."""
        while self.done < position:
            fn = self.work[self.done]
            self.done += 1
            with torch._C.DisableTorchFunction():
                fn()

    def wait_event(self, event: FakeEvent) -> None:
        """Work queued from now on runs after ``event``'s work."""
        if not isinstance(event, FakeEvent):
            raise TypeError(f"Stream.wait_event needs an Event, got {event!r}")
        self.enqueue(event.synchronize)

    def synchronize(self) -> None:
        """Run everything queued."""
        self.run_until(len(self.work))


class FakeEvent:
    """A point in one stream's queue."""

    def __init__(self, *args, **kwargs):
        self.stream: FakeStream | None = None
        self.position = 0

    def record(self, stream: FakeStream | None = None) -> None:
        """Mark the end of ``stream``'s queued work (the current stream's when None)."""
        stream = _SIM.current_stream() if stream is None else stream
        if not isinstance(stream, FakeStream):
            raise TypeError(f"Event.record needs a Stream, got {stream!r}")
        self.stream, self.position = stream, len(stream.work)

    def synchronize(self) -> None:
        """Run the work before this event."""
        if self.stream is not None:
            self.stream.run_until(self.position)


class FakeCuda(TorchFunctionMode):
    """The simulation's state, and the torch-function mode that queues copies of simulated-device tensors."""

    def __init__(self, late: str, compute_device: torch.device):
        super().__init__()
        if late not in ("copies", "compute"):
            raise ValueError(f"late must be 'copies' or 'compute', got {late!r}")
        self.late = late
        self.current_device = 0
        self._default: dict[int, FakeStream] = {}
        self._current: dict[int, FakeStream] = {}  # per device index, inside torch.cuda.stream(...)
        self.tensors: dict[int, tuple[torch.device, bool]] = {}  # storage address -> (device, pinned)
        self.copies: list[tuple[FakeStream, bool]] = []  # (stream, non_blocking) of every device copy
        self.streams: list[FakeStream] = []  # every stream made, to check none has queued work at an unregister
        self.registered: dict[int, int] = {}  # cudaHostRegister: address -> bytes, while registered
        self.unregistered: list[tuple[int, int]] = []  # (address, bytes) of every unregister, in order
        self.errors: list[str] = []
        self.compute_device = self.resolve(compute_device)

    @property
    def compute(self) -> FakeStream:
        """The stream a test launches its updates on."""
        return self.default_stream(self.compute_device)

    def is_late(self, stream: FakeStream) -> bool:
        """Whether ``stream`` runs its work only when something needs it."""
        return (stream is self.compute) == (self.late == "compute")

    def resolve(self, device: torch.device | int | str | None) -> torch.device:
        """torch.cuda's reading of a device argument: None (or no index) is the current device."""
        device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device or "cuda")
        return torch.device("cuda", self.current_device if device.index is None else device.index)

    def default_stream(self, device: torch.device | int | None = None) -> FakeStream:
        """The device's default stream."""
        index = self.resolve(device).index
        if index not in self._default:
            self._default[index] = FakeStream(index)
        return self._default[index]

    def current_stream(self, device: torch.device | int | None = None) -> FakeStream:
        """``torch.cuda.current_stream``."""
        index = self.resolve(device).index
        return self._current.get(index) or self.default_stream(index)

    @contextlib.contextmanager
    def stream(self, stream: FakeStream | None):
        """``torch.cuda.stream``: make ``stream`` current, and its device; None changes nothing."""
        if stream is None:
            yield
            return
        index, device_before = stream.device.index, self.current_device
        stream_before = self._current.get(index)
        self.current_device, self._current[index] = index, stream
        try:
            yield
        finally:
            self.current_device = device_before
            if stream_before is None:
                del self._current[index]
            else:
                self._current[index] = stream_before

    def launch(self, fn: Callable[[], None]) -> None:
        """Queue compute on the compute stream, as a kernel launch would."""
        self.compute.enqueue(fn)

    def where(self, t: torch.Tensor) -> tuple[torch.device, bool]:
        """(device, pinned) of a tensor the simulation allocated, pinned also when every byte of it lies in a
        registered range; (cpu, False) for any other."""
        device, pinned = self.tensors.get(t.untyped_storage().data_ptr(), (torch.device("cpu"), False))
        return device, pinned or (device.type == "cpu" and self.registered_bytes(t.data_ptr(), t.numel() *
                                                                                 t.element_size()) > 0)

    def registered_bytes(self, ptr: int, nbytes: int) -> int:
        """``nbytes`` if [ptr, ptr + nbytes) lies in one registered range, else 0."""
        return nbytes if any(a <= ptr and ptr + nbytes <= a + n for a, n in self.registered.items()) else 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in (torch.full, torch.empty):
            device = torch.device(kwargs.pop("device", None) or "cpu")
            pinned = bool(kwargs.pop("pin_memory", False))
            if device.type == "cuda":
                if pinned:
                    raise RuntimeError("only CPU tensors can be pinned")
                device = self.resolve(device)
            t = func(*args, **kwargs)
            self.tensors[t.untyped_storage().data_ptr()] = (device, pinned)
            return t
        if func is torch.Tensor.copy_:
            dst, src = (list(args) + [kwargs.pop("src", None)])[:2]
            if not isinstance(src, torch.Tensor):
                raise TypeError(f"copy_ needs a source tensor, got {src!r}")
            on = next((d for d in (self.where(dst)[0], self.where(src)[0]) if d.type == "cuda"), None)
            if on is not None:
                stream, blocking = self.current_stream(on), not kwargs.get("non_blocking", False)
                self.copies.append((stream, not blocking))
                end = stream.enqueue(lambda: dst.copy_(src))
                if blocking:
                    stream.run_until(end)  # a blocking copy returns once it has run
                return dst
        return func(*args, **kwargs)


PAGE = 4096
ERROR_ALREADY_REGISTERED, ERROR_NOT_REGISTERED = 712, 713  # cudaErrorHostMemory{Already,Not}Registered


class FakeCudart:
    """``torch.cuda.cudart()``: page-locking host memory, recorded (cudaError codes as ints, 0 = success)."""

    def __init__(self, sim: FakeCuda):
        self.sim = sim

    def cudaHostRegister(self, ptr: int, size: int, flags: int) -> int:  # noqa: N802 - the CUDA name
        sim = self.sim
        first, end = ptr // PAGE * PAGE, -(-(ptr + size) // PAGE) * PAGE  # the driver locks whole pages
        if any(first < -(-(a + n) // PAGE) * PAGE and a // PAGE * PAGE < end for a, n in sim.registered.items()):
            sim.errors.append(f"cudaHostRegister({ptr:#x}, {size}): overlaps a registered range")
            return ERROR_ALREADY_REGISTERED
        sim.registered[ptr] = size
        return 0

    def cudaHostUnregister(self, ptr: int) -> int:  # noqa: N802 - the CUDA name
        sim = self.sim
        if ptr not in sim.registered:
            sim.errors.append(f"cudaHostUnregister({ptr:#x}): not registered")
            return ERROR_NOT_REGISTERED
        busy = [s for s in sim.streams if s.done < len(s.work)]
        if busy:
            sim.errors.append(f"cudaHostUnregister({ptr:#x}) with work still queued on {len(busy)} stream(s)")
        sim.unregistered.append((ptr, sim.registered.pop(ptr)))
        return 0


def _record_stream(tensor: torch.Tensor, stream: FakeStream) -> None:
    """``Tensor.record_stream``: checks its argument (the caching allocator is not simulated)."""
    if not isinstance(stream, FakeStream):
        raise TypeError(f"record_stream needs a Stream, got {stream!r}")


@contextlib.contextmanager
def fake_cuda(late: str, compute_device: str = "cuda:1"):
    """Simulate CUDA (``torch.cuda``'s streams, events, availability) for the ``with`` body."""
    global _SIM
    _SIM = FakeCuda(late, compute_device)
    with pytest.MonkeyPatch.context() as mp:
        cudart = FakeCudart(_SIM)
        for name, value in {"is_available": lambda: True, "Stream": FakeStream, "Event": FakeEvent,
                            "stream": _SIM.stream, "current_stream": _SIM.current_stream,
                            "cudart": lambda: cudart}.items():
            mp.setattr(torch.cuda, name, value)
        mp.setattr(torch.Tensor, "record_stream", _record_stream)
        try:
            with _SIM:
                yield _SIM
        finally:
            _SIM = None
