"""Shared machinery of the training benchmarks (offload.py, compare.py): one mode per process.

A *mode* trains the same model (``hift_ds.presets.build_model``, same seed) on the same data
(``random_batch``, seeded by the step) with one optimizer set-up:

    fpft                     plain PyTorch: fp32 weights + torch.autocast(--dtype), torch.optim.AdamW
                             (fused on CUDA) over every parameter, so fp32 AdamW state for all of them
    hift                     HiFTOptimizer, offload none: --dtype weights, fp32 masters + state on the device
    hift-offload-noprefetch  HiFTOptimizer, offload cpu, prefetch off (each group copied in when it steps)
    hift-offload             HiFTOptimizer, offload cpu, prefetch on (next group copied in on a side stream)
    hift-offload-triton      as hift-offload with the fused Triton update (CUDA only)
    ds-zero2                 DeepSpeed ZeRO-2, bf16, client torch.optim.AdamW (fused on CUDA)
    ds-zero2-offload         DeepSpeed ZeRO-2, bf16, optimizer offloaded to CPU (DeepSpeedCPUAdam)
    badam                    the ``badam`` package's BlockOptimizer switching block every step

The hift modes other than hift-offload-triton use the torch update kernel, so that offload vs
no offload compares the pipeline, not the kernel. DeepSpeed modes and Triton need CUDA here
(on CPU DeepSpeedCPUAdam JIT-builds for ~50 s); they are skipped on CPU with that reason.

Each step is timed with torch.cuda.synchronize() around it on CUDA (wall clock on CPU); the row
holds the median over ``--steps`` after ``--warmup``. Peak GPU memory is counted from after the
model is built (so any allocator leftovers of loading are not the mode's) and includes weights,
optimizer set-up, gradients, state and activations.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
WEIGHT_DECAY = 0.01  # torch.optim.AdamW's default, passed explicitly so every mode uses the same
RESULT_MARK = "@@benchmark-row@@ "  # prefix of the worker's result line (libraries print to stdout too)
GIB = 2 ** 30


class Skip(Exception):
    """The mode cannot run here (no CUDA, package missing); the message says why."""


@dataclass
class Run:
    """A mode's model and training hooks, so one loop serves every mode."""

    model: nn.Module
    forward: Callable[[Tensor], Tensor]  # token ids -> loss
    backward: Callable[[Tensor], None]
    step: Callable[[], None]  # optimizer step, then gradients cleared
    pinned_bytes: Callable[[], int] | None = None
    memory_report: Callable[[], dict] | None = None
    notes: list[str] = field(default_factory=list)

    def train_step(self, ids: Tensor) -> Tensor:
        """Forward, backward and optimizer step on ``ids``; the (detached) loss."""
        loss = self.forward(ids)
        self.backward(loss)
        self.step()
        return loss.detach()


@dataclass(frozen=True)
class Mode:
    """How to build a mode, and what it needs to run."""

    factory: Callable[[argparse.Namespace, torch.device], Run]
    needs_cuda: bool = False
    package: str | None = None  # import name = pip name of a third-party package it needs


# ---- model and mode factories ---------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _model(args: argparse.Namespace, dtype: torch.dtype, device: torch.device) -> nn.Module:
    from hift_ds.presets import build_model

    model = build_model(args.model, dtype, device, args.seed, max_positions=max(4096, args.seq_len))
    model.config.use_cache = False  # training: no KV cache
    model.train()
    # Count peak memory from here: what loading left in the allocator is not the mode's.
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return model


def _lm_loss(model: nn.Module) -> Callable[[Tensor], Tensor]:
    return lambda ids: model(input_ids=ids, labels=ids).loss


def _fpft(args: argparse.Namespace, device: torch.device) -> Run:
    from hift_ds.presets import full_finetune

    model = _model(args, torch.float32, device)
    forward, step, _ = full_finetune(model, args.lr, DTYPES[args.dtype], WEIGHT_DECAY)
    note = f"fp32 weights + autocast({args.dtype}), fp32 AdamW state" if args.dtype != "fp32" else "fp32"
    return Run(model, forward, Tensor.backward, step, notes=[note])


def _hift(offload: str, prefetch: bool, kernel: str) -> Callable[[argparse.Namespace, torch.device], Run]:
    def factory(args: argparse.Namespace, device: torch.device) -> Run:
        from hift_ds.optimizer import HiFTOptimizer

        model = _model(args, DTYPES[args.dtype], device)
        opt = HiFTOptimizer(model, "adamw", group_size=args.group_size, offload=offload, prefetch=prefetch,
                            kernel=kernel, lr=args.lr, weight_decay=WEIGHT_DECAY)

        def step() -> None:
            opt.step()
            opt.zero_grad()
        return Run(model, _lm_loss(model), opt.backward, step,
                   pinned_bytes=lambda: opt.memory_report()["state_host_pinned"], memory_report=opt.memory_report,
                   notes=[f"{opt.num_groups} groups, {opt.backend} kernel"])
    return factory


