"""Issue 4: what offloading HiFT's optimizer state to pinned CPU memory costs, and whether prefetch hides it.

    python benchmarks/offload.py                          # LLaMA 1.1B shape, bf16, 4x512, group size 1
    python benchmarks/offload.py --trace trace/           # + torch.profiler trace of hift-offload (CUDA)
    python benchmarks/offload.py --headline               # + LLaMA-2-7B shape at 1x512 and 4x512 (CUDA)
    python benchmarks/offload.py --model tiny --steps 3   # quick check of the script (CPU works)

Modes (see benchmarks/harness.py): a = fpft, b = hift (state on the GPU), c = hift-offload-noprefetch,
d = hift-offload (prefetch on a side stream), d' = hift-offload-triton. Targets, from the numbers
measured in this run: peak(d) <= 0.5 x peak(a); step(d) <= 1.05 x step(b); step(d) <= 0.65 x step(a).
``--trace`` reports how much of the side stream's H2D/D2H copy time overlapped compute kernels.
"""
from __future__ import annotations

import argparse
import bisect
import json
import sys
from pathlib import Path

import torch

import harness

MODES = ["fpft", "hift", "hift-offload-noprefetch", "hift-offload", "hift-offload-triton"]
OFFLOADED = ("hift-offload", "hift-offload-triton")  # d and d'
HEADLINE_MODES = ("hift-offload", "hift-offload-triton")
HEADLINE_BATCHES = (1, 4)
HEADLINE_LIMIT_GIB = 24.0
TRACE_MODE = "hift-offload"


# ---- targets -----------------------------------------------------------------------------------
def targets(rows: list[dict]) -> list[dict]:
    """Issue 4's targets for each offloaded mode that ran: PASS/FAIL from this run's numbers, or n/a."""
    ok = {r["mode"]: r for r in rows if r["status"] == "ok"}
    checks = [("peak_alloc_gib", "fpft", 0.5, "peak GPU memory"), ("step_ms", "hift", 1.05, "step time"),
              ("step_ms", "fpft", 0.65, "step time")]
    out = []
    for d in OFFLOADED:
        for key, base, limit, what in checks:
            r = harness.ratio(ok[d], ok.get(base), key) if d in ok else None
            out.append({"mode": d, "target": f"{what}: {d} <= {limit:g} x {base}", "ratio": r, "limit": limit,
                        "result": "n/a" if r is None else ("PASS" if r <= limit else "FAIL")})
    return out


def format_targets(checks: list[dict]) -> str:
    """One line per target: ratio measured, limit, PASS/FAIL (n/a when a figure is missing)."""
    lines = ["targets (issue 4), from this run's measurements:"]
    for c in checks:
        got = f"{c['ratio']:.2f}x" if c["ratio"] is not None else "-"
        lines.append(f"  {c['result']:<5} {c['target']:<56} measured {got}")
    return "\n".join(lines)


# ---- profiler trace: did the copies overlap compute? -------------------------------------------
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
    return {"side_memcpy_ms": total, "side_overlapped_ms": over,
            "side_overlap_fraction": over / total if total else None,
            "kernel_ms": sum(e - s for ivs in kernels.values() for s, e in ivs) / 1e3,
            "compute_streams": sorted(str(s) for s in kernels), "streams": streams}


def format_overlap(summary: dict) -> str:
    """The trace summary in words: side-stream copy time and the share that overlapped compute."""
    if summary.get("skipped"):
        return f"trace: skipped: {summary['skipped']}"
    lines = [f"trace: {summary.get('path')}, {summary.get('steps')} steps of {TRACE_MODE}; kernels "
             f"{summary['kernel_ms']:.1f} ms on streams {', '.join(summary['compute_streams']) or '-'}"]
    for stream, v in summary["streams"].items():
        lines.append(f"  stream {stream} ({'side' if v['side_stream'] else 'compute'}): {v['copies']} copies, "
                     f"H2D {v['HtoD_ms']:.2f} ms, D2H {v['DtoH_ms']:.2f} ms, "
                     f"overlapping kernels on other streams {v['overlapped_ms']:.2f} ms")
    frac = summary["side_overlap_fraction"]
    verdict = ("no side-stream copies found" if frac is None else
               f"{summary['side_overlapped_ms']:.2f} of {summary['side_memcpy_ms']:.2f} ms "
               f"({100 * frac:.0f}%) of side-stream copy time overlapped compute")
    lines.append("  => " + verdict)
    return "\n".join(lines)


