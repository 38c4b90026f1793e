"""Shared machinery of the training benchmarks (offload.py, compare.py): one set-up per process.

The set-ups (fpft, hift, hift-offload, ..., ds-zero2-offload, badam, torchao-offload) are the registry
in ``hift_ds.profile.setups``, shared with the memory profiler; each runs in a fresh process
(``hift_ds.profile.setups.run_isolated``) on the same model and the same batches.

Timing is taken the way a training loop runs: after ``--warmup`` steps, a window of ``--steps``
consecutive steps with a synchronize only at its two ends. On CUDA each step is timed by events
recorded on the compute stream (``step_ms`` is their median; the copy streams of the offload
pipeline keep running across step boundaries, as in training), and ``window_ms`` is the window's
wall time per step. A device-wide synchronize between steps would also wait for the side streams
and count every copy inside its step; ``step_ms_sync`` is that figure (``--sync-steps`` more steps,
each between two synchronizes), kept as a secondary column. On CPU the three are wall clock.
Peak GPU memory is counted from after the model is built (allocated/reserved: torch's allocator;
device: NVML, whole device, CUDA contexts included).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import statistics
import sys
import time
from typing import Callable, Sequence

import torch
from torch import Tensor

from hift_ds.profile import setups
from hift_ds.profile.setups import SETUPS, Built, Options

DTYPES = setups.DTYPES
GIB = 2 ** 30
HERE = os.path.dirname(os.path.abspath(__file__))  # a child process imports this folder's modules by name
MODES = SETUPS  # every set-up of the registry is a benchmark mode


def device_name() -> str:
    """The device the modes run on, in words."""
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def _gib(b: int | None) -> float | None:
    return None if b is None else b / GIB


def _base_row(mode: str, args: argparse.Namespace, device: str) -> dict:
    return {"mode": mode, "status": "ok", "error": None, "note": "", "device": device, "model": args.model,
            "dtype": args.dtype, "batch_size": args.batch_size, "seq_len": args.seq_len, "steps": args.steps,
            "warmup": args.warmup, "group_size": args.group_size,
            "gradient_checkpointing": getattr(args, "gradient_checkpointing", False),
            "max_memory_gib": getattr(args, "max_memory_gib", None), "step_ms": None, "step_ms_all": [],
            "window_ms": None, "step_ms_sync": None, "tokens_per_s": None, "peak_alloc_gib": None,
            "peak_reserved_gib": None, "peak_device_gib": None, "pinned_host_gib": None, "final_loss": None,
            "losses": [], "memory_report": None}


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def steady_window(built: Built, batches: Sequence[Tensor], dev: torch.device) -> tuple[list[float], float, list]:
    """Train on ``batches`` back to back, synchronizing only before and after; (per-step ms, wall ms, losses)."""
    cuda = dev.type == "cuda"
    marks = [torch.cuda.Event(enable_timing=True) for _ in range(len(batches) + 1)] if cuda else []
    wall: list[float] = []
    losses = []
    _sync(dev)
    t0 = time.perf_counter()
    for i, ids in enumerate(batches):
        if cuda:
            marks[i].record()  # on the compute stream: the time between marks is that stream's time per step
        else:
            wall.append(time.perf_counter())
        losses.append(built.train_step(ids))  # left on the device: reading it would synchronize
    if cuda:
        marks[-1].record()
    _sync(dev)
    t1 = time.perf_counter()
    per_step = [a.elapsed_time(b) for a, b in zip(marks, marks[1:])] if cuda else \
        [(b - a) * 1e3 for a, b in zip(wall, wall[1:] + [t1])]
    return per_step, (t1 - t0) * 1e3, [float(x) for x in losses]


def run_mode(mode: str, args: argparse.Namespace,
             after: Callable[[str, Built, argparse.Namespace], dict] | None = None) -> dict:
    """Build ``mode`` and train it in this process (warm-up, steady window, synchronized steps); its row."""
    from hift_ds.profile.presets import random_batch

    dev = setups.device()
    prof = None
    if dev.type == "cuda":  # NVML's device peak (a sampler thread; 20 ms between samples)
        from hift_ds.profile import MemoryProfiler
        prof = MemoryProfiler(interval_ms=20)
        prof.start()
    try:
        built = setups.build(mode, Options.from_namespace(args), dev)
        vocab = built.model.config.vocab_size
        batch = lambda i: random_batch(vocab, args.batch_size, args.seq_len, i, dev)  # noqa: E731
        losses = [float(built.train_step(batch(i))) for i in range(args.warmup)]
        window = [batch(args.warmup + i) for i in range(args.steps)]  # on the device before the window starts
        step_ms_all, window_wall, window_losses = steady_window(built, window, dev)
        losses += window_losses
        sync_ms = []
        for i in range(args.sync_steps):
            ids = batch(args.warmup + args.steps + i)
            _sync(dev)
            t0 = time.perf_counter()
            losses.append(float(built.train_step(ids)))
            _sync(dev)
            sync_ms.append((time.perf_counter() - t0) * 1e3)
        row = _base_row(mode, args, device_name())
        if dev.type == "cuda":
            row.update(peak_alloc_gib=_gib(torch.cuda.max_memory_allocated(dev)),
                       peak_reserved_gib=_gib(torch.cuda.max_memory_reserved(dev)))
        # The loss after the last update, on the next (unseen) batch: comparable across modes.
        with torch.no_grad():
            final = float(built.forward(batch(len(losses))))
    finally:
        if prof is not None:
            prof.stop()
    med = statistics.median(step_ms_all) if step_ms_all else None
    window_ms = window_wall / len(window) if window else None
    row.update(step_ms=med, step_ms_all=step_ms_all, window_ms=window_ms,
               step_ms_sync=statistics.median(sync_ms) if sync_ms else None,
               tokens_per_s=args.batch_size * args.seq_len * 1e3 / window_ms if window_ms else None,
               pinned_host_gib=_gib(built.pinned_bytes()) if built.pinned_bytes else None, final_loss=final,
               losses=losses, memory_report=built.memory_report() if built.memory_report else None,
               note="; ".join(built.notes))
    if prof is not None:
        row["peak_device_gib"] = _gib(prof.summary()["peak"]["device_used"])
    if after is not None:
        row.update(after(mode, built, args))
    return row


def worker(payload: dict) -> dict:
    """Child-process entry (``setups.run_isolated``): one mode's row, no extra measurements."""
    return run_mode(payload["mode"], argparse.Namespace(**payload["args"]))


