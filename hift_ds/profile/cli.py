"""``python -m hift_ds.profile``: short training runs of one model under several set-ups, memory reported.

Every set-up of ``hift_ds.profile.setups`` (fpft, hift, hift-offload, ds-zero2-offload, ...) runs in its own
process (``hift_ds.profile.setups.run_isolated``) under a ``MemoryProfiler``. ``profile.json`` (memory figures
in bytes, times in seconds; ``null`` where not measurable):

- ``version``, ``date``, ``command``; ``config``: model, steps, batch_size, seq_len, group_size,
  dtype, lr, seed, interval_ms, gradient_checkpointing.
- ``gpu``: whether any mode saw a CUDA device; ``note``: the no-GPU / no-NVML message or null.
- ``modes``: one object per requested mode, in order:
  ``mode``; ``status`` ("ok", "failed", "skipped"); ``reason`` (why not ok, else null);
  ``device`` (e.g. "NVIDIA H100 80GB HBM3" or "cpu"); ``gpu`` and ``note`` (as above, for this
  mode's process); ``params`` (parameter count);
  ``peak_device_used`` (pynvml); ``peak_allocated`` / ``peak_reserved`` (torch allocator, exact
  peaks per phase via ``max_memory_allocated``); ``peak_rss``; ``pinned_host`` (peak) and
  ``pinned_source``; ``breakdown``: ``basis`` ("peak_allocated" on a GPU, "peak_rss" on CPU),
  ``total`` (= that peak) and four parts, each measured on its own: ``weights`` (bytes of the
  model's parameters on the device), ``gradients`` (largest, over steps, of the .grad tensors after
  backward, HiFT's ``memory_report()["gradients"]``, or DeepSpeed's gradient buckets),
  ``optimizer_state`` (largest, over steps, of the optimizer's state on the device, or HiFT's
  memory_report() state; on CPU every host-side part counts), ``activations`` (largest, over steps,
  of the tensors autograd saved for backward, ``SavedTensorMeter``); ``other`` = total minus the four
  (allocator slack, temporaries, and on CPU the Python and torch runtime, several hundred MiB);
  ``step_time_median_s`` (each step between two synchronizes: the profiler marks phases on the host),
  ``step_times_s``, ``losses``; ``phases`` (per phase: ``time_s``, ``count`` and peaks);
  ``timeline`` (lists ``t``, ``device_used``, ``allocated``, ``reserved``, ``rss``, ``pinned_host``,
  ``phase``) and ``spans`` ([phase, start_s, end_s]). The profiled window is the training steps; the
  model and optimizer are built before it starts.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from hift_ds.profile import setups
from hift_ds.profile.memory import MemoryProfiler, SavedTensorMeter, plot_timelines

logger = logging.getLogger(__name__)

DEFAULT_MODES = ("fpft", "hift", "hift-offload", "ds-zero2-offload")
PARTS = ("weights", "gradients", "optimizer_state", "activations")


def empty_row(mode: str, status: str, reason: str | None) -> dict:
    """A mode's row with every figure unset (skipped or failed modes)."""
    return {"mode": mode, "status": status, "reason": reason, "device": None, "gpu": False, "note": None,
            "params": None, "peak_device_used": None, "peak_allocated": None, "peak_reserved": None,
            "peak_rss": None, "pinned_host": None, "pinned_source": None, "breakdown": None,
            "step_time_median_s": None, "step_times_s": [], "losses": [], "phases": {}, "timeline": None,
            "spans": []}


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def train(built: setups.Built, prof: MemoryProfiler, spec: dict, dev: torch.device) -> dict:
    """The loop every mode shares: forward, backward, step per phase; step times and the largest parts."""
    from hift_ds.profile.presets import random_batch

    meter = SavedTensorMeter(built.model)
    times, losses, grads, state, acts = [], [], 0, 0, 0
    vocab = built.model.config.vocab_size
    for s in range(spec["steps"]):
        ids = random_batch(vocab, spec["batch_size"], spec["seq_len"], s, dev)
        # No sync at phase marks: the allocator (and cudaMalloc) act in host order, so per-phase memory
        # is right without one; phase durations are host-side, step times (synced) are not.
        _sync(dev)
        start = time.perf_counter()
        with prof.phase("forward"), meter:
            loss = built.forward(ids)
        acts = max(acts, meter.bytes)
        with prof.phase("backward"):
            built.backward(loss)
        grads = max(grads, built.grad_bytes())
        with prof.phase("step"):
            built.step()
        state = max(state, built.state_bytes())
        _sync(dev)
        times.append(time.perf_counter() - start)
        losses.append(float(loss.detach()))
    return {"step_times_s": times, "losses": losses, "gradients": grads, "optimizer_state": state,
            "activations": acts}


