"""What offloading HiFT's optimizer state to pinned CPU memory costs, and whether the pipeline hides it.

    python benchmarks/offload.py                          # LLaMA 1.1B shape, bf16, 4x512, group size 1
    python benchmarks/offload.py --trace trace/           # + torch.profiler trace of hift-offload-triton (CUDA)
    python benchmarks/offload.py --headline-only          # LLaMA-2-7B shape under a 24 GiB cap (CUDA)
    python benchmarks/offload.py --model tiny --steps 3   # quick check of the script (CPU works)

Modes (set-ups of ``hift_ds.profile.setups``): fpft; hift / hift-triton (state on the GPU; torch / Triton update);
hift-offload-noprefetch, hift-offload (torch update), hift-offload-triton, hift-offload-triton-1slot
(pinned host store, prefetch into two device slots / one). Step times are steady-state (see
benchmarks/harness.py). Targets, from the figures measured in this run: the offloaded Triton step
<= 1.05x hift-triton's and <= 0.55x fpft's, peak GPU memory <= 0.5x fpft's, and (with --trace) >= 90%
of the side streams' copy time overlapping compute kernels. ``--headline`` adds the LLaMA-2-7B shape
at 1x512 and at 4x512 with gradient checkpointing, every mode under ``--headline-cap-gib`` (24) but the
resident hift-triton (which needs ~90 GiB and gives the compute time), and each step time against
its lower bound max(compute time, bytes copied per step / measured pinned bandwidth per direction).

``--paired A,B[,C]`` times set-ups in this one process instead (benchmarks/paired.py: two model copies,
whole-cycle blocks in ABBA order, CUDA events per step, per-group paired differences, cycle ratios,
lower bounds from a pinned-copy probe, allocator and page-fault counters, a separate traced run):

    python benchmarks/offload.py --paired hift-triton,hift-offload-triton --blocks 2 --trace trace/
    python benchmarks/offload.py --paired ds-hift,ds-hift-offload-synctimer,ds-hift-offload   # the engine path
    python benchmarks/offload.py --model tiny --batch-size 2 --seq-len 32 --paired hift,hift-offload  # CPU rehearsal
    python benchmarks/offload.py --model llama-7b --batch-size 1 --paired hift-triton,hift-offload-triton \
        --blocks 4 --also 4x512c      # then 4x512 with gradient checkpointing on the same two model copies
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import harness
import paired
from traces import format_overlap, overlap_summary  # noqa: F401 - offload.overlap_summary: the tests' name
from traces import save_trace
from hift_ds.profile import setups

MODES = ["fpft", "hift", "hift-triton", "hift-offload-noprefetch", "hift-offload", "hift-offload-triton",
         "hift-offload-triton-1slot"]
TRACE_MODE = "hift-offload-triton"
HEADLINE_MODES = ("hift-triton", "hift-offload-triton", "hift-offload-triton-1slot")
HEADLINE_RUNS = ((1, False), (4, True))  # (batch size, gradient checkpointing) at seq 512
# (mode, baseline, key, limit, what): each offloaded mode against the same kernel resident, and fpft.
TARGETS = [("hift-offload-triton", "hift-triton", "step_ms", 1.05, "step time"),
           ("hift-offload-triton", "fpft", "step_ms", 0.55, "step time"),
           ("hift-offload-triton", "fpft", "peak_alloc_gib", 0.5, "peak GPU memory"),
           ("hift-offload", "hift", "step_ms", 1.05, "step time"),
           ("hift-offload", "fpft", "peak_alloc_gib", 0.5, "peak GPU memory")]
OVERLAP_TARGET = 0.9


# ---- targets -----------------------------------------------------------------------------------
def targets(rows: list[dict], trace: dict | None = None) -> list[dict]:
    """The targets, PASS/FAIL from this run's numbers, or n/a where a figure is missing."""
    ok = {r["mode"]: r for r in rows if r["status"] == "ok"}
    out = []
    for mode, base, key, limit, what in TARGETS:
        r = harness.ratio(ok[mode], ok.get(base), key) if mode in ok else None
        out.append({"mode": mode, "target": f"{what}: {mode} <= {limit:g} x {base}", "ratio": r, "limit": limit,
                    "result": "n/a" if r is None else ("PASS" if r <= limit else "FAIL")})
    frac = (trace or {}).get("side_overlap_fraction")
    out.append({"mode": TRACE_MODE, "target": f"copy time overlapping compute >= {OVERLAP_TARGET:.0%}",
                "ratio": frac, "limit": OVERLAP_TARGET,
                "result": "n/a" if frac is None else ("PASS" if frac >= OVERLAP_TARGET else "FAIL")})
    return out