def failed_row(mode: str, args: argparse.Namespace, error: str | None, status: str = "failed") -> dict:
    """A row with no figures and ``error`` saying why (status "skipped" or "failed")."""
    row = _base_row(mode, args, device_name())
    row.update(status=status, error=error)
    return row


# ---- every mode in its own process -----------------------------------------------------------
def run_modes_in_subprocesses(modes: Sequence[str], args: argparse.Namespace, verbose: bool = True,
                              worker_fn: str | None = None) -> list[dict]:
    """Each mode in a fresh process (clean device memory) running ``worker_fn`` ("module:function" of a module in
    benchmarks/, default this file's ``worker``); their rows."""
    target = worker_fn or "harness:worker"
    spec = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    rows = []
    for mode in modes:
        reason = setups.skip_reason(mode)
        if reason:  # known in advance: no process needed
            rows.append(failed_row(mode, args, reason, "skipped"))
        else:
            res = setups.run_isolated(target, {"mode": mode, "args": spec}, args.timeout, path=[HERE])
            rows.append(res["row"] if res["status"] == "ok" else failed_row(mode, args, res["error"], res["status"]))
        if verbose:
            r = rows[-1]
            print(f"  {mode}: " + (f"{r['step_ms']:.1f} ms/step, final loss {r['final_loss']:.4f}"
                                   if r["status"] == "ok" else f"{r['status']}: {r['error']}"), flush=True)
    return rows


def with_overrides(args: argparse.Namespace, **kw) -> argparse.Namespace:
    """A copy of ``args`` with some options changed (e.g. another model or batch size)."""
    out = copy.copy(args)
    for k, v in kw.items():
        setattr(out, k, v)
    return out


# ---- command line and output -----------------------------------------------------------------
def make_parser(description: str, script: str, **defaults) -> argparse.ArgumentParser:
    """The options every benchmark shares (``defaults`` overrides their defaults)."""
    d = dict(model="llama-1b", batch_size=4, seq_len=512, steps=20, warmup=3, sync_steps=5, group_size=1,
             dtype="bf16", lr=1e-5, seed=0, timeout=1800.0, json=None) | defaults
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=d["model"], help="a preset (tiny, llama-1b, llama-7b) or a HF name/path")
    ap.add_argument("--batch-size", type=int, default=d["batch_size"])
    ap.add_argument("--seq-len", type=int, default=d["seq_len"])
    ap.add_argument("--steps", type=int, default=d["steps"],
                    help="steps of the steady-state window (no synchronize inside; median reported)")
    ap.add_argument("--warmup", type=int, default=d["warmup"], help="untimed steps first")
    ap.add_argument("--sync-steps", type=int, default=d["sync_steps"],
                    help="then this many steps each between two synchronizes (the secondary step_ms_sync column)")
    ap.add_argument("--group-size", type=int, default=d["group_size"], help="HiFT units per group")
    ap.add_argument("--dtype", choices=list(DTYPES), default=d["dtype"],
                    help="model weights (fpft: fp32 weights + autocast to this dtype)")
    ap.add_argument("--lr", type=float, default=d["lr"])
    ap.add_argument("--seed", type=int, default=d["seed"])
    ap.add_argument("--gradient-checkpointing", action="store_true",
                    help="recompute activations in backward (Hugging Face gradient_checkpointing_enable)")
    ap.add_argument("--max-memory-gib", type=float, default=None, metavar="N",
                    help="cap each mode's CUDA allocator at N GiB (torch.cuda.set_per_process_memory_fraction), so "
                         "a big GPU behaves like an N GiB card")
    ap.add_argument("--timeout", type=float, default=d["timeout"], help="seconds per mode before it is killed")
    ap.add_argument("--json", default=d["json"], help="write the rows (and more) to this JSON file")
    return ap