def _pinned(objs: Sequence) -> int:
    """Bytes of the pinned host tensors found in nested lists/dicts ``objs``."""
    total, stack = 0, list(objs)
    while stack:
        obj = stack.pop()
        if torch.is_tensor(obj):
            total += obj.numel() * obj.element_size() if obj.device.type == "cpu" and obj.is_pinned() else 0
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple)):
            stack.extend(obj)
    return total


def _ds_zero2(offload: bool) -> Callable[[argparse.Namespace, torch.device], Run]:
    def factory(args: argparse.Namespace, device: torch.device) -> Run:
        import deepspeed

        from hift_ds.engine import single_process_env

        single_process_env()
        model = _model(args, DTYPES[args.dtype], device)
        adamw = {"lr": args.lr, "weight_decay": WEIGHT_DECAY}
        zero = {"stage": 2}
        config = {"train_micro_batch_size_per_gpu": args.batch_size, "gradient_accumulation_steps": 1,
                  "bf16": {"enabled": args.dtype == "bf16"}, "steps_per_print": 10 ** 9,
                  "wall_clock_breakdown": False, "zero_optimization": zero}
        client = None
        if offload:
            # DeepSpeed's own optimizer: with offload it picks DeepSpeedCPUAdam (the step runs on the CPU).
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
            config["optimizer"] = {"type": "AdamW", "params": adamw}
        else:
            # A torch client optimizer: DeepSpeed's FusedAdam would need a CUDA JIT build.
            client = torch.optim.AdamW(model.parameters(), **adamw, fused=True if device.type == "cuda" else None)
        engine, opt, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                                 optimizer=client, config=config)
        pinned = lambda: _pinned([getattr(opt, "single_partition_of_fp32_groups", []),  # noqa: E731
                                  getattr(getattr(opt, "optimizer", None), "state", {})])
        note = "DeepSpeedCPUAdam, step on CPU" if offload else "torch AdamW client optimizer"
        return Run(model, lambda ids: engine(input_ids=ids, labels=ids).loss, engine.backward, engine.step,
                   pinned_bytes=pinned, notes=[note])
    return factory


def _badam(args: argparse.Namespace, device: torch.device) -> Run:
    from badam import BlockOptimizer

    model = _model(args, DTYPES[args.dtype], device)
    base = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=WEIGHT_DECAY,
                             fused=True if device.type == "cuda" else None)
    # Blocks: embeddings, each layer, norm + head (as HiFT's units); ascending = HiFT's bottom2up.
    opt = BlockOptimizer(base, list(model.named_parameters()), switch_block_every=1, switch_mode="ascending",
                         include_embedding=True, include_lm_head=True, verbose=0)

    def step() -> None:
        opt.step()
        opt.zero_grad(set_to_none=True)
    return Run(model, _lm_loss(model), Tensor.backward, step,
               notes=[f"{opt.block_num} blocks; discards inactive blocks' optimizer state at each switch "
                      "(and runs gc.collect + empty_cache there)"])


MODES: dict[str, Mode] = {
    "fpft": Mode(_fpft),
    "hift": Mode(_hift("none", True, "torch")),
    "hift-offload-noprefetch": Mode(_hift("cpu", False, "torch")),
    "hift-offload": Mode(_hift("cpu", True, "torch")),
    "hift-offload-triton": Mode(_hift("cpu", True, "triton"), needs_cuda=True),
    "ds-zero2": Mode(_ds_zero2(False), needs_cuda=True, package="deepspeed"),
    "ds-zero2-offload": Mode(_ds_zero2(True), needs_cuda=True, package="deepspeed"),
    "badam": Mode(_badam, package="badam"),
}


def skip_reason(mode: str) -> str | None:
    """Why ``mode`` cannot run on this machine, or None (checked before spawning its process)."""
    if mode not in MODES:
        return f"unknown mode {mode!r}; known: {', '.join(MODES)}"
    spec = MODES[mode]
    if spec.needs_cuda and not torch.cuda.is_available():
        return "needs CUDA (no GPU here)"
    if spec.package and importlib.util.find_spec(spec.package) is None:
        return f"package {spec.package} not installed: pip install {spec.package}"
    return None


# ---- one mode in this process ----------------------------------------------------------------
def _gib(b: int | None) -> float | None:
    return None if b is None else b / GIB


