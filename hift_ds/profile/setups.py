"""One registry of training set-ups, shared by the memory profiler and the benchmarks.

A *set-up* trains the same causal LM (``hift_ds.profile.presets.build_model``, seeded) on the same random
token batches with one optimizer arrangement:

    fpft                       fp32 weights + torch.autocast(dtype), torch.optim.AdamW (fused on CUDA) over
                               every parameter: the usual mixed-precision full fine-tuning
    hift / hift-triton         HiFTOptimizer, masters + state resident on the device; torch / Triton update
    hift-offload-noprefetch    offload to pinned host memory, each group copied in when it steps
    hift-offload               offload with prefetch (two device slots, one copy stream per direction, copies
                               in 128 MiB chunks, the group two steps ahead copied in behind the one going home)
    hift-offload-triton        as hift-offload with the fused Triton update (CUDA)
    hift-offload-triton-1slot  as hift-offload-triton with one device slot (refilled chunk by chunk behind its
                               copy home)
    ds-hift / ds-hift-offload  HiFT through hift_ds.initialize (a DeepSpeed engine) from ds_configs/hift.json,
                               state on the device / offloaded (two slots); its throughput timer unsynchronized
    ds-hift-offload-synctimer  as ds-hift-offload with DeepSpeed's default synchronized throughput timer
    ds-zero2 / ds-zero2-offload  DeepSpeed ZeRO-2 (client torch AdamW / DeepSpeedCPUAdam on the CPU) (CUDA)
    badam / badam-50           the ``badam`` package's BlockOptimizer switching block every step / every
                               50 steps (its documented default); it discards a block's state at a switch
    torchao-offload(-grads)    torchao.optim.CPUOffloadOptimizer: AdamW step on the CPU in the weights' dtype,
                               without / with offload_gradients (CUDA)

``build(name, options, device)`` returns a ``Built`` whose hooks one training loop drives;
``run_isolated`` runs a function in a fresh process (clean device memory) and returns its row.
"""
from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
WEIGHT_DECAY = 0.01  # torch.optim.AdamW's default, passed explicitly so every set-up uses the same


class Skip(Exception):
    """The set-up cannot run here (no CUDA, package missing); the message says why."""


@dataclass
class Options:
    """What every set-up is built from (the shared command-line options of profiler and benchmarks)."""

    model: str = "tiny"
    dtype: str = "bf16"
    batch_size: int = 4
    seq_len: int = 512
    group_size: int = 1
    lr: float = 1e-5
    seed: int = 0
    gradient_checkpointing: bool = False
    max_memory_gib: float | None = None

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace | dict) -> "Options":
        """The options found in an argparse namespace (or dict); others keep their defaults."""
        d = vars(ns) if isinstance(ns, argparse.Namespace) else ns
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass
class Built:
    """A set-up ready to train: its model and the hooks one loop drives, plus what it holds."""

    model: nn.Module
    forward: Callable[[Tensor], Tensor]  # token ids -> loss
    backward: Callable[[Tensor], None]
    step: Callable[[], None]  # optimizer step, then gradients cleared
    optimizer: Any = None
    grad_bytes: Callable[[], int] | None = None  # gradients held now (called after backward)
    state_bytes: Callable[[], int] | None = None  # optimizer state on the device now (called after step)
    pinned_bytes: Callable[[], int] | None = None
    memory_report: Callable[[], dict] | None = None
    notes: list[str] = field(default_factory=list)
    engine: Any = None  # the DeepSpeed engine of a set-up built through one

    def train_step(self, ids: Tensor) -> Tensor:
        """Forward, backward and optimizer step on ``ids``; the (detached) loss, left on the device."""
        loss = self.forward(ids)
        self.backward(loss)
        self.step()
        return loss.detach()


@dataclass(frozen=True)
class Setup:
    """How to build a set-up around a model, and what it needs to run."""

    build: Callable[[nn.Module, Options, torch.device], Built]
    fp32_weights: bool = False  # the model is built in fp32 (mixed precision by autocast)
    needs_cuda: bool = False
    package: str | None = None  # import name = pip name of a third-party package it needs


