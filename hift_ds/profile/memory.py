"""``MemoryProfiler``: device, allocator, RSS and pinned host memory sampled during training, with phases.

Library use::

    with MemoryProfiler(interval_ms=10) as prof:
        prof.attach(optimizer)              # pinned host figures from optimizer.memory_report()
        with prof.phase("forward"):
            loss = model(ids, labels=ids).loss
        ...
    prof.summary(); prof.plot("timeline.png")

A background thread samples, every ``interval_ms``: device used memory of this GPU (pynvml, the
driver's view, includes the CUDA context and other processes), ``torch.cuda.memory_allocated`` /
``memory_reserved`` (the caching allocator's view), process RSS (psutil) and pinned host memory.
Without a GPU, or when pynvml fails, it samples what it can (host memory only without CUDA) and
logs one line saying so. ``SavedTensorMeter`` measures the activations autograd keeps for backward.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from typing import Any, Iterator

import psutil
import torch

logger = logging.getLogger(__name__)

SERIES = ("device_used", "allocated", "reserved", "rss", "pinned_host")
PHASE_COLORS = {"forward": "tab:blue", "backward": "tab:orange", "step": "tab:green"}


class MemoryProfiler:
    """Samples device, allocator, RSS and pinned host memory on a background thread, with phases."""

    def __init__(self, interval_ms: float = 10.0, device: int | None = None, optimizer: Any = None):
        if interval_ms <= 0:
            raise ValueError(f"interval_ms must be > 0, got {interval_ms}")
        self.interval_s = interval_ms / 1000.0
        self.device = device
        self.optimizer = optimizer
        self.gpu = False  # torch sees CUDA: allocator figures
        self.nvml = False  # pynvml works: device-level figures
        self.note: str | None = None
        self.pinned_source = "none"
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._proc = psutil.Process()
        self._reset()

    def _reset(self) -> None:
        self._samples: list[tuple] = []
        self._spans: list[list] = []
        self._current: str | None = None
        self._alloc_peaks: dict[str | None, int] = {}
        self._pinned = 0
        self._t0 = time.perf_counter()
        self._t1: float | None = None
        self._sample_failed = False

    # ---- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> "MemoryProfiler":
        self.start()
        return self

    def __exit__(self, *exc) -> bool:
        self.stop()
        return False  # never swallow the body's exception

    @property
    def running(self) -> bool:
        """Whether the sampler thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def attach(self, optimizer: Any) -> None:
        """Read pinned host memory from ``optimizer.memory_report()`` (HiFTOptimizer) at each phase mark."""
        self.optimizer = optimizer
        if self.running:
            self._refresh_pinned()

    def start(self) -> None:
        """Start sampling (``with`` does this)."""
        if self.running:
            raise RuntimeError("MemoryProfiler is already running; use one with-block per profiler")
        self._reset()
        self._setup_devices()
        if self.gpu:
            torch.cuda.reset_peak_memory_stats(self.device)
        self._refresh_pinned()
        self._sample()
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="hift-memory-profiler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the sampler thread and close the open phase; safe to call twice."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=max(5.0, 10 * self.interval_s))
        if self._thread.is_alive():
            logger.warning("memory sampler thread did not stop within its timeout; it is a daemon and will not block exit")
        self._thread = None
        self._boundary()
        self._t1 = time.perf_counter() - self._t0
        if self._spans and self._spans[-1][2] is None:
            self._spans[-1][2] = self._t1
        if self.nvml:
            with contextlib.suppress(Exception):
                import pynvml
                pynvml.nvmlShutdown()

    def _setup_devices(self) -> None:
        reason = None
        try:
            import pynvml
            pynvml.nvmlInit()
            self.nvml = True
        except ImportError as e:
            reason = f"pynvml is not installed ({e}; pip install nvidia-ml-py)"
        except Exception as e:  # pynvml.NVMLError and its subclasses, e.g. NVMLError_LibraryNotFound
            reason = f"NVML unavailable: {e}"
        self.gpu = torch.cuda.is_available()
        if self.gpu and self.device is None:
            self.device = torch.cuda.current_device()
        if self.nvml and self.gpu:
            self._handle = self._nvml_handle(pynvml)
        elif self.nvml:
            pynvml.nvmlShutdown()
            self.nvml = False
        if not self.gpu:
            self.note = f"no GPU ({reason or 'torch sees no CUDA device'}): profiling host memory only (RSS, pinned)"
        elif reason:
            self.note = f"no device-level GPU figures ({reason}): torch allocator and host memory only"
        else:
            self.note = None
        if self.note:
            logger.warning("%s", self.note)

    def _nvml_handle(self, pynvml):
        # Match by UUID: NVML numbers physical GPUs, torch numbers those CUDA_VISIBLE_DEVICES shows.
        with contextlib.suppress(Exception):
            uuid = str(torch.cuda.get_device_properties(self.device).uuid)
            return pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
        return pynvml.nvmlDeviceGetHandleByIndex(self.device)

    # ---- sampling ----------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def _sample(self) -> None:
        try:
            dev = alloc = reserved = None
            if self.nvml:
                import pynvml
                dev = int(pynvml.nvmlDeviceGetMemoryInfo(self._handle).used)
            if self.gpu:
                alloc = torch.cuda.memory_allocated(self.device)
                reserved = torch.cuda.memory_reserved(self.device)
            rss = self._proc.memory_info().rss
            with self._lock:
                self._samples.append((time.perf_counter() - self._t0, dev, alloc, reserved, rss, self._pinned,
                                      self._current))
        except Exception as e:  # a sampler must never kill the training it observes
            if not self._sample_failed:
                self._sample_failed = True
                logger.warning("memory sampling failed (%s: %s); later failures are not reported",
                               type(e).__name__, e)

    def _refresh_pinned(self) -> None:
        report = getattr(self.optimizer, "memory_report", None)
        if callable(report):
            self._pinned, self.pinned_source = int(report().get("state_host_pinned", 0)), "optimizer.memory_report"
        elif self.gpu:
            # Any pinned tensor (DeepSpeed's offload buffers too) comes from torch's host allocator.
            stats = torch.cuda.host_memory_stats()
            self._pinned, self.pinned_source = int(stats.get("allocated_bytes.current", 0)), "torch.cuda.host_memory_stats"

    def _boundary(self) -> None:
        """Close the current phase: a sample of its end state and its exact allocator peak."""
        self._refresh_pinned()
        self._sample()
        if self.gpu:
            peak = torch.cuda.max_memory_allocated(self.device)
            self._alloc_peaks[self._current] = max(self._alloc_peaks.get(self._current, 0), peak)
            torch.cuda.reset_peak_memory_stats(self.device)

    # ---- phases ------------------------------------------------------------------------------
    def mark(self, name: str | None) -> None:
        """Start phase ``name`` now (ending the current one); ``None`` means no phase."""
        if not self.running:
            raise RuntimeError("mark() needs a running profiler (inside its with-block)")
        self._boundary()
        now = time.perf_counter() - self._t0
        if self._spans and self._spans[-1][2] is None:
            self._spans[-1][2] = now
        self._current = name
        if name is not None:
            self._spans.append([name, now, None])

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator["MemoryProfiler"]:
        """``with prof.phase("forward"):`` marks ``name`` for the block, then returns to the enclosing phase."""
        outer = self._current
        self.mark(name)
        try:
            yield self
        finally:
            if self.running:
                self.mark(outer)

    # ---- results -----------------------------------------------------------------------------
    def timeline(self) -> dict[str, list]:
        """The samples as columns: ``t`` (s), the memory series (bytes or None) and ``phase``."""
        with self._lock:
            rows = list(self._samples)
        cols = list(zip(*rows)) if rows else [()] * (2 + len(SERIES))
        return {"t": list(cols[0]), **{k: list(c) for k, c in zip(SERIES, cols[1:-1])}, "phase": list(cols[-1])}

    def spans(self) -> list[list]:
        """Phase intervals as ``[name, start_s, end_s]`` (end None while open)."""
        return [list(s) for s in self._spans]

    def summary(self) -> dict[str, Any]:
        """Peaks overall and per phase, sample count, duration and whether a GPU was seen."""
        tl = self.timeline()

        def peaks(keep) -> dict[str, int | None]:
            out = {}
            for k in SERIES:
                vals = [v for v, ph in zip(tl[k], tl["phase"]) if v is not None and keep(ph)]
                out[k] = max(vals) if vals else None
            exact = [v for ph, v in self._alloc_peaks.items() if keep(ph)]
            if exact:  # between two samples the allocator may have peaked higher than either
                out["allocated"] = max(exact + [out["allocated"] or 0])
            return out

        phases: dict[str, dict] = {}
        for name, start, end in self._spans:
            ph = phases.setdefault(name, {"time_s": 0.0, "count": 0})
            ph["time_s"] += (end if end is not None else time.perf_counter() - self._t0) - start
            ph["count"] += 1
        for name, ph in phases.items():
            ph["peak"] = peaks(lambda p, n=name: p == n)
        return {"gpu": self.gpu, "nvml": self.nvml, "note": self.note, "samples": len(tl["t"]),
                "interval_ms": self.interval_s * 1000, "duration_s": self._t1 if self._t1 is not None else
                time.perf_counter() - self._t0, "pinned_source": self.pinned_source,
                "peak": peaks(lambda p: True), "phases": phases}

    def plot(self, path: str | os.PathLike, title: str = "memory") -> None:
        """Write a PNG timeline of every series with the phases shaded."""
        plot_timelines([{"title": title, "timeline": self.timeline(), "spans": self.spans()}], path)