def format_targets(checks: list[dict]) -> str:
    """One line per target: ratio measured, limit, PASS/FAIL (n/a when a figure is missing)."""
    lines = ["targets, from this run's measurements:"]
    for c in checks:
        got = f"{c['ratio']:.2f}" if c["ratio"] is not None else "-"
        lines.append(f"  {c['result']:<5} {c['target']:<60} measured {got}")
    return "\n".join(lines)


def trace(built: setups.Built, args: argparse.Namespace) -> dict:
    """Profile ``--trace-steps`` more steps (a window with a synchronize only at its ends); the overlap summary."""
    from torch.profiler import ProfilerActivity, profile

    from hift_ds.profile.presets import random_batch

    vocab, first, dev = built.model.config.vocab_size, 10 ** 6, setups.device()
    batches = [random_batch(vocab, args.batch_size, args.seq_len, first + i, dev) for i in range(args.trace_steps)]
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for ids in batches:
            built.train_step(ids)
        torch.cuda.synchronize()
    path = Path(args.trace) / f"{TRACE_MODE}-{args.model}-{args.batch_size}x{args.seq_len}.json"
    summary = overlap_summary(save_trace(prof, path))
    return {"path": str(path.with_suffix(".json.gz")), "steps": args.trace_steps, "mode": TRACE_MODE,
            "compute_ms_per_step": summary["kernel_ms"] / args.trace_steps, **summary}


def offload_after(mode: str, built: setups.Built, args: argparse.Namespace) -> dict:
    """Worker hook: the bytes of each group's masters + state (what a step copies), and the trace."""
    out = {}
    store = getattr(built.optimizer, "store", None)
    if store is not None:
        out["group_state_bytes"] = [sum(t.numel() * t.element_size() for t in bufs.values()) for bufs in store.home]
    if mode == TRACE_MODE and args.trace:
        if not torch.cuda.is_available():
            out["trace"] = {"skipped": "needs CUDA; copy/compute overlap is a GPU property"}
        else:
            try:
                out["trace"] = trace(built, args)
            except Exception as exc:  # noqa: BLE001 - the timing row stays valid without the trace
                out["trace"] = {"skipped": f"profiling failed: {type(exc).__name__}: {exc}"}
    return out


def bench_worker(payload: dict) -> dict:
    """Child-process entry: one mode's row with this benchmark's extra measurements."""
    return harness.run_mode(payload["mode"], argparse.Namespace(**payload["args"]), after=offload_after)


def measure_bandwidth(payload: dict) -> dict:
    """Child-process entry: pinned host <-> device bandwidth (GB/s), each direction alone and both at once
    on two streams (as the two-slot store copies), median of 5 rounds of ``gib`` GiB per direction."""
    n = int(payload.get("gib", 1.0) * 2 ** 30) // 4
    host_in, host_out = (torch.empty(n, dtype=torch.float32, pin_memory=True) for _ in range(2))
    dev_in, dev_out = (torch.empty(n, dtype=torch.float32, device="cuda") for _ in range(2))
    streams = {"h2d": torch.cuda.Stream(), "d2h": torch.cuda.Stream()}
    pairs = {"h2d": (dev_in, host_in), "d2h": (host_out, dev_out)}

    def rounds(directions: tuple[str, ...]) -> float:
        times = []
        for _ in range(6):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for d in directions:
                with torch.cuda.stream(streams[d]):
                    pairs[d][0].copy_(pairs[d][1], non_blocking=True)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return n * 4 / statistics.median(times[1:]) / 1e9

    return {"h2d_gbps": rounds(("h2d",)), "d2h_gbps": rounds(("d2h",)),
            "both_gbps_each_way": rounds(("h2d", "d2h"))}  # bytes of one direction / time of both