# ---- byte counts -------------------------------------------------------------------------------
def tensor_bytes(obj: Any, device: torch.device, pinned: bool = False) -> int:
    """Bytes of the tensors on ``device``'s type (or pinned host tensors) in nested lists/tuples/dicts."""
    if torch.is_tensor(obj):
        if pinned:
            return obj.numel() * obj.element_size() if obj.device.type == "cpu" and obj.is_pinned() else 0
        return obj.numel() * obj.element_size() if obj.device.type == device.type else 0
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, device, pinned) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v, device, pinned) for v in obj)
    return 0


def param_bytes(model: nn.Module, device: torch.device) -> int:
    """Bytes of the model's parameters on ``device``'s type, tied or flattened storage counted once."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.device.type == device.type and p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def grad_bytes(model: nn.Module, device: torch.device) -> int:
    """Bytes of the ``.grad`` tensors of the model's parameters on ``device``'s type."""
    return sum(p.grad.numel() * p.grad.element_size() for p in model.parameters()
               if p.grad is not None and p.grad.device.type == device.type)


def _plain(model: nn.Module, opt: torch.optim.Optimizer, device: torch.device, forward=None, notes=()) -> Built:
    """A set-up driven by ``loss.backward()`` and ``opt.step(); opt.zero_grad()``."""
    def step() -> None:
        opt.step()
        opt.zero_grad(set_to_none=True)
    inner = getattr(opt, "base_optimizer", opt)  # BAdam keeps the state in the optimizer it wraps
    return Built(model, forward or (lambda ids: model(input_ids=ids, labels=ids).loss), Tensor.backward, step, opt,
                 lambda: grad_bytes(model, device), lambda: tensor_bytes(inner.state, device),
                 lambda: tensor_bytes(inner.state, device, pinned=True), notes=list(notes))


# ---- the set-ups -------------------------------------------------------------------------------
def _fpft(model: nn.Module, o: Options, device: torch.device) -> Built:
    from hift_ds.profile.presets import full_finetune

    forward, _, opt = full_finetune(model, o.lr, DTYPES[o.dtype], WEIGHT_DECAY)
    note = f"fp32 weights + autocast({o.dtype}), fp32 AdamW state" if o.dtype != "fp32" else "fp32"
    return _plain(model, opt, device, forward, [note])


def _hift_built(model: nn.Module, opt, device: torch.device, forward, backward, step, notes: list[str]) -> Built:
    """A HiFT set-up's hooks (its memory figures from the optimizer's memory_report)."""
    # Only the device-resident part is optimizer state on a GPU; without one the store is host memory too.
    kinds = ("state_device",) if device.type == "cuda" else ("state_device", "state_host_pinned",
                                                             "state_host_pageable")
    return Built(model, forward, backward, step, opt, lambda: opt.memory_report()["gradients"],
                 lambda: sum(opt.memory_report()[k] for k in kinds), lambda: opt.memory_report()["state_host_pinned"],
                 opt.memory_report, notes)


def _where(offload: str, slots: int, prefetch: bool = True) -> str:
    return f"offload {offload}, {slots} slot(s), prefetch {'on' if prefetch else 'off'}" if offload != "none" \
        else "state on the device"


def _hift(offload: str, prefetch: bool = True, kernel: str = "torch", slots: int = 2):
    def build(model: nn.Module, o: Options, device: torch.device) -> Built:
        from hift_ds.optim.optimizer import HiFTOptimizer

        opt = HiFTOptimizer(model, "adamw", group_size=o.group_size, offload=offload, prefetch=prefetch,
                            offload_slots=slots, kernel=kernel, lr=o.lr, weight_decay=WEIGHT_DECAY)

        def step() -> None:
            opt.step()
            opt.zero_grad()
        return _hift_built(model, opt, device, lambda ids: model(input_ids=ids, labels=ids).loss, opt.backward, step,
                           [f"{opt.num_groups} groups, {opt.backend} kernel, {_where(offload, slots, prefetch)}"])
    return build


SHIPPED_CONFIG = Path(__file__).resolve().parents[2] / "ds_configs" / "hift.json"


def _ds_hift(offload: bool, synchronized_timer: bool = False):
    """HiFT through ``hift_ds.initialize`` (the DeepSpeed engine users train with) from the shipped
    ds_configs/hift.json: its clipping (1.0) and schedule, sizes and dtype from the options."""
    def build(model: nn.Module, o: Options, device: torch.device) -> Built:
        import hift_ds

        if not SHIPPED_CONFIG.is_file():
            raise Skip(f"needs {SHIPPED_CONFIG} (ds_configs/ comes with a checkout, not with the package)")
        cfg = json.loads(SHIPPED_CONFIG.read_text())
        cfg.update(train_micro_batch_size_per_gpu=o.batch_size, gradient_accumulation_steps=1,
                   bf16={"enabled": o.dtype == "bf16"}, fp16={"enabled": o.dtype == "fp16"})
        cfg["optimizer"]["params"].update(lr=o.lr, weight_decay=WEIGHT_DECAY)
        cfg["scheduler"]["params"].update(warmup_max_lr=o.lr, warmup_num_steps=10, total_num_steps=10 ** 6)
        cfg["hift"].update(group_size=o.group_size)
        cfg["hift"]["offload"]["device"] = "cpu" if offload else "none"
        if synchronized_timer:  # DeepSpeed's default; hift_ds.initialize keeps it only when asked for
            cfg["timers"] = {"throughput": {"enabled": True, "synchronized": True}}
        engine, opt, _, _ = hift_ds.initialize(model=model, config=cfg)
        timer = "synchronized" if engine.tput_timer.config.synchronized else "unsynchronized"
        built = _hift_built(model, opt, device, lambda ids: engine(input_ids=ids, labels=ids).loss, engine.backward,
                            engine.step, [f"DeepSpeed engine (hift_ds.initialize, {SHIPPED_CONFIG.name}), {timer} "
                                          f"throughput timer, clipping {opt.max_grad_norm:g}; {opt.num_groups} groups, "
                                          f"{opt.backend} kernel, {_where(opt.offload, len(opt.store.slots) or 2)}"])
        built.engine = engine
        return built
    return build


def _ds_zero2(offload: bool):
    def build(model: nn.Module, o: Options, device: torch.device) -> Built:
        import deepspeed

        from hift_ds.deepspeed.engine import single_process_env

        single_process_env()
        adamw = {"lr": o.lr, "weight_decay": WEIGHT_DECAY}
        zero: dict = {"stage": 2}
        config = {"train_micro_batch_size_per_gpu": o.batch_size, "gradient_accumulation_steps": 1,
                  "bf16": {"enabled": o.dtype == "bf16"}, "fp16": {"enabled": o.dtype == "fp16"},
                  "steps_per_print": 10 ** 9, "wall_clock_breakdown": False, "zero_optimization": zero}
        client = None
        if offload:  # DeepSpeed's own optimizer: with offload it picks DeepSpeedCPUAdam (step on the CPU)
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
            config["optimizer"] = {"type": "AdamW", "params": adamw}
        else:  # a torch client optimizer: DeepSpeed's FusedAdam would need a CUDA JIT build
            client = torch.optim.AdamW(model.parameters(), **adamw, fused=device.type == "cuda" or None)
        engine, opt, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), optimizer=client,
                                                 config=config)
        # ZeRO-2 keeps gradients in its own buckets/partitions and fp32 masters beside the base optimizer's state.
        grad_attrs = ("ipg_buffer", "grads_in_partition", "temp_grad_buffer_for_gpu_offload", "averaged_gradients")
        state = lambda pinned=False: (tensor_bytes(getattr(opt, "optimizer", opt).state, device, pinned)  # noqa: E731
                                      + tensor_bytes(getattr(opt, "single_partition_of_fp32_groups", None), device,
                                                     pinned))
        return Built(model, lambda ids: engine(input_ids=ids, labels=ids).loss, engine.backward, engine.step, opt,
                     lambda: grad_bytes(model, device) + sum(tensor_bytes(getattr(opt, a, None), device)
                                                             for a in grad_attrs),
                     state, lambda: state(True),
                     notes=["DeepSpeedCPUAdam, step on the CPU" if offload else "torch AdamW client optimizer"])
    return build


def _badam(switch_every: int):
    def build(model: nn.Module, o: Options, device: torch.device) -> Built:
        from badam import BlockOptimizer

        base = torch.optim.AdamW(model.parameters(), lr=o.lr, weight_decay=WEIGHT_DECAY,
                                 fused=device.type == "cuda" or None)
        # Blocks: embeddings, each layer, norm + head (as HiFT's units); ascending = HiFT's bottom2up.
        opt = BlockOptimizer(base, list(model.named_parameters()), switch_block_every=switch_every,
                             switch_mode="ascending", include_embedding=True, include_lm_head=True, verbose=0)
        return _plain(model, opt, device, notes=[
            f"{opt.block_num} blocks, switch every {switch_every} step(s); discards the block's optimizer state at "
            "each switch (and runs gc.collect + empty_cache there)"])
    return build


def _torchao(offload_gradients: bool):
    def build(model: nn.Module, o: Options, device: torch.device) -> Built:
        from torchao.optim import CPUOffloadOptimizer

        opt = CPUOffloadOptimizer(model.parameters(), torch.optim.AdamW, offload_gradients=offload_gradients,
                                  lr=o.lr, weight_decay=WEIGHT_DECAY)
        # It keeps one CPU optimizer per large parameter (pinned host copies of the weights and grads) and
        # a device optimizer for the small ones; there is no .state of its own.
        built = _plain(model, opt, device, notes=[
            f"AdamW step on the CPU in {o.dtype} (no fp32 masters), offload_gradients={offload_gradients}"])
        built.state_bytes = lambda: tensor_bytes(opt.d_opt.state, device) if opt.d_opt is not None else 0
        built.pinned_bytes = lambda: tensor_bytes([[p, p.grad] for p in opt.param_d2h_map.values()], device,
                                                  pinned=True)
        return built
    return build


SETUPS: dict[str, Setup] = {
    "fpft": Setup(_fpft, fp32_weights=True),
    "hift": Setup(_hift("none")),
    "hift-triton": Setup(_hift("none", kernel="triton"), needs_cuda=True),
    "hift-offload-noprefetch": Setup(_hift("cpu", prefetch=False)),
    "hift-offload": Setup(_hift("cpu")),
    "hift-offload-triton": Setup(_hift("cpu", kernel="triton"), needs_cuda=True),
    "hift-offload-triton-1slot": Setup(_hift("cpu", kernel="triton", slots=1), needs_cuda=True),
    "ds-hift": Setup(_ds_hift(False), package="deepspeed"),
    "ds-hift-offload": Setup(_ds_hift(True), package="deepspeed"),
    "ds-hift-offload-synctimer": Setup(_ds_hift(True, synchronized_timer=True), package="deepspeed"),
    "ds-zero2": Setup(_ds_zero2(False), needs_cuda=True, package="deepspeed"),
    "ds-zero2-offload": Setup(_ds_zero2(True), needs_cuda=True, package="deepspeed"),
    "badam": Setup(_badam(1), package="badam"),
    "badam-50": Setup(_badam(50), package="badam"),
    "torchao-offload": Setup(_torchao(False), needs_cuda=True, package="torchao"),
    "torchao-offload-grads": Setup(_torchao(True), needs_cuda=True, package="torchao"),
}


def skip_reason(name: str) -> str | None:
    """Why set-up ``name`` cannot run on this machine, or None (checked before spawning its process)."""
    if name not in SETUPS:
        return f"unknown set-up {name!r}; known: {', '.join(SETUPS)}"
    setup = SETUPS[name]
    if setup.needs_cuda and not torch.cuda.is_available():
        return "needs CUDA (no GPU here)"
    if setup.package and importlib.util.find_spec(setup.package) is None:
        return f"package {setup.package} not installed: pip install {setup.package}"
    return None


def device() -> torch.device:
    """The device set-ups run on: the current CUDA device, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def cap_device_memory(gib: float | None, dev: torch.device) -> None:
    """Make this process's allocator behave as on a ``gib`` GiB card (no-op without CUDA or a cap)."""
    if gib is None or dev.type != "cuda":
        return
    total = torch.cuda.get_device_properties(dev).total_memory
    if gib * 2 ** 30 > total:
        raise ValueError(f"--max-memory-gib {gib:g} exceeds this device's {total / 2 ** 30:.1f} GiB")
    torch.cuda.set_per_process_memory_fraction(gib * 2 ** 30 / total, dev)