def plot_timelines(panels: list[dict], path: str | os.PathLike) -> None:
    """One stacked subplot per panel: ``title`` + ``timeline``/``spans``, or ``title`` + ``message``."""
    # Figure + Agg canvas directly: no pyplot, so the caller's matplotlib backend is left alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    fig = Figure(figsize=(10, 2.8 * max(1, len(panels))), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(max(1, len(panels)), 1, squeeze=False)[:, 0]
    for ax, panel in zip(axes, panels):
        ax.set_title(panel["title"], fontsize=10, loc="left")
        tl = panel.get("timeline")
        if not tl or not tl.get("t"):
            ax.text(0.5, 0.5, panel.get("message", "no samples"), ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
            continue
        top = max((v for k in SERIES for v in tl[k] if v is not None), default=0)
        unit, scale = ("GiB", 2 ** 30) if top >= 2 ** 30 else ("MiB", 2 ** 20)
        for k in SERIES:
            pts = [(t, v / scale) for t, v in zip(tl["t"], tl[k]) if v is not None]
            if pts and any(v for _, v in pts):
                ax.plot(*zip(*pts), label=k.replace("_", " "), lw=1.2)
        seen = {}
        for name, start, end in panel.get("spans", []):
            color = PHASE_COLORS.get(name, f"C{3 + len(seen) % 6}")
            seen.setdefault(name, color)
            ax.axvspan(start, end if end is not None else tl["t"][-1], color=seen[name], alpha=0.12, lw=0)
        handles, _ = ax.get_legend_handles_labels()
        handles += [Patch(color=c, alpha=0.3, label=n) for n, c in seen.items()]
        ax.legend(handles=handles, fontsize=7, loc="upper left", ncol=2)
        ax.set_ylabel(unit)
        ax.set_xlabel("time (s)")
        ax.grid(alpha=0.3)
    fig.savefig(os.fspath(path), dpi=100)


class SavedTensorMeter:
    """Bytes of the tensors autograd saves for backward (activations) inside ``with meter:``; parameters excluded.

    Counted through ``torch.autograd.graph.saved_tensors_hooks``, once per storage, so a tensor saved by
    several operations counts once. Parameters (and views of them) are weights, not activations.
    """

    def __init__(self, model: torch.nn.Module):
        self._params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self._seen: set[int] = set()
        self.bytes = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self._seen and ptr not in self._params:
            self._seen.add(ptr)
            self.bytes += storage.nbytes()
        return t

    def __enter__(self) -> "SavedTensorMeter":
        self._seen.clear()
        self.bytes = 0
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> bool:
        self._hooks.__exit__(*exc)
        return False