def trace_after(mode: str, run: harness.Run, args: argparse.Namespace) -> dict:
    """Worker hook: profile a few more steps of hift-offload on CUDA, export the chrome trace, summarise it."""
    if mode != TRACE_MODE or not args.trace:
        return {}
    if not torch.cuda.is_available():
        return {"trace": {"skipped": "needs CUDA; copy/compute overlap is a GPU property"}}
    from torch.profiler import ProfilerActivity, profile

    from hift_ds.presets import random_batch

    try:
        vocab, first = run.model.config.vocab_size, args.warmup + args.steps + 1
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for i in range(args.trace_steps):
                run.train_step(random_batch(vocab, args.batch_size, args.seq_len, first + i, "cuda"))
            torch.cuda.synchronize()
        path = Path(args.trace) / f"{TRACE_MODE}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(path))
        summary = overlap_summary(json.loads(path.read_text())["traceEvents"])
        return {"trace": {"path": str(path), "steps": args.trace_steps, **summary}}
    except Exception as exc:  # noqa: BLE001 - the timing row stays valid without the trace
        return {"trace": {"skipped": f"profiling failed: {type(exc).__name__}: {exc}"}}


# ---- headline: LLaMA-2-7B shape ----------------------------------------------------------------
def headline(args: argparse.Namespace) -> dict:
    """Peak GPU memory of HiFT with offload on the LLaMA-2-7B shape at 1x512 and 4x512 (fits in 24 GiB?)."""
    if not torch.cuda.is_available():
        return {"skipped": "needs CUDA; the LLaMA-2-7B shape runs on a GPU", "rows": []}
    rows = []
    for bsz in HEADLINE_BATCHES:
        hargs = harness.with_overrides(args, model="llama-7b", dtype="bf16", batch_size=bsz, seq_len=512,
                                       steps=args.headline_steps, warmup=1, trace=None)
        print(f"headline LLaMA-2-7B shape, batch {bsz}x512:", flush=True)
        rows += harness.run_modes_in_subprocesses(HEADLINE_MODES, hargs)
    for r in rows:
        peak = r.get("peak_reserved_gib")
        r["fits_24gib"] = None if peak is None else peak <= HEADLINE_LIMIT_GIB
    return {"limit_gib": HEADLINE_LIMIT_GIB, "rows": rows}


def format_headline(result: dict) -> str:
    """The headline rows: mode, batch, peak allocated/reserved and the 24 GiB verdict."""
    if result.get("skipped"):
        return f"headline: skipped: {result['skipped']}"
    lines = [f"headline: LLaMA-2-7B shape, bf16, seq 512: peak GPU memory (reserved must be <= "
             f"{HEADLINE_LIMIT_GIB:g} GiB; the CUDA context, ~0.5 GiB, is not in these figures)"]
    for r in result["rows"]:
        if r["status"] != "ok":
            lines.append(f"  {r['mode']:<22} batch {r['batch_size']}x512  {r['status']}: {r['error']}")
            continue
        verdict = "PASS (fits)" if r["fits_24gib"] else "FAIL (does not fit)"
        lines.append(f"  {r['mode']:<22} batch {r['batch_size']}x512  alloc {r['peak_alloc_gib']:.2f} GiB  "
                     f"reserved {r['peak_reserved_gib']:.2f} GiB  step {r['step_ms']:.0f} ms  {verdict}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the offload benchmark; returns the exit status."""
    ap = harness.make_parser(__doc__, __file__, model="llama-1b", batch_size=4, seq_len=512, group_size=1)
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ",".join(MODES))
    ap.add_argument("--trace", default=None, metavar="DIR", help=f"profile {TRACE_MODE} (CUDA), chrome trace in DIR")
    ap.add_argument("--trace-steps", type=int, default=4)
    ap.add_argument("--headline", action="store_true", help="also the LLaMA-2-7B shape at 1x512 and 4x512")
    ap.add_argument("--headline-steps", type=int, default=5)
    args = ap.parse_args(argv)
    if args._worker:
        return harness.worker_main(args, after=trace_after)

    modes = [m for m in args.modes.split(",") if m]
    print(f"offload benchmark on {harness.device_name()}: {', '.join(modes)}", flush=True)
    rows = harness.run_modes_in_subprocesses(modes, args)
    print()
    print(harness.format_table(rows, baseline=("fpft", "hift")))
    print()
    checks = targets(rows)
    print(format_targets(checks))
    if not torch.cuda.is_available():
        print("  (no GPU here: CPU timings say nothing about the GPU pipeline; memory targets are n/a)")
    trace = None
    if args.trace:
        trace = next((r.get("trace") for r in rows if r["mode"] == TRACE_MODE and r.get("trace")),
                     {"skipped": f"{TRACE_MODE} did not run"})
        print()
        print(format_overlap(trace))
    head = None
    if args.headline:
        print()
        head = headline(args)
        print(format_headline(head))
    if args.json:
        harness.write_json(args.json, {"meta": harness.meta(args), "rows": rows, "targets": checks,
                                       "trace": trace, "headline": head})
    return 0


if __name__ == "__main__":
    sys.exit(main())
