"""One profiling mode in its own process, and the CLI's table; used by ``python -m hift_ds.profile``.

``python -m hift_ds._profile_modes --spec JSON --result PATH`` builds the model, wraps it in the
mode's optimizer, runs the shared training loop under a ``MemoryProfiler`` and writes the mode's
row (fields documented in ``hift_ds.profile``) to PATH, or a failed row saying why.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
BREAKDOWN = ("weights", "gradients", "optimizer_state", "activations_other")


@dataclass
class Run:
    """A mode's training hooks, so that one loop serves every mode."""

    forward: Callable[[Tensor], Tensor]  # token ids -> loss
    backward: Callable[[Tensor], None]
    step: Callable[[], None]  # optimizer step, then gradients cleared
    grad_bytes: Callable[[], int]  # gradients held now (called after backward)
    state_bytes: Callable[[], int]  # optimizer state held now (called after step)
    optimizer: Any  # given to MemoryProfiler.attach (pinned host figures)


def tensor_bytes(obj: Any, device: torch.device) -> int:
    """Bytes of the tensors on ``device``'s type found in ``obj`` (tensors, lists, tuples, dicts)."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size() if obj.device.type == device.type else 0
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, device) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v, device) for v in obj)
    return 0


def param_bytes(model: nn.Module, device: torch.device) -> int:
    """Bytes of the model's parameters on ``device``'s type, tied or flattened storage counted once."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.device.type == device.type and p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def _grad_bytes(model: nn.Module, device: torch.device) -> int:
    return sum(p.grad.numel() * p.grad.element_size() for p in model.parameters()
               if p.grad is not None and p.grad.device.type == device.type)


def _fpft(model: nn.Module, spec: dict, device: torch.device) -> Run:
    from hift_ds.presets import full_finetune

    # The model was built in fp32 for this mode (see run_mode); compute runs in --dtype.
    forward, step, opt = full_finetune(model, spec["lr"], DTYPES[spec["dtype"]])
    return Run(forward, Tensor.backward, step,
               lambda: _grad_bytes(model, device), lambda: tensor_bytes(opt.state, device), opt)


def _hift(model: nn.Module, spec: dict, device: torch.device, offload: str) -> Run:
    from hift_ds.optimizer import HiFTOptimizer

    opt = HiFTOptimizer(model, "adamw", group_size=spec["group_size"], offload=offload, lr=spec["lr"])
    # On a GPU only the device-resident part counts; on CPU the whole store is host memory (RSS).
    kinds = ("state_device",) if device.type == "cuda" else ("state_device", "state_host_pinned", "state_host_pageable")

    def step() -> None:
        opt.step()
        opt.zero_grad()
    return Run(lambda ids: model(input_ids=ids, labels=ids).loss, opt.backward, step,
               lambda: opt.memory_report()["gradients"], lambda: sum(opt.memory_report()[k] for k in kinds), opt)


def _zero2_offload(model: nn.Module, spec: dict, device: torch.device) -> Run:
    import deepspeed

    from hift_ds.engine import single_process_env

    single_process_env()
    config = {"train_micro_batch_size_per_gpu": spec["batch_size"], "gradient_accumulation_steps": 1,
              "optimizer": {"type": "AdamW", "params": {"lr": spec["lr"]}},
              "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": True}},
              "bf16": {"enabled": spec["dtype"] == "bf16"}, "fp16": {"enabled": spec["dtype"] == "fp16"},
              "steps_per_print": 10 ** 9, "wall_clock_breakdown": False}
    engine, opt, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    # ZeRO-2 keeps gradients in its own buckets/partitions and fp32 masters beside the base optimizer's state.
    grad_attrs = ("ipg_buffer", "grads_in_partition", "temp_grad_buffer_for_gpu_offload", "averaged_gradients")
    return Run(lambda ids: engine(input_ids=ids, labels=ids).loss, engine.backward, engine.step,
               lambda: _grad_bytes(model, device) + sum(tensor_bytes(getattr(opt, a, None), device)
                                                        for a in grad_attrs),
               lambda: tensor_bytes(getattr(opt, "optimizer", opt).state, device)
               + tensor_bytes(getattr(opt, "single_partition_of_fp32_groups", None), device), opt)