def ratio(row: dict, base: dict | None, key: str) -> float | None:
    """row[key] / base[key] when both were measured, else None."""
    if base is None or row.get(key) is None or not base.get(key):
        return None
    return row[key] / base[key]


def _fmt(x: float | None, spec: str, suffix: str = "") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec) + suffix


def format_table(rows: list[dict], baseline: str | Sequence[str] = "fpft") -> str:
    """Rows as a text table with ratios (step time, peak alloc, peak reserved) to each baseline mode."""
    bases = [baseline] if isinstance(baseline, str) else list(baseline)
    by_mode = {r["mode"]: r for r in rows if r["status"] == "ok"}
    head = ["mode", "step ms"] + [f"step/{b}" for b in bases] + ["window ms", "sync ms", "tok/s", "alloc GiB",
                                                                  "rsrv GiB", "dev GiB"]
    head += [f"{k}/{b}" for b in bases for k in ("alloc", "rsrv")] + ["pinned GiB", "final loss", "note / error"]
    lines = []
    for r in rows:
        if r["status"] != "ok":
            lines.append([r["mode"], f"{r['status']}: {r['error']}"])
            continue
        cells = [r["mode"], _fmt(r["step_ms"], ".1f")]
        cells += [_fmt(ratio(r, by_mode.get(b), "step_ms"), ".2f", "x") for b in bases]
        cells += [_fmt(r["window_ms"], ".1f"), _fmt(r["step_ms_sync"], ".1f"), _fmt(r["tokens_per_s"], ".0f"),
                  _fmt(r["peak_alloc_gib"], ".2f"), _fmt(r["peak_reserved_gib"], ".2f"),
                  _fmt(r["peak_device_gib"], ".2f")]
        cells += [_fmt(ratio(r, by_mode.get(b), k), ".2f", "x") for b in bases
                  for k in ("peak_alloc_gib", "peak_reserved_gib")]
        cells += [_fmt(r["pinned_host_gib"], ".2f"), _fmt(r["final_loss"], ".4f"), r["note"]]
        lines.append(cells)
    full = [c for c in lines if len(c) == len(head)]
    widths = [max(len(c[i]) for c in [head] + full) for i in range(len(head) - 1)]
    widths[0] = max([widths[0]] + [len(c[0]) for c in lines])
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths))) + "  " + cells[-1]
    r0 = rows[0] if rows else {}
    extras = ", gradient checkpointing" if r0.get("gradient_checkpointing") else ""
    if r0.get("max_memory_gib"):
        extras += f", allocator capped at {r0['max_memory_gib']:g} GiB"
    out = [f"device: {r0.get('device')}; model {r0.get('model')}, {r0.get('dtype')}, batch {r0.get('batch_size')}x"
           f"{r0.get('seq_len')}{extras}; torch {torch.__version__}",
           f"step ms: median over a steady window of {r0.get('steps')} steps after {r0.get('warmup')} warm-up (CUDA "
           "events on the compute stream, no synchronize between steps); window ms: the window's wall time per step; "
           "sync ms: steps each between two synchronizes (copies counted in their step).",
           "fpft = fp32 weights + torch.autocast, torch AdamW (fp32 state) over all params; other modes keep "
           "--dtype weights. Ratios are to the baseline measured in this run; GPU memory '-' without CUDA; "
           "dev GiB = NVML device peak (whole device).",
           fmt(head), "  ".join("-" * w for w in widths) + "  " + "-" * len(head[-1])]
    out += [fmt(c) if len(c) == len(head) else f"{c[0].ljust(widths[0])}  {c[1]}" for c in lines]
    return "\n".join(out)


def write_json(path: str, payload: dict) -> None:
    """Write ``payload`` (rows + metadata) as indented JSON."""
    with open(path, "w") as fh:
        json.dump(payload, fh, indent=1)


def run_recorded(label: str, measure: Callable[[], None], result: dict, json_path: str | None,
                 payload: Callable[[], dict]) -> int:
    """Run ``measure`` (which fills ``result``); a failure goes into ``result["error"]``, and the JSON of
    ``payload()`` is written either way, also when ``timeout`` stops the process; the exit status."""
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))  # `timeout` stops us: still write the JSON
    rc = 0
    try:
        measure()
    except Exception as exc:  # noqa: BLE001 - what was measured so far is still written
        status, error = setups.describe_failure(exc)
        result["error"] = f"{status}: {error}"
        print(f"{label}: {result['error']}", flush=True)
        rc = 0 if status == "skipped" else 1
    finally:
        if json_path:
            write_json(json_path, payload())
    return rc


def meta(args: argparse.Namespace) -> dict:
    """Run metadata for the JSON: device, versions, options, date."""
    out = {"device": device_name(), "torch": torch.__version__, "python": sys.version.split()[0],
           "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "command": " ".join([os.path.basename(sys.argv[0])]
                                                                            + sys.argv[1:]),
           "options": {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "script"}}
    for pkg in ("deepspeed", "transformers", "triton", "badam", "torchao"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version
            out[pkg] = version(pkg)
    return out
