"""Does a training set-up fit a device-memory cap, and what does it pin on the host? (issue 25)

    python benchmarks/fit.py --model llama-7b --setup hift-offload-triton --max-memory-gib 24 --shapes 1x512,4x512c
    python benchmarks/fit.py --model tiny --setup hift-offload --shapes 2x32,2x32c     # CPU rehearsal

One process: the set-up is built once under the allocator cap (``torch.cuda.set_per_process_memory_fraction``,
so the allocator behaves as on a card of that size), then for each shape (batch x sequence, ``c``: with
gradient checkpointing, switched on for that shape and the ones after) a warm-up cycle and ``--cycles``
timed cycles (CUDA events per step; every group's step, so every group's peak). NVML samples the whole
device meanwhile (a sampler thread: these step times are not for comparing set-ups; benchmarks/paired.py
is). A shape fits when the NVML device peak, CUDA context included, is within the cap, as on a real card.
Host memory: the store's pinned bytes against its state, and the system's and the process's accounting
over the build (benchmarks/hostmem.py). Each shape's row is printed as it is measured; --json keeps them.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import hostmem
import paired
from hift_ds.profile import setups
from hift_ds.activations import enable_gradient_checkpointing
from hift_ds.profile.presets import random_batch

GIB = 2 ** 30


def parse_shapes(text: str) -> list[tuple[int, int, bool]]:
    """"1x512,4x512c" -> [(1, 512, False), (4, 512, True)]."""
    out = []
    for item in (t for t in text.split(",") if t):
        try:
            bsz, seq = (int(x) for x in item.rstrip("c").split("x"))
        except ValueError:
            raise SystemExit(f"--shapes takes BxS or BxSc items (c: gradient checkpointing); got {item!r}") from None
        out.append((bsz, seq, item.endswith("c")))
    return out


def _profiler():
    if not torch.cuda.is_available():
        return None
    from hift_ds.profile import MemoryProfiler
    prof = MemoryProfiler(interval_ms=20)
    prof.start()
    return prof


def _device_peak(prof) -> int | None:
    if prof is None:
        return None
    prof.stop()
    return prof.summary()["peak"]["device_used"]


def run(args: argparse.Namespace, result: dict) -> None:
    """Build, then measure each shape; ``result`` is filled (and each row printed) as it is measured."""
    dev = setups.device()
    cap = args.max_memory_gib if dev.type == "cuda" else None
    shapes = parse_shapes(args.shapes)
    bsz0, seq0, _ = shapes[0]
    o = setups.Options(model=args.model, dtype=args.dtype, batch_size=bsz0, seq_len=seq0, group_size=args.group_size,
                       max_memory_gib=cap)
    host0, prof, t0 = hostmem.snapshot(), _profiler(), time.perf_counter()
    built = setups.build(args.setup, o, dev)
    build = {"build_s": time.perf_counter() - t0, "host_over_build": hostmem.delta(host0, hostmem.snapshot()),
             "pinning": hostmem.store_pinning(built.optimizer), "device_peak_bytes": _device_peak(prof),
             "notes": built.notes}
    result.update(device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", cap_gib=cap,
                  setup=args.setup, model=args.model, build=build, shapes=[])
    print(f"fit: {args.setup}, {args.model}, on {result['device']}, allocator capped at "
          f"{'-' if cap is None else f'{cap:g} GiB'}; built in {build['build_s']:.1f} s ({'; '.join(built.notes)})",
          flush=True)
    print(hostmem.format_pinning(args.setup, build["pinning"], build["host_over_build"]), flush=True)
    k = getattr(built.optimizer, "num_groups", None) or args.steps
    vocab = built.model.config.vocab_size
    checkpointing = False
    for bsz, seq, ckpt in shapes:
        if ckpt and not checkpointing:
            enable_gradient_checkpointing(built.model)
            checkpointing = True
        row = {"batch_size": bsz, "seq_len": seq, "gradient_checkpointing": checkpointing}
        result["shapes"].append(row)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
        prof = _profiler()
        try:
            batches = [random_batch(vocab, bsz, seq, i, dev) for i in range(k)]
            paired.run_block(built, batches, dev)  # warm-up: every group once
            cycles = [paired.run_block(built, batches, dev) for _ in range(args.cycles)]
        except torch.OutOfMemoryError as exc:
            row.update(status="out of memory", error=str(exc).splitlines()[0][:200])
        else:
            steps = [ms for c in cycles for ms in c["step_ms"]]
            row.update(status="ok", cycle_ms=[c["cycle_ms"] for c in cycles], median_step_ms=statistics.median(steps),
                       losses_finite=all(c["losses_finite"] for c in cycles))
        finally:
            peak = _device_peak(prof)
        if dev.type == "cuda":
            row.update(peak_alloc_gib=torch.cuda.max_memory_allocated(dev) / GIB,
                       peak_reserved_gib=torch.cuda.max_memory_reserved(dev) / GIB,
                       device_peak_gib=None if peak is None else peak / GIB)
        if cap is not None and row["status"] == "ok":
            row["fits"] = row["device_peak_gib"] is not None and row["device_peak_gib"] <= cap
        print(format_row(row, cap), flush=True)


def format_row(r: dict, cap: float | None) -> str:
    """One shape: cycle and step times, the three peaks, and whether it fits the cap."""
    f = lambda x, spec=".2f": "-" if x is None else format(x, spec)  # noqa: E731
    what = f"  {r['batch_size']}x{r['seq_len']}{' ckpt' if r['gradient_checkpointing'] else ''}"
    if r["status"] != "ok":
        return f"{what}: {r['status']}: {r.get('error', '')}"
    verdict = "" if cap is None else \
        ("  FITS" if r.get("fits") else "  DOES NOT FIT") + f" {cap:g} GiB (NVML device peak)"
    return (f"{what}: cycle {', '.join(f(c, '.1f') for c in r['cycle_ms'])} ms, median step {r['median_step_ms']:.1f} "
            f"ms; peak allocated {f(r.get('peak_alloc_gib'))}, reserved {f(r.get('peak_reserved_gib'))}, NVML device "
            f"{f(r.get('device_peak_gib'))} GiB{verdict}" + ("" if r["losses_finite"] else "; NON-FINITE LOSS"))


def main(argv: list[str] | None = None) -> int:
    """Run the fit check; returns the exit status (the JSON is written even when a time limit stops it)."""
    import harness

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-7b")
    ap.add_argument("--setup", default="hift-offload-triton", help="a set-up of hift_ds.profile.setups")
    ap.add_argument("--dtype", default="bf16", choices=sorted(setups.DTYPES))
    ap.add_argument("--group-size", type=int, default=1)
    ap.add_argument("--max-memory-gib", type=float, default=24.0, help="allocator cap (CUDA; ignored on a CPU)")
    ap.add_argument("--shapes", default="1x512,4x512c", help="BxS[c] items, c: gradient checkpointing")
    ap.add_argument("--cycles", type=int, default=1, help="timed cycles per shape, after a warm-up cycle")
    ap.add_argument("--steps", type=int, default=4, help="steps per 'cycle' of a set-up with no HiFT groups")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    result: dict = {"command": " ".join(["fit.py"] + list(sys.argv[1:] if argv is None else argv))}
    return harness.run_recorded("fit", lambda: run(args, result), result, args.json, lambda: {"fit": result})

if __name__ == "__main__":
    sys.exit(main())