def build_run(mode: str, model: nn.Module, spec: dict, device: torch.device) -> Run:
    """The training hooks of ``mode`` (one of hift_ds.profile.MODES) around ``model``."""
    if mode == "fpft":
        return _fpft(model, spec, device)
    if mode in ("hift", "hift-offload"):
        return _hift(model, spec, device, "cpu" if mode == "hift-offload" else "none")
    if mode == "zero2-offload":
        return _zero2_offload(model, spec, device)
    raise ValueError(f"unknown mode {mode!r}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(run: Run, prof, spec: dict, vocab: int, device: torch.device) -> dict:
    """The loop every mode shares: forward, backward, step per phase; step times and largest grads/state."""
    from hift_ds.presets import random_batch

    times, losses, grads, state = [], [], 0, 0
    for s in range(spec["steps"]):
        ids = random_batch(vocab, spec["batch_size"], spec["seq_len"], s, device)
        # No sync at phase marks: the allocator (and cudaMalloc) act in host order, so per-phase memory
        # is right without one; phase durations are host-side, step times (synced) are not.
        _sync(device)
        start = time.perf_counter()
        with prof.phase("forward"):
            loss = run.forward(ids)
        with prof.phase("backward"):
            run.backward(loss)
        grads = max(grads, run.grad_bytes())
        with prof.phase("step"):
            run.step()
        state = max(state, run.state_bytes())
        _sync(device)
        times.append(time.perf_counter() - start)
        losses.append(float(loss.detach()))
    return {"step_times_s": times, "losses": losses, "gradients": grads, "optimizer_state": state}


def empty_row(mode: str, status: str, reason: str | None) -> dict:
    """A mode's row with every figure unset (skipped or failed modes)."""
    return {"mode": mode, "status": status, "reason": reason, "device": None, "gpu": False, "note": None,
            "params": None, "peak_device_used": None, "peak_allocated": None, "peak_reserved": None,
            "peak_rss": None, "pinned_host": None, "pinned_source": None, "breakdown": None,
            "step_time_median_s": None, "step_times_s": [], "losses": [], "phases": {}, "timeline": None,
            "spans": []}


def run_mode(spec: dict) -> dict:
    """Build, train and profile one mode in this process; its row for profile.json."""
    from hift_ds.presets import build_model
    from hift_ds.profile import MemoryProfiler

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    # fpft keeps fp32 weights (mixed precision by autocast); the other modes hold --dtype weights.
    dtype = torch.float32 if spec["mode"] == "fpft" else DTYPES[spec["dtype"]]
    model = build_model(spec["model"], dtype, device, spec["seed"], max_positions=max(spec["seq_len"], 2048))
    model.config.use_cache = False  # no KV cache in training: it would count as activations
    model.train()
    run = build_run(spec["mode"], model, spec, device)
    weights = param_bytes(model, device)
    prof = MemoryProfiler(interval_ms=spec["interval_ms"], optimizer=run.optimizer)
    with prof:
        stats = train(run, prof, spec, model.config.vocab_size, device)
    summ = prof.summary()
    peak = summ["peak"]
    basis = "peak_allocated" if summ["gpu"] else "peak_rss"
    total = peak["allocated"] if summ["gpu"] else peak["rss"]
    parts = {"weights": weights, "gradients": stats["gradients"], "optimizer_state": stats["optimizer_state"]}
    parts["activations_other"] = total - sum(parts.values())
    if parts["activations_other"] < 0:
        logger.warning("weights+gradients+state exceed the measured peak by %d bytes", -parts["activations_other"])
    row = empty_row(spec["mode"], "ok", None)
    row.update(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", gpu=summ["gpu"],
               note=summ["note"], params=sum(p.numel() for p in model.parameters()),
               peak_device_used=peak["device_used"], peak_allocated=peak["allocated"],
               peak_reserved=peak["reserved"], peak_rss=peak["rss"], pinned_host=peak["pinned_host"],
               pinned_source=summ["pinned_source"], breakdown={"basis": basis, "total": total, **parts},
               step_time_median_s=statistics.median(stats["step_times_s"]), step_times_s=stats["step_times_s"],
               losses=stats["losses"], phases=summ["phases"], timeline=prof.timeline(), spans=prof.spans())
    return row


def run_worker(spec: dict, out: Path, timeout: float) -> dict:
    """Run one mode in a fresh process (clean memory); its row, or a failed row saying why."""
    env = dict(os.environ)
    # A source checkout works without installing: the worker imports hift_ds from the same tree.
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    log = out / f"{spec['mode']}.log"
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "hift_ds._profile_modes", "--spec", json.dumps(spec), "--result", str(result)]
        with open(log, "w") as fh:
            try:
                proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, timeout=timeout)
            except subprocess.TimeoutExpired:
                return empty_row(spec["mode"], "failed", f"timed out after {timeout:g} s (see {log})")
        if result.exists():
            return json.loads(result.read_text())
    # No row: the process died before writing one (killed, or crashed outside Python).
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    why = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit status {proc.returncode}"
    if proc.returncode == -9:
        why += " (host out of memory?)"
    return empty_row(spec["mode"], "failed", f"{why}: {lines[-1] if lines else 'no output'} (see {log})")


