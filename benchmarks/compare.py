"""Full fine-tuning vs DeepSpeed ZeRO-2 (+offload) vs BAdam vs torchao's CPU offload vs hift-ds, side by side.

    python benchmarks/compare.py --model llama-1b                       # every mode, 4x512, 20 steps
    python benchmarks/compare.py --model llama-7b --modes fpft,hift-offload,hift-offload-triton
    python benchmarks/compare.py --model tiny --steps 2 --warmup 0 --batch-size 2 --seq-len 32   # CPU check

Every mode runs in its own process on the same model (preset or HF name/path, same seed) and the
same batches; one table (median step ms and its ratio to fpft, tokens/s, peak allocated/reserved
GPU memory and their ratios, pinned host memory, the loss after the last step, note or error)
and ``compare.json``. Modes are the set-ups of ``hift_ds.profile.setups`` (described there); one that cannot
run here (no CUDA, package missing, out of memory) gets a row saying why and the others still run.
badam switches block every step (the same cadence as HiFT), badam-50 at its documented default of
50 steps; both discard a block's optimizer state when they switch away from it. torchao-offload runs
AdamW on the CPU in the weights' dtype (no fp32 masters). Timing: see benchmarks/harness.py.
"""
from __future__ import annotations

import sys

import harness

DEFAULT_MODES = ("fpft,ds-zero2,ds-zero2-offload,badam,badam-50,torchao-offload,torchao-offload-grads,hift,"
                 "hift-offload,hift-offload-triton")


def main(argv: list[str] | None = None) -> int:
    """Run the comparison; returns the exit status."""
    ap = harness.make_parser(__doc__, __file__, json="compare.json")
    ap.add_argument("--modes", default=DEFAULT_MODES, help=f"comma-separated, from: {', '.join(harness.MODES)}")
    args = ap.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in harness.MODES]
    if unknown:
        ap.error(f"unknown mode(s) {unknown}; choose from {', '.join(harness.MODES)}")
    print(f"compare on {harness.device_name()}: {', '.join(modes)}", flush=True)
    rows = harness.run_modes_in_subprocesses(modes, args)
    print()
    print(harness.format_table(rows, baseline="fpft"))
    if args.json:
        harness.write_json(args.json, {"meta": harness.meta(args), "rows": rows})
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