def build(name: str, o: Options, dev: torch.device) -> Built:
    """Build the model (memory cap, dtype, checkpointing as ``o`` says) and set-up ``name`` around it."""
    from hift_ds.activations import enable_gradient_checkpointing
    from hift_ds.profile.presets import build_model

    reason = skip_reason(name)
    if reason:
        raise Skip(reason)
    setup = SETUPS[name]
    cap_device_memory(o.max_memory_gib, dev)
    model = build_model(o.model, torch.float32 if setup.fp32_weights else DTYPES[o.dtype], dev, o.seed,
                        max_positions=max(4096, o.seq_len))
    model.config.use_cache = False  # training: no KV cache
    if o.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    # Count peak memory from here: what loading left in the allocator is not the set-up's.
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    built = setup.build(model, o, dev)
    if o.gradient_checkpointing:
        built.notes.append("gradient checkpointing")
    return built


def describe_failure(exc: BaseException) -> tuple[str, str]:
    """("skipped" | "failed", one line saying why) for an exception raised while running a set-up."""
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    if isinstance(exc, Skip):
        return "skipped", str(exc)
    if isinstance(exc, torch.OutOfMemoryError):
        return "failed", f"CUDA out of memory: {first}"
    if isinstance(exc, ImportError) and getattr(exc, "name", None) and not _installed(exc.name.split(".")[0]):
        pkg = exc.name.split(".")[0]
        return "failed", f"package {pkg} not installed: pip install {pkg}"
    # Anything else (a package that is installed but fails to import, a name it lacks, another
    # module of the same name earlier on sys.path) keeps the original text, which names the cause.
    return "failed", f"{type(exc).__name__}: {first}"