def _base_row(mode: str, args: argparse.Namespace, device: str) -> dict:
    return {"mode": mode, "status": "ok", "error": None, "note": "", "device": device, "model": args.model,
            "dtype": args.dtype, "batch_size": args.batch_size, "seq_len": args.seq_len, "steps": args.steps,
            "warmup": args.warmup, "group_size": args.group_size, "step_ms": None, "step_ms_all": [],
            "tokens_per_s": None, "peak_alloc_gib": None, "peak_reserved_gib": None, "pinned_host_gib": None,
            "final_loss": None, "losses": [], "memory_report": None}


def device_name() -> str:
    """The device the modes run on, in words."""
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def run_mode(mode: str, args: argparse.Namespace,
             after: Callable[[str, Run, argparse.Namespace], dict] | None = None) -> dict:
    """Build ``mode`` and run ``--warmup`` + ``--steps`` training steps in this process; its row."""
    from hift_ds.presets import random_batch

    reason = skip_reason(mode)
    if reason:
        raise Skip(reason)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    run = MODES[mode].factory(args, device)
    vocab = run.model.config.vocab_size
    times, losses = [], []
    for i in range(args.warmup + args.steps):
        ids = random_batch(vocab, args.batch_size, args.seq_len, i, device)
        _sync(device)
        t0 = time.perf_counter()
        loss = run.train_step(ids)
        _sync(device)
        if i >= args.warmup:
            times.append((time.perf_counter() - t0) * 1e3)
        losses.append(float(loss))
    row = _base_row(mode, args, device_name())
    if device.type == "cuda":
        row.update(peak_alloc_gib=_gib(torch.cuda.max_memory_allocated(device)),
                   peak_reserved_gib=_gib(torch.cuda.max_memory_reserved(device)))
    # The loss after the last update, on the next (unseen) batch: comparable across modes.
    with torch.no_grad():
        final = float(run.forward(random_batch(vocab, args.batch_size, args.seq_len, len(losses), device)))
    med = statistics.median(times) if times else None
    row.update(step_ms=med, step_ms_all=times, tokens_per_s=args.batch_size * args.seq_len * 1e3 / med if med else None,
               pinned_host_gib=_gib(run.pinned_bytes()) if run.pinned_bytes else None, final_loss=final,
               losses=losses, memory_report=run.memory_report() if run.memory_report else None,
               note="; ".join(run.notes))
    if after is not None:
        row.update(after(mode, run, args))
    return row


def failed_row(mode: str, args: argparse.Namespace, error: str, status: str = "failed") -> dict:
    """A row with no figures and ``error`` saying why (status "skipped" or "failed")."""
    row = _base_row(mode, args, device_name())
    row.update(status=status, error=error)
    return row


def _describe(exc: BaseException) -> tuple[str, str]:
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    if isinstance(exc, Skip):
        return "skipped", str(exc)
    if isinstance(exc, torch.OutOfMemoryError):
        return "failed", f"CUDA out of memory: {first}"
    if isinstance(exc, ImportError) and getattr(exc, "name", None):
        pkg = exc.name.split(".")[0]
        return "failed", f"package {pkg} not installed: pip install {pkg}"
    return "failed", f"{type(exc).__name__}: {first}"


def worker_main(args: argparse.Namespace,
                after: Callable[[str, Run, argparse.Namespace], dict] | None = None) -> int:
    """``--_worker MODE``: run one mode and print its row as one JSON line on stdout; exit status."""
    ns = argparse.Namespace(**json.loads(args._args)) if args._args else args
    try:
        import transformers
        transformers.logging.set_verbosity_error()
        # Libraries print progress to stdout (BAdam, DeepSpeed); keep it off the result line.
        with contextlib.redirect_stdout(sys.stderr):
            row, rc = run_mode(args._worker, ns, after), 0
    except Exception as exc:  # noqa: BLE001 - every failure becomes a row saying why
        traceback.print_exc()
        status, error = _describe(exc)
        row, rc = failed_row(args._worker, ns, error, status), 0 if status == "skipped" else 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # without it a DeepSpeed process may exit non-zero
    sys.stdout.write(RESULT_MARK + json.dumps(row) + "\n")
    sys.stdout.flush()
    return rc


# ---- every mode in its own process -----------------------------------------------------------
def run_modes_in_subprocesses(modes: Sequence[str], args: argparse.Namespace, verbose: bool = True) -> list[dict]:
    """Each mode in a fresh ``python <args.script> --_worker MODE`` process (clean memory); their rows."""
    rows = []
    spec = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    for mode in modes:
        reason = skip_reason(mode)
        if reason:  # known in advance: no process needed
            rows.append(failed_row(mode, args, reason, "skipped"))
        else:
            rows.append(_spawn(mode, args, spec))
        if verbose:
            r = rows[-1]
            print(f"  {mode}: " + (f"{r['step_ms']:.1f} ms/step, final loss {r['final_loss']:.4f}"
                                   if r["status"] == "ok" else f"{r['status']}: {r['error']}"), flush=True)
    return rows


