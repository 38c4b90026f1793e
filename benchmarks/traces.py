"""Profiler traces of the offload benchmarks: did the side streams' copies overlap compute kernels?

``overlap_summary`` reads the chrome-trace events torch.profiler exports; ``save_trace`` writes them
gzipped (chrome://tracing and Perfetto open the .json.gz as is).
"""
from __future__ import annotations

import bisect
import gzip
import json
from pathlib import Path


def save_trace(prof, path: Path) -> list[dict]:
    """Export ``prof``'s chrome trace to ``path`` + ".gz" (the plain JSON is not kept); its events."""
    path.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(path))
    text = path.read_text()
    path.unlink()
    with gzip.open(path.with_suffix(path.suffix + ".gz"), "wt") as f:
        f.write(text)
    return json.loads(text)["traceEvents"]


def _merge(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for s, e in sorted(intervals):
        if merged and s <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], e))
        else:
            merged.append((s, e))
    return merged


def _covered(merged: list[tuple[float, float]], starts: list[float], s: float, e: float) -> float:
    """Length of [s, e] covered by the sorted, disjoint ``merged`` intervals."""
    i, total = max(bisect.bisect_right(starts, s) - 1, 0), 0.0
    while i < len(merged) and merged[i][0] < e:
        total += max(0.0, min(e, merged[i][1]) - max(s, merged[i][0]))
        i += 1
    return total


def overlap_summary(events: list[dict]) -> dict:
    """From chrome-trace events: H2D/D2H memcpy time per stream and how much overlapped kernels on other streams."""
    kernels: dict[int, list[tuple[float, float]]] = {}
    copies = []
    for ev in events:
        if ev.get("ph") != "X" or "dur" not in ev:
            continue
        cat, name = ev.get("cat", ""), ev.get("name", "")
        stream = (ev.get("args") or {}).get("stream", ev.get("tid"))
        span = (float(ev["ts"]), float(ev["ts"]) + float(ev["dur"]))
        if cat == "kernel":
            kernels.setdefault(stream, []).append(span)
        elif cat == "gpu_memcpy" and ("HtoD" in name or "DtoH" in name):
            copies.append((stream, "HtoD" if "HtoD" in name else "DtoH", span))
    others: dict[int, tuple[list, list]] = {}
    streams: dict[str, dict] = {}
    for stream, direction, (s, e) in copies:
        if stream not in others:
            merged = _merge([iv for st, ivs in kernels.items() if st != stream for iv in ivs])
            others[stream] = (merged, [m[0] for m in merged])
        merged, starts = others[stream]
        # A stream that runs no kernels is a copy (side) stream; copies on a compute stream cannot overlap it.
        entry = streams.setdefault(str(stream), {"side_stream": stream not in kernels, "HtoD_ms": 0.0,
                                                 "DtoH_ms": 0.0, "copies": 0, "memcpy_ms": 0.0, "overlapped_ms": 0.0})
        entry["copies"] += 1
        entry[f"{direction}_ms"] += (e - s) / 1e3
        entry["memcpy_ms"] += (e - s) / 1e3
        entry["overlapped_ms"] += _covered(merged, starts, s, e) / 1e3
    side = [v for v in streams.values() if v["side_stream"]]
    total = sum(v["memcpy_ms"] for v in side)
    over = sum(v["overlapped_ms"] for v in side)
    all_kernels = [iv for ivs in kernels.values() for iv in ivs]
    gpu = all_kernels + [span for _, _, span in copies]
    window_ms = (max(e for _, e in gpu) - min(s for s, _ in gpu)) / 1e3 if gpu else 0.0
    busy_ms = sum(e - s for s, e in _merge(all_kernels)) / 1e3
    return {"side_memcpy_ms": total, "side_overlapped_ms": over,
            "side_overlap_fraction": over / total if total else None,
            "kernel_ms": sum(e - s for s, e in all_kernels) / 1e3,
            # Kernels run only this share of the window: the rest is the GPU waiting (for the CPU to launch,
            # or for a copy), and copies there cannot overlap compute since none runs.
            "gpu_window_ms": window_ms, "kernel_busy_ms": busy_ms,
            "kernel_busy_fraction": busy_ms / window_ms if window_ms else None,
            "host_blocking_calls": host_blocking_calls(events),
            "compute_streams": sorted(str(s) for s in kernels), "streams": streams}


def host_blocking_calls(events: list[dict], top: int = 6) -> dict[str, dict]:
    """CUDA runtime calls that can hold the CPU (synchronizes, copies, waits): count and total ms, longest first."""
    calls: dict[str, dict] = {}
    for ev in events:
        name = ev.get("name", "")
        if ev.get("ph") != "X" or ev.get("cat") != "cuda_runtime" or not any(
                w in name for w in ("Synchronize", "Memcpy", "Wait", "HostAlloc", "Malloc", "Free")):
            continue
        c = calls.setdefault(name, {"count": 0, "ms": 0.0})
        c["count"] += 1
        c["ms"] += float(ev.get("dur", 0.0)) / 1e3
    return dict(sorted(calls.items(), key=lambda kv: -kv[1]["ms"])[:top])


def format_overlap(summary: dict) -> str:
    """The trace summary in words: side-stream copy time and the share that overlapped compute."""
    if summary.get("skipped"):
        return f"trace: skipped: {summary['skipped']}"
    lines = [f"trace: {summary.get('path')}, {summary.get('steps')} steps of {summary.get('mode', '?')}; kernels "
             f"{summary['kernel_ms']:.1f} ms on streams {', '.join(summary['compute_streams']) or '-'}"]
    for stream, v in summary["streams"].items():
        lines.append(f"  stream {stream} ({'side' if v['side_stream'] else 'compute'}): {v['copies']} copies, "
                     f"H2D {v['HtoD_ms']:.2f} ms, D2H {v['DtoH_ms']:.2f} ms, "
                     f"overlapping kernels on other streams {v['overlapped_ms']:.2f} ms")
    if summary.get("gpu_window_ms"):
        lines.append(f"  kernels busy {summary['kernel_busy_ms']:.1f} of {summary['gpu_window_ms']:.1f} ms of the "
                     f"GPU window ({100 * summary['kernel_busy_fraction']:.0f}%); host CUDA calls that can block: "
                     + (", ".join(f"{n} {c['count']}x {c['ms']:.1f} ms"
                                  for n, c in summary["host_blocking_calls"].items()) or "none"))
    frac = summary["side_overlap_fraction"]
    verdict = ("no side-stream copies found" if frac is None else
               f"{summary['side_overlapped_ms']:.2f} of {summary['side_memcpy_ms']:.2f} ms "
               f"({100 * frac:.0f}%) of side-stream copy time overlapped compute")
    lines.append("  => " + verdict)
    return "\n".join(lines)