def _installed(package: str) -> bool:
    """Whether a top-level ``package`` can be found on sys.path at all."""
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # a half-imported module, or one without a spec
        return True


# ---- one function in a fresh process -----------------------------------------------------------
def run_isolated(target: str, payload: dict, timeout: float, log: Path | None = None,
                 path: Sequence[str] = ()) -> dict:
    """Call ``target(payload)`` ("module:function") in a fresh Python process, with ``path`` first on its sys.path.

    Returns ``{"status": "ok", "row": <its return value>}`` or ``{"status": "skipped" | "failed",
    "error": <one line>}``; the child's output goes to ``log`` (or is captured for the error line).
    """
    env = dict(os.environ)
    # A source checkout works without installing: the child imports hift_ds from the same tree, after the
    # caller's own folders (a script's modules are found as when it runs).
    root = str(Path(__file__).resolve().parents[2])  # the folder holding hift_ds/, never a folder inside it
    env["PYTHONPATH"] = os.pathsep.join([*map(str, path), root, *filter(None, [env.get("PYTHONPATH")])])
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "hift_ds.profile.setups", target, json.dumps(payload), str(result)]
        out = open(log, "w") if log else subprocess.PIPE
        try:
            proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, text=True, env=env, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"status": "failed", "error": f"timed out after {timeout:g} s"}
        finally:
            if log:
                out.close()
        if result.exists():
            return json.loads(result.read_text())
    # No result: the process died outside Python's control (killed, segfault, host OOM).
    text = log.read_text(errors="replace") if log else proc.stdout
    lines = [ln for ln in text.splitlines() if ln.strip()]
    why = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit status {proc.returncode}"
    if proc.returncode == -9:
        why += " (host out of memory?)"
    return {"status": "failed", "error": f"{why}: {lines[-1][:300] if lines else 'no output'}"}


def _resolve(target: str) -> Callable[[dict], Any]:
    where, _, func = target.rpartition(":")
    return getattr(importlib.import_module(where), func)


def _child_main(argv: list[str]) -> int:
    target, payload, result = argv
    try:
        import transformers
        transformers.logging.set_verbosity_error()
        out, rc = {"status": "ok", "row": _resolve(target)(json.loads(payload))}, 0
    except Exception as exc:  # noqa: BLE001 - every failure becomes a result saying why
        traceback.print_exc()
        status, error = describe_failure(exc)
        out, rc = {"status": status, "error": error}, 0 if status == "skipped" else 1
    Path(result).write_text(json.dumps(out))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # without it a DeepSpeed process may exit non-zero
    return rc


if __name__ == "__main__":
    # Through the imported module, not this __main__ copy: Skip must be the class the set-ups raise.
    from hift_ds.profile.setups import _child_main as child_main
    sys.exit(child_main(sys.argv[1:]))