def profile_mode(spec: dict) -> dict:
    """Child-process entry: build, train and profile one mode; its row for profile.json."""
    dev = setups.device()
    built = setups.build(spec["mode"], setups.Options.from_namespace(spec), dev)
    weights = setups.param_bytes(built.model, dev)
    prof = MemoryProfiler(interval_ms=spec["interval_ms"], optimizer=built.optimizer)
    with prof:
        stats = train(built, prof, spec, dev)
    summ = prof.summary()
    peak = summ["peak"]
    basis = "peak_allocated" if summ["gpu"] else "peak_rss"
    total = peak["allocated"] if summ["gpu"] else peak["rss"]
    parts = {"weights": weights, **{k: stats[k] for k in PARTS[1:]}}
    other = total - sum(parts.values())
    if other < 0:
        logger.warning("the measured parts exceed the measured peak by %d bytes (they need not peak together, "
                       "and saved activations may share storage with other parts)", -other)
    row = empty_row(spec["mode"], "ok", None)
    row.update(device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", gpu=summ["gpu"],
               note=summ["note"], params=sum(p.numel() for p in built.model.parameters()),
               peak_device_used=peak["device_used"], peak_allocated=peak["allocated"],
               peak_reserved=peak["reserved"], peak_rss=peak["rss"], pinned_host=peak["pinned_host"],
               pinned_source=summ["pinned_source"], breakdown={"basis": basis, "total": total, **parts, "other": other},
               step_time_median_s=statistics.median(stats["step_times_s"]), step_times_s=stats["step_times_s"],
               losses=stats["losses"], phases=summ["phases"], timeline=prof.timeline(), spans=prof.spans())
    return row


def _size(b: int | None) -> str:
    if b is None:
        return "n/a"
    return f"{b / 2 ** 30:.2f} GiB" if abs(b) >= 2 ** 30 else f"{b / 2 ** 20:.1f} MiB"


def format_table(rows: list[dict], gpu: bool) -> str:
    """The CLI's table: one line per mode, the measured parts of the peak and the remainder."""
    basis = ("breakdown of peak allocated GPU memory (torch allocator); device peak from pynvml" if gpu else
             "GPU figures unavailable: breakdown of peak process RSS (host memory)")
    head = ["mode", "status", "dev peak", "alloc peak", "weights", "grads", "opt state", "activations", "other",
            "pinned", "RSS", "step (med)"]
    lines = []
    for r in rows:
        if r["status"] != "ok":
            lines.append([r["mode"], f"{r['status']}: {r['reason']}"])
            continue
        b = r["breakdown"]
        lines.append([r["mode"], "ok", _size(r["peak_device_used"]), _size(r["peak_allocated"])]
                     + [_size(b[k]) for k in (*PARTS, "other")]
                     + [_size(r["pinned_host"]), _size(r["peak_rss"]), f"{r['step_time_median_s'] * 1000:.1f} ms"])
    full = [ln for ln in lines if len(ln) == len(head)]
    widths = [max(len(str(x[i])) for x in [head] + full) for i in range(len(head))]
    widths[0] = max(len(r["mode"]) for r in rows + [{"mode": head[0]}])
    fmt = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    out = [basis, fmt(head), fmt("-" * w for w in widths)]
    for ln in lines:
        out.append(fmt(ln) if len(ln) == len(head) else f"{ln[0].ljust(widths[0])}  {ln[1]}")
    return "\n".join(out)