# ---- headline: LLaMA-2-7B shape ----------------------------------------------------------------
def lower_bound(row: dict, compute_ms: float | None, bw: dict) -> dict:
    """The step's lower bound: max(compute, mean bytes of one group / pinned bandwidth, per direction)."""
    sizes = row.get("group_state_bytes") or []
    if not sizes or not bw:
        return {}
    per_step = sum(sizes) / len(sizes)  # every group is copied in once and out once per cycle of k steps
    copy_in, copy_out = per_step / (bw["h2d_gbps"] * 1e6), per_step / (bw["d2h_gbps"] * 1e6)  # ms
    # The bytes must cross the link either one direction after the other or both at once, whichever the
    # machine does faster (concurrent copies share host memory and the PCIe root, so "at once" can lose).
    both = per_step / (bw["both_gbps_each_way"] * 1e6) if bw.get("both_gbps_each_way") else copy_in + copy_out
    copy_ms = min(copy_in + copy_out, both)
    bound = max(compute_ms or 0.0, copy_ms)
    return {"bytes_per_step_each_way": per_step, "copy_in_ms": copy_in, "copy_out_ms": copy_out,
            "copy_both_ms": both, "copy_ms": copy_ms, "compute_ms": compute_ms, "bound_ms": bound,
            "step_over_bound": row["step_ms"] / bound if bound else None}


def headline(args: argparse.Namespace) -> dict:
    """LLaMA-2-7B shape: HiFT with offload under a --headline-cap-gib cap, and each step against its lower bound.
    Each row is printed as soon as it is measured (a run cut short by a time limit keeps what it printed)."""
    if not torch.cuda.is_available():
        return {"skipped": "needs CUDA; the LLaMA-2-7B shape runs on a GPU", "rows": []}
    res = setups.run_isolated("offload:measure_bandwidth", {"gib": 1.0}, args.timeout, path=[harness.HERE])
    bw = res.get("row") or {}
    result = {"cap_gib": args.headline_cap_gib, "bandwidth": bw or {"skipped": res.get("error")}, "rows": []}
    print(format_headline(result), flush=True)
    batches = {int(b) for b in str(args.headline_batches).split(",") if b}
    for bsz, ckpt in (run for run in HEADLINE_RUNS if run[0] in batches):
        resident = None
        for mode in HEADLINE_MODES:
            if mode.endswith("1slot") and bsz != 1:
                continue  # one slot matters where copies bound the step: the smallest batch
            cap = None if mode == "hift-triton" else args.headline_cap_gib  # resident: ~90 GiB, for compute time
            hargs = harness.with_overrides(args, model="llama-7b", dtype="bf16", batch_size=bsz, seq_len=512,
                                           steps=args.headline_steps, warmup=2, sync_steps=2, trace=args.trace,
                                           gradient_checkpointing=ckpt, max_memory_gib=cap)
            r, = harness.run_modes_in_subprocesses([mode], hargs, worker_fn="offload:bench_worker",
                                                   verbose=False)
            if mode == "hift-triton":
                resident = r if r["status"] == "ok" else None
            elif r["status"] == "ok":
                traced = (r.get("trace") or {}).get("compute_ms_per_step")
                r["bound"] = lower_bound(r, resident["step_ms"] if resident else traced, bw)
                r["bound"]["compute_from"] = "hift-triton (resident)" if resident else "trace kernel time" if traced \
                    else None
                peak = r.get("peak_reserved_gib")
                r["fits_cap"] = None if peak is None else peak <= args.headline_cap_gib
            result["rows"].append(r)
            print(format_headline_row(r), flush=True)
            if r.get("trace") and not r["trace"].get("skipped"):
                print(format_overlap(r["trace"]), flush=True)
    return result


