"""Time the fused Triton update kernels against torch.optim on one flat HiFT group.

    python benchmarks/update_kernels.py                   # on a CUDA GPU: 1.07e9 and 200e6 fp32 params
    python benchmarks/update_kernels.py --json out.json   # also write the rows as JSON
    python benchmarks/update_kernels.py --cpu-smoke       # tiny sizes on CPU (Triton interpreter): checks the script

Each row is the median of ``--iters`` timed steps after ``--warmup`` steps (CUDA events). The
effective bandwidth counts the bytes an update must read and write at least once (see
``bytes_per_param``) divided by the time; "copy" is a device-to-device copy, the bandwidth this
GPU actually reaches, for scale.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Callable

import torch

CPU_SMOKE_SIZES = (4096, 1000)
GPU_SIZES = (1_070_000_000, 202_383_360)  # all of a 7B model's params; one Llama-7B decoder layer


def bytes_per_param(name: str, momentum: bool = False, model_bytes: int = 0, grad_bytes: int = 4) -> int:
    """Minimum bytes moved per parameter by one update: each operand read once, each output written once."""
    # grad read + fp32 master read and write (4 + 4), + each fp32 state read and write (8 per state),
    # + the model copy written in its dtype. AdamW fp32: 4 + 8 + 2*8 = 28 B; SGD momentum and
    # Adagrad: 4 + 8 + 8 = 20 B; plain SGD 12 B; AdamW with a bf16 model written: 30 B.
    states = {"adamw": 2, "adam": 2, "sgd": 1 if momentum else 0, "adagrad": 1}[name]
    return grad_bytes + 8 + 8 * states + model_bytes


def time_cuda(fn: Callable[[], None], warmup: int, iters: int) -> float:
    """Median milliseconds of ``fn`` on the current CUDA stream."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_cpu(fn: Callable[[], None], warmup: int, iters: int) -> float:
    """Median milliseconds of ``fn`` on the CPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


CASES = {  # name -> (optimizer, hyper-parameters, torch implementations to compare)
    "adamw": ("adamw", dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01), ("fused", "foreach")),
    "sgd-momentum": ("sgd", dict(lr=1e-3, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False),
                     ("fused", "foreach")),
    "adagrad": ("adagrad", dict(lr=1e-2, lr_decay=0.0, weight_decay=0.0, initial_accumulator_value=0.0, eps=1e-10),
                ("fused", "foreach")),
}
TORCH_CLS = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad}


def bench_case(case: str, n: int, device: torch.device, blocks: list[int | None], timer, warmup: int, iters: int,
               model_dtype: torch.dtype | None = None) -> list[dict]:
    """Rows for one optimizer and size: Triton per block size, then each torch implementation."""
    from hift_ds import kernels

    name, hyper, impls = CASES[case]
    nbytes = bytes_per_param(name, momentum=hyper.get("momentum", 0.0) != 0.0,
                             model_bytes=2 if model_dtype is not None else 0) * n
    label = case + ("+bf16-model" if model_dtype is not None else "")
    rows = []

    def row(impl: str, ms: float | None, note: str = "") -> dict:
        gbs = nbytes / (ms * 1e-3) / 1e9 if ms else None
        return {"case": label, "params": n, "impl": impl, "ms": ms, "gb_s": gbs, "bytes": nbytes, "note": note}

    param = torch.randn(n, device=device)
    grad = torch.randn(n, device=device) * 1e-2
    flat = {"param": param, "grad": grad}
    for k, v in kernels.state_kinds(name, hyper).items():
        flat[k] = torch.full((n,), v, device=device)
    if model_dtype is not None:
        flat["model"] = param.to(model_dtype)
    state = {k: [v] for k, v in flat.items() if k not in ("param", "grad", "model")}
    for block in blocks:
        if block is not None:
            os.environ["HIFT_TRITON_BLOCK"] = str(block)
        step = [0]

        def triton_step() -> None:
            step[0] += 1
            kernels.apply_update(name, hyper, [param], [grad], state, [step[0]], backend="triton", flat=flat)

        rows.append(row(f"triton(block={block or 'default'})", timer(triton_step, warmup, iters)))
        os.environ.pop("HIFT_TRITON_BLOCK", None)
    flat = state = None  # free the buffers before the torch runs

    for impl in impls:
        p = param.detach().clone().requires_grad_()
        p.grad = grad
        try:
            opt = TORCH_CLS[name]([p], **hyper, **{impl: True})
            model = param.to(model_dtype) if model_dtype is not None else None

            def torch_step() -> None:
                opt.step()
                if model is not None:
                    model.copy_(p.detach())  # torch needs a separate cast kernel for the model copy

            rows.append(row(f"torch {impl}", timer(torch_step, warmup, iters)))
        except (RuntimeError, ValueError, TypeError) as exc:  # e.g. no fused kernel for this optimizer/device
            rows.append(row(f"torch {impl}", None, note=str(exc).splitlines()[0][:80]))
        finally:
            p.grad = None
            opt = model = None
            p = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
    # Baseline: torch's fused kernel, or foreach where torch has no fused one on this device.
    base = next((r for impl in ("torch fused", "torch foreach") for r in rows if r["impl"] == impl and r["ms"]), None)
    for r in rows:
        r["baseline"] = base["impl"] if base else None
        r["speedup"] = base["ms"] / r["ms"] if base and r["ms"] else None  # >1: faster than the baseline
    return rows


def check(device: torch.device, n: int = 1_000_003) -> list[str]:
    """Triton against the torch reference on ``device`` (flat and multi-tensor, 3 steps): failures."""
    from hift_ds import kernels

    failures = []
    for case, (name, hyper, _) in CASES.items():
        for model_dtype in (None, torch.bfloat16):
            g = torch.Generator(device=device).manual_seed(0)
            sizes = [n // 3, n - n // 3]
            runs = {b: {"param": torch.randn(n, device=device, generator=g)} for b in ("triton", "torch")}
            runs["torch"]["param"] = runs["triton"]["param"].clone()
            for flat in runs.values():
                flat.update({k: torch.full((n,), v, device=device) for k, v in kernels.state_kinds(name, hyper).items()})
                if model_dtype is not None:
                    flat["model"] = flat["param"].to(model_dtype)
            for step in range(1, 4):
                grad = torch.randn(n, device=device, generator=g) * 64
                for backend, flat in runs.items():
                    flat["grad"] = grad
                    split = {k: list(v.split(sizes)) for k, v in flat.items()}
                    multi = step == 2 and backend == "triton"  # one step through the multi-tensor path
                    kernels.apply_update(name, hyper, split["param"], split["grad"],
                                         {k: v for k, v in split.items() if k not in ("param", "grad", "model")},
                                         [step, step], backend=backend, flat=None if multi else flat,
                                         inv_scale=1 / 64, model_params=split.get("model") if multi else None)
            for k, v in runs["triton"].items():
                try:
                    if k == "model":
                        # Masters a few fp32 ulps apart can round to neighbouring bf16 values: one bf16 ulp
                        # (2**-8 relative) apart at most; exactness is checked against this run's own masters.
                        torch.testing.assert_close(v, runs["torch"][k], rtol=2 ** -8, atol=1e-6)
                        assert torch.equal(v, runs["triton"]["param"].to(model_dtype)), "model != master cast"
                    else:
                        torch.testing.assert_close(v, runs["torch"][k], rtol=1e-5, atol=1e-6)
                except AssertionError as exc:
                    failures.append(f"{case} model={model_dtype} {k}: {str(exc).splitlines()[0]}")
    return failures


def bench_copy(n: int, device: torch.device, timer, warmup: int, iters: int) -> dict:
    """Bandwidth of a plain fp32 copy (read n + write n), the practical ceiling for the updates."""
    src, dst = torch.randn(n, device=device), torch.empty(n, device=device)
    ms = timer(lambda: dst.copy_(src), warmup, iters)
    return {"case": "copy", "params": n, "impl": "torch copy_", "ms": ms, "gb_s": 8 * n / (ms * 1e-3) / 1e9,
            "bytes": 8 * n, "note": "", "baseline": None, "speedup": None}


def print_table(rows: list[dict]) -> None:
    """One line per row: case, size, implementation, ms, GB/s, share of copy bandwidth, speed-up."""
    print(f"{'case':<20}{'params':>14}  {'impl':<22}{'ms':>9}{'GB/s':>9}{'%copy':>7}{'speed-up':>10}  baseline / note")
    copy = {r["params"]: r["gb_s"] for r in rows if r["case"] == "copy"}
    for r in rows:
        ms = f"{r['ms']:.3f}" if r["ms"] else "-"
        gbs = f"{r['gb_s']:.1f}" if r["gb_s"] else "-"
        share = f"{100 * r['gb_s'] / copy[r['params']]:.0f}%" if r["gb_s"] and copy.get(r["params"]) else "-"
        ratio = f"{r['speedup']:.2f}x" if r.get("speedup") else "-"
        print(f"{r['case']:<20}{r['params']:>14,}  {r['impl']:<22}{ms:>9}{gbs:>9}{share:>7}{ratio:>10}  "
              f"{r.get('baseline') or ''} {r['note']}")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit status."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default=None, help="comma-separated parameter counts (default: 1.07e9,202383360)")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {list(CASES)}")
    ap.add_argument("--blocks", default="1024,2048,4096", help="Triton block sizes to try ('default' for the env/default)")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--no-model-cast", action="store_true", help="skip the AdamW + bf16 model copy rows")
    ap.add_argument("--json", default=None, help="write the rows to this JSON file")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on CPU through the Triton interpreter")
    args = ap.parse_args(argv)

    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported (lazily, at the first update)
        device, timer = torch.device("cpu"), time_cpu
        sizes, blocks, warmup, iters = list(CPU_SMOKE_SIZES), [None], 1, 2
    elif not torch.cuda.is_available():
        print("benchmarks/update_kernels.py needs a CUDA GPU (none found); run with --cpu-smoke to exercise it on CPU")
        return 0
    else:
        device, timer = torch.device("cuda"), time_cuda
        sizes = [int(float(s)) for s in args.sizes.split(",")] if args.sizes else list(GPU_SIZES)
        blocks = [None if b == "default" else int(b) for b in args.blocks.split(",")]
        warmup, iters = args.warmup, args.iters
    if args.cpu_smoke and args.sizes:
        sizes = [int(float(s)) for s in args.sizes.split(",")]

    failures = check(device, n=5000 if args.cpu_smoke else 1_000_003)
    print("correctness check (Triton vs torch reference): " + ("ok" if not failures else "FAILED"))
    for f in failures:
        print("  " + f)
    rows = []
    for n in sizes:
        rows.append(bench_copy(n, device, timer, warmup, iters))
        for case in args.cases.split(","):
            rows += bench_case(case, n, device, blocks, timer, warmup, iters)
        if not args.no_model_cast and "adamw" in args.cases.split(","):
            rows += bench_case("adamw", n, device, blocks, timer, warmup, iters, model_dtype=torch.bfloat16)
    dev_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (Triton interpreter)"
    print(f"device: {dev_name}; torch {torch.__version__}; median of {iters} after {warmup} warm-up")
    print_table(rows)
    if args.json:
        meta = {"device": dev_name, "torch": torch.__version__, "iters": iters, "warmup": warmup,
                "cpu_smoke": args.cpu_smoke, "check_failures": failures}
        try:
            import triton
            meta["triton"] = triton.__version__
        except ImportError:
            pass
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