def _size(b: int | None) -> str:
    if b is None:
        return "n/a"
    return f"{b / 2 ** 30:.2f} GiB" if abs(b) >= 2 ** 30 else f"{b / 2 ** 20:.1f} MiB"


def format_table(rows: list[dict], gpu: bool) -> str:
    """The CLI's table: one line per mode, the breakdown columns adding up to their basis."""
    basis = ("breakdown of peak allocated GPU memory (torch allocator); device peak from pynvml" if gpu else
             "GPU figures unavailable: breakdown of peak process RSS (host memory)")
    head = ["mode", "status", "dev peak", "alloc peak", "weights", "grads", "opt state", "act+other", "pinned",
            "RSS", "step (med)"]
    lines = []
    for r in rows:
        if r["status"] != "ok":
            lines.append([r["mode"], f"{r['status']}: {r['reason']}"])
            continue
        b = r["breakdown"]
        lines.append([r["mode"], "ok", _size(r["peak_device_used"]), _size(r["peak_allocated"])]
                     + [_size(b[k]) for k in BREAKDOWN]
                     + [_size(r["pinned_host"]), _size(r["peak_rss"]), f"{r['step_time_median_s'] * 1000:.1f} ms"])
    full = [ln for ln in lines if len(ln) == len(head)]
    widths = [max(len(str(x[i])) for x in [head] + full) for i in range(len(head))]
    widths[0] = max(len(r["mode"]) for r in rows + [{"mode": head[0]}])
    fmt = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    out = [basis, fmt(head), fmt("-" * w for w in widths)]
    for ln in lines:
        out.append(fmt(ln) if len(ln) == len(head) else f"{ln[0].ljust(widths[0])}  {ln[1]}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """Worker entry point: run one mode from ``--spec`` and write its row to ``--result``."""
    p = argparse.ArgumentParser(prog="python -m hift_ds._profile_modes",
                                description="internal worker of python -m hift_ds.profile: one mode, one process")
    p.add_argument("--spec", required=True, help="JSON: model, mode, steps, batch_size, seq_len, group_size, "
                                                 "dtype, lr, seed, interval_ms")
    p.add_argument("--result", required=True, help="where to write the mode's row (JSON)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    spec = json.loads(args.spec)
    try:
        row, rc = run_mode(spec), 0
    except Exception as e:  # the row says why; the traceback goes to the mode's log
        traceback.print_exc()
        msg = (str(e).strip().splitlines() or [""])[0][:300]
        if isinstance(e, torch.OutOfMemoryError):
            msg = f"out of memory: {msg}"
        row, rc = empty_row(spec["mode"], "failed", f"{type(e).__name__}: {msg}"), 1
    with open(args.result, "w") as fh:
        json.dump(row, fh)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return rc


if __name__ == "__main__":
    sys.exit(main())