def format_headline(result: dict) -> str:
    """The headline: what was measured and the link's bandwidth, then one line per row."""
    if result.get("skipped"):
        return f"headline: skipped: {result['skipped']}"
    bw = result["bandwidth"]
    nan = float("nan")
    lines = [f"headline: LLaMA-2-7B shape, bf16, seq 512, allocator capped at {result['cap_gib']:g} GiB (hift-triton "
             f"uncapped: it holds every group's state on the GPU); pinned bandwidth H2D "
             f"{bw.get('h2d_gbps', nan):.1f} GB/s, D2H {bw.get('d2h_gbps', nan):.1f} GB/s, both at once "
             f"{bw.get('both_gbps_each_way', nan):.1f} GB/s each way"]
    return "\n".join(lines + [format_headline_row(r) for r in result["rows"]])


def format_headline_row(r: dict) -> str:
    """One headline row: mode, batch, peak memory, fit under the cap, step time against its lower bound."""
    what = f"  {r['mode']:<26} {r['batch_size']}x512{' ckpt' if r.get('gradient_checkpointing') else '     '}"
    if r["status"] != "ok":
        return f"{what}  {r['status']}: {r['error']}"
    line = (f"{what}  step {r['step_ms']:.0f} ms (window {r['window_ms']:.0f}, sync {r['step_ms_sync']:.0f})  "
            f"alloc {r['peak_alloc_gib']:.2f}  reserved {r['peak_reserved_gib']:.2f}  device "
            f"{harness._fmt(r['peak_device_gib'], '.2f')} GiB")
    b = r.get("bound") or {}
    if b.get("bound_ms"):
        line += (f"  bound {b['bound_ms']:.0f} ms (compute {harness._fmt(b['compute_ms'], '.0f')} from "
                 f"{b['compute_from']}; copy in {b['copy_in_ms']:.0f} + out {b['copy_out_ms']:.0f}, both at once "
                 f"{b['copy_both_ms']:.0f}) -> {b['step_over_bound']:.2f}x")
    if r.get("fits_cap") is not None:
        line += "  fits" if r["fits_cap"] else "  DOES NOT FIT"
    return line