def _spawn(mode: str, args: argparse.Namespace, spec: dict) -> dict:
    cmd = [sys.executable, args.script, "--_worker", mode, "--_args", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return failed_row(mode, args, f"timed out after {args.timeout:g} s")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    # No row: the process died outside Python's control (killed, segfault, host OOM).
    tail = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    why = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit status {proc.returncode}"
    if proc.returncode == -9:
        why += " (host out of memory?)"
    return failed_row(mode, args, f"{why}: {tail[-1][:300] if tail else 'no output'}")


def with_overrides(args: argparse.Namespace, **kw) -> argparse.Namespace:
    """A copy of ``args`` with some options changed (e.g. another model or batch size)."""
    out = copy.copy(args)
    for k, v in kw.items():
        setattr(out, k, v)
    return out


# ---- command line and output -----------------------------------------------------------------
def make_parser(description: str, script: str, **defaults) -> argparse.ArgumentParser:
    """The options every benchmark shares (``defaults`` overrides their defaults), plus the worker's."""
    d = dict(model="llama-1b", batch_size=4, seq_len=512, steps=20, warmup=3, group_size=1, dtype="bf16",
             lr=1e-5, seed=0, timeout=1800.0, json=None) | defaults
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=d["model"], help="a preset (tiny, llama-1b, llama-7b) or a HF name/path")
    ap.add_argument("--batch-size", type=int, default=d["batch_size"])
    ap.add_argument("--seq-len", type=int, default=d["seq_len"])
    ap.add_argument("--steps", type=int, default=d["steps"], help="timed steps (median reported)")
    ap.add_argument("--warmup", type=int, default=d["warmup"], help="untimed steps first")
    ap.add_argument("--group-size", type=int, default=d["group_size"], help="HiFT units per group")
    ap.add_argument("--dtype", choices=list(DTYPES), default=d["dtype"],
                    help="model weights (fpft: fp32 weights + autocast to this dtype)")
    ap.add_argument("--lr", type=float, default=d["lr"])
    ap.add_argument("--seed", type=int, default=d["seed"])
    ap.add_argument("--timeout", type=float, default=d["timeout"], help="seconds per mode before it is killed")
    ap.add_argument("--json", default=d["json"], help="write the rows (and more) to this JSON file")
    ap.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_args", default=None, help=argparse.SUPPRESS)
    ap.set_defaults(script=os.path.abspath(script))
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
    head = ["mode", "step ms"] + [f"step/{b}" for b in bases] + ["tok/s", "alloc GiB", "rsrv GiB"]
    head += [f"{k}/{b}" for b in bases for k in ("alloc", "rsrv")] + ["pinned GiB", "final loss", "note / error"]
    lines = []
    for r in rows:
        if r["status"] != "ok":
            lines.append([r["mode"], f"{r['status']}: {r['error']}"])
            continue
        cells = [r["mode"], _fmt(r["step_ms"], ".1f")]
        cells += [_fmt(ratio(r, by_mode.get(b), "step_ms"), ".2f", "x") for b in bases]
        cells += [_fmt(r["tokens_per_s"], ".0f"), _fmt(r["peak_alloc_gib"], ".2f"), _fmt(r["peak_reserved_gib"], ".2f")]
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
    out = [f"device: {r0.get('device')}; model {r0.get('model')}, {r0.get('dtype')}, batch {r0.get('batch_size')}x"
           f"{r0.get('seq_len')}, median of {r0.get('steps')} steps after {r0.get('warmup')} warm-up; "
           f"torch {torch.__version__}",
           "fpft = fp32 weights + torch.autocast, torch AdamW (fp32 state) over all params; other modes keep "
           "--dtype weights. Ratios are to the baseline measured in this run; GPU memory '-' without CUDA.",
           fmt(head), "  ".join("-" * w for w in widths) + "  " + "-" * len(head[-1])]
    out += [fmt(c) if len(c) == len(head) else f"{c[0].ljust(widths[0])}  {c[1]}" for c in lines]
    return "\n".join(out)


def write_json(path: str, payload: dict) -> None:
    """Write ``payload`` (rows + metadata) as indented JSON."""
    with open(path, "w") as fh:
        json.dump(payload, fh, indent=1)


def meta(args: argparse.Namespace) -> dict:
    """Run metadata for the JSON: device, versions, options, date."""
    out = {"device": device_name(), "torch": torch.__version__, "python": sys.version.split()[0],
           "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "command": " ".join([os.path.basename(sys.argv[0])]
                                                                            + sys.argv[1:]),
           "options": {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "script"}}
    for pkg in ("deepspeed", "transformers", "triton", "badam"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version
            out[pkg] = version(pkg)
    return out