def build_parser() -> argparse.ArgumentParser:
    """The CLI's argument parser (every option documented in --help)."""
    p = argparse.ArgumentParser(
        prog="python -m hift_ds.profile",
        description="Short training runs of one model under several set-ups, each in its own process, "
                    "reporting peak GPU memory split into weights / gradients / optimizer state / activations / "
                    "other, pinned host memory, RSS and step time. Writes OUT/profile.json, OUT/profile.png (one "
                    "memory timeline per mode) and OUT/<mode>.log (each worker's output).",
        epilog="Modes are the set-ups of hift_ds.profile.setups: " + ", ".join(setups.SETUPS) + ". fpft = the usual "
               "mixed-precision full fine-tuning (fp32 weights, torch.autocast to --dtype, torch AdamW over all "
               "parameters); hift = HiFTOptimizer, state on the device; hift-offload = pinned host store; "
               "ds-zero2-offload = DeepSpeed ZeRO-2 with offload_optimizer cpu (needs CUDA). Without a GPU the "
               "figures are host memory (RSS) and the output says so. A failing mode (out of memory, missing "
               "package) shows why in its row and the other modes still run. Exit status 0 when at least one "
               "mode was measured, 1 otherwise. Field reference: the hift_ds.profile.cli module docstring.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="tiny",
                   help="tiny (LLaMA shape, hidden 64, 4 layers, vocab 1000), llama-1b (hidden 2048, 22 layers), "
                        "llama-7b (LLaMA-2-7B shape), all randomly initialised from --seed; or a Hugging Face "
                        "model name / local path loaded with AutoModelForCausalLM.from_pretrained")
    p.add_argument("--modes", default=",".join(DEFAULT_MODES), help="comma-separated set-ups to run")
    p.add_argument("--steps", type=int, default=10, help="optimizer steps per mode")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (random token ids, seeded)")
    p.add_argument("--group-size", type=int, default=1, help="HiFT units per group (hift modes)")
    p.add_argument("--dtype", choices=tuple(setups.DTYPES), default="bf16", help="model weight dtype")
    p.add_argument("--lr", type=float, default=1e-5, help="learning rate of every mode")
    p.add_argument("--seed", type=int, default=0, help="seed of the model initialisation")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations in backward (Hugging Face gradient_checkpointing_enable)")
    p.add_argument("--interval-ms", type=float, default=10.0, help="memory sampling interval")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds before a mode's process is killed")
    p.add_argument("--out", default="profile", help="output directory")
    return p


def output_dir_problem(out: Path) -> str | None:
    """Create the output directory; why it cannot be written to (None: it can), before any mode runs."""
    if out.exists() and not out.is_dir():
        return "is a file; pass a directory (created if missing)"
    blocker = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        return f"{blocker} is a file, so no directory can be made under it; pass another directory"
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        return f"cannot write there ({e.strerror or e}); pass a directory you can write to"
    return None


def main(argv: list[str] | None = None) -> int:
    """Run the requested modes, print the table, write profile.json and profile.png; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    modes = list(dict.fromkeys(m.strip() for m in args.modes.split(",") if m.strip()))  # each mode once
    unknown = [m for m in modes if m not in setups.SETUPS]
    if unknown or not modes:
        parser.error(f"unknown mode(s) {unknown or args.modes!r}; choose from {', '.join(setups.SETUPS)}")
    for name in ("steps", "batch_size", "seq_len", "group_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    out = Path(args.out)
    problem = output_dir_problem(out)
    if problem:
        parser.error(f"--out {args.out}: {problem}")
    config = {k: getattr(args, k) for k in ("model", "steps", "batch_size", "seq_len", "group_size", "dtype", "lr",
                                            "seed", "interval_ms", "gradient_checkpointing")}
    cuda = torch.cuda.is_available()
    rows = []
    for i, mode in enumerate(modes, 1):
        print(f"[{i}/{len(modes)}] {mode} ...", flush=True)
        reason = setups.skip_reason(mode)
        if reason:
            rows.append(empty_row(mode, "skipped", reason))
            continue
        res = setups.run_isolated("hift_ds.profile.cli:profile_mode", dict(config, mode=mode), args.timeout,
                                  log=out / f"{mode}.log")
        rows.append(res["row"] if res["status"] == "ok" else
                    empty_row(mode, res["status"], f"{res['error']} (see {out / f'{mode}.log'})"))
    note = next((r.get("note") for r in rows if r.get("note")), None)
    if note is None and not cuda:
        note = "no GPU (torch sees no CUDA device): profiling host memory only (RSS, pinned)"
    if note:
        print(note)
    print(format_table(rows, gpu=any(r.get("gpu") for r in rows)))
    doc = {"version": 2, "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
           "command": ["python", "-m", "hift_ds.profile"] + list(argv if argv is not None else sys.argv[1:]),
           "config": config, "gpu": any(r.get("gpu") for r in rows), "note": note, "modes": rows}
    (out / "profile.json").write_text(json.dumps(doc, indent=1))
    panels = [{"title": f"{r['mode']} ({r['device']})" if r["status"] == "ok" else r["mode"],
               "timeline": r.get("timeline"), "spans": r.get("spans", []),
               "message": f"{r['status']}: {r['reason']}"} for r in rows]
    plot_timelines(panels, out / "profile.png")
    print(f"wrote {out / 'profile.json'} and {out / 'profile.png'}")
    return 0 if any(r["status"] == "ok" for r in rows) else 1