def main(argv: list[str] | None = None) -> int:
    """Run the offload benchmark; returns the exit status."""
    ap = harness.make_parser(__doc__, __file__, model="llama-1b", batch_size=4, seq_len=512, group_size=1)
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ",".join(MODES))
    ap.add_argument("--trace", default=None, metavar="DIR", help=f"profile {TRACE_MODE} (CUDA), chrome traces in DIR")
    ap.add_argument("--trace-steps", type=int, default=4)
    ap.add_argument("--headline", action="store_true", help="also the LLaMA-2-7B shape (see above)")
    ap.add_argument("--headline-only", action="store_true", help="only the LLaMA-2-7B headline")
    ap.add_argument("--headline-steps", type=int, default=5)
    ap.add_argument("--headline-cap-gib", type=float, default=24.0)
    ap.add_argument("--headline-batches", default="1,4", help="which headline batch sizes: 1 (seq 512), "
                    "4 (seq 512, gradient checkpointing), or both")
    ap.add_argument("--paired", default=None, metavar="SETUPS", help="time these set-ups (comma-separated, the "
                    "first is the baseline) in this one process, in ABBA blocks of whole cycles (see above); "
                    "replaces --modes and the headline")
    ap.add_argument("--blocks", type=int, default=2, help="--paired: whole-cycle blocks per set-up after the warm-up")
    ap.add_argument("--probe-gib", type=float, default=1.0, help="--paired: GiB per direction of the pinned copy probe")
    ap.add_argument("--trace-setup", default=None, help="--paired: the set-up of the traced run (default: the last "
                    "that offloads)")
    ap.add_argument("--trace-cpu-ops", action="store_true", help="--paired: the traced run records host operators "
                    "too (more detail; can stretch a launch-bound step)")
    ap.add_argument("--also", default=None, metavar="BxS[c]", help="--paired: then time the same model copies at "
                    "batch B x sequence S, with gradient checkpointing if 'c' ends it (e.g. 4x512c)")
    ap.add_argument("--also-blocks", type=int, default=2, help="--also: whole-cycle blocks per set-up")
    args = ap.parse_args(argv)
    if args.paired:
        return run_paired(args, sys.argv[1:] if argv is None else argv)
    worker = "offload:bench_worker"
    modes = [m for m in args.modes.split(",") if m]
    rows, checks, trace_summary = [], [], None
    if not args.headline_only:
        print(f"offload benchmark on {harness.device_name()}: {', '.join(modes)}", flush=True)
        rows = harness.run_modes_in_subprocesses(modes, args, worker_fn=worker)
        print()
        print(harness.format_table(rows, baseline=("fpft", "hift-triton", "hift")))
        if args.trace:
            traced = next((r for r in rows if r["mode"] == TRACE_MODE), None)
            trace_summary = (traced or {}).get("trace") or {
                "skipped": f"{TRACE_MODE} did not run" + (f" ({traced['error']})" if traced else "")}
            print()
            print(format_overlap(trace_summary))
        print()
        checks = targets(rows, trace_summary)
        print(format_targets(checks))
        if not torch.cuda.is_available():
            print("  (no GPU here: CPU timings say nothing about the GPU pipeline; memory targets are n/a)")
    head = None
    if args.headline or args.headline_only:
        print()
        head = headline(args)
    if args.json:
        harness.write_json(args.json, {"meta": harness.meta(args), "rows": rows, "targets": checks,
                                       "trace": trace_summary, "headline": head})
    return 0


def parse_shape(text: str, blocks: int) -> tuple[int, int, bool, int]:
    """``--also``: "4x512c" -> (4, 512, True, blocks); "1x256" -> (1, 256, False, blocks)."""
    ckpt = text.endswith("c")
    try:
        bsz, seq = (int(x) for x in text.rstrip("c").split("x"))
    except ValueError:
        raise SystemExit(f"--also takes BxS or BxSc (c: gradient checkpointing), e.g. 4x512c; got {text!r}") from None
    return bsz, seq, ckpt, blocks


def run_paired(args: argparse.Namespace, argv: list[str]) -> int:
    """``--paired``: the set-ups timed in this process; the JSON keeps what was measured even if a set-up fails."""
    names = [n for n in args.paired.split(",") if n]
    bad = [n for n in names if n not in setups.SETUPS]
    if bad or len(names) < 2:
        raise SystemExit(f"--paired needs two or more of {', '.join(setups.SETUPS)}; got {args.paired!r}")
    meta = harness.meta(args)
    meta["command"] = " ".join([Path(__file__).name] + list(argv))  # the options this run parsed
    result: dict = {}

    def measure() -> None:
        paired.measure(names, setups.Options.from_namespace(args), args.blocks, args.probe_gib, args.trace,
                       args.trace_steps, args.trace_setup, command=meta["command"], result=result,
                       log=lambda line: print(line, flush=True), trace_cpu_ops=args.trace_cpu_ops,
                       also=parse_shape(args.also, args.also_blocks) if args.also else None)
        print(paired.format_targets(result["summary"]))
        if "also" in result:
            print(f"({result['also']['shape']}) " + paired.format_targets(result["also"]["summary"]))
    # The rows measured before a failure (or a time limit) are still written.
    return harness.run_recorded("paired", measure, result, args.json, lambda: {"meta": meta, "paired": result})


if __name__ == "__main__":
    sys.exit(main())
