"""Per-rank memory of HiFT at ZeRO stages 0-3, with and without offload, at 1, 2 and 4 ranks.

Each (stage, ranks, offload) runs in its own ``torchrun`` (DeepSpeed's backend: gloo on CPU, nccl
on GPUs): the same seeded LLaMA-shaped model, bf16, AdamW, a few HiFT steps. Every rank reports
``optimizer.memory_report()`` (bytes of weights, gradients, masters+state on the device and on
the host) and, from the profiler, its peak process RSS over the steps minus its RSS before the
model was built (and the allocator's peak on a GPU). The table divides by the parameter count P:
bytes per parameter per rank, next to what docs/architecture.md's formula predicts for the same P,
largest group G, active group A, N ranks and s offload slots:

    weights    stage 0: 2P   stage 1/2: 2P + 2G/N (scratch shard of the update)
               stage 3: 2P/N + 2 * (DeepSpeed's persistent small parameters, kept whole)
    gradients  stage 0: 2A (p.grad of the active group A, after backward; none after the step)
               stage 1-3: 2G + 2G/N     (one group's gradient buffer + this rank's shard)
    state      12P/N resident (12P at stage 0); with offload s * 12G/N on the device (s slots, N = 1 at
               stage 0) and 12P/N on the host

    python benchmarks/zero3_memory.py --json zero3_memory.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARK = "@@zero3-memory@@ "
# DeepSpeed's ZeRO-3 knobs for how much it keeps gathered; its defaults (1e9 live parameters and
# reuse distance, 5e7 prefetch) are sized for billions of parameters and gather all of a small model.
STAGE3_KNOBS = ("max_live_parameters", "max_reuse_distance", "prefetch_bucket_size")


def model_config(args: argparse.Namespace):
    import transformers
    return transformers.LlamaConfig(hidden_size=args.hidden, num_hidden_layers=args.layers,
                                    intermediate_size=args.intermediate, num_attention_heads=args.heads,
                                    num_key_value_heads=args.heads, vocab_size=args.vocab, max_position_embeddings=512)


def worker(args: argparse.Namespace) -> None:
    """One torchrun rank: build, train ``--steps`` HiFT steps, report memory (rank 0 prints every rank's)."""
    import deepspeed
    import psutil
    import torch
    import transformers

    import hift_ds
    from hift_ds.profile.presets import random_batch
    from hift_ds.profile import MemoryProfiler

    transformers.logging.set_verbosity_error()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    cfg = {"train_micro_batch_size_per_gpu": args.batch, "gradient_clipping": 1.0, "bf16": {"enabled": True},
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.01}},
           "zero_optimization": {"stage": args.stage, **{f"stage3_{k}": getattr(args, k) for k in STAGE3_KNOBS
                                                         if getattr(args, k) is not None}},
           "hift": {"offload": {"device": args.offload, "slots": args.slots}, "kernel": "auto"}}
    hift_ds.deepspeed.engine.single_process_env()
    deepspeed.init_distributed()
    rss_before = psutil.Process().memory_info().rss
    torch.manual_seed(0)
    # Built in bf16 from the start; at stage 3 inside zero.Init, so no rank ever holds the whole model.
    config, model_class = model_config(args), transformers.LlamaForCausalLM  # imported outside zero.Init
    torch.set_default_dtype(torch.bfloat16)
    with deepspeed.zero.Init(config_dict_or_path=cfg, enabled=args.stage == 3):
        model = model_class(config)
    torch.set_default_dtype(torch.float32)
    params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    engine, optimizer, _, _ = hift_ds.initialize(model=model, config=cfg)
    prof = MemoryProfiler(interval_ms=20, optimizer=optimizer)
    prof.start()
    for s in range(args.steps):
        ids = random_batch(args.vocab, args.batch, args.seq, step=s * world + rank, device=engine.device)
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        report = optimizer.memory_report()  # after backward: the active group's gradients exist on every path
        active = sum(getattr(p, "ds_numel", p.numel()) for p in optimizer._params[optimizer.active_group])
        engine.step()
    prof.stop()
    groups = [sum(getattr(p, "ds_numel", p.numel()) for p in ps) for ps in optimizer._params]
    fetcher = getattr(optimizer.sharding, "fetcher", None)  # ZeRO-3: DeepSpeed keeps its persistent parameters whole
    persistent = sum(p.ds_numel for p in fetcher.persistent_parameters) if fetcher is not None else 0
    peak = prof.summary()["peak"]
    row = {"rank": rank, "world": world, "stage": args.stage, "offload": args.offload, "slots": args.slots,
           "params": params, "largest_group": max(groups), "active_group": active, "groups": len(groups),
           "persistent": persistent, "memory": report, "rss_delta": peak["rss"] - rss_before,
           "peak_allocated": peak["allocated"], "device": str(engine.device)}
    rows = [None] * world
    torch.distributed.all_gather_object(rows, row)
    if rank == 0:
        print(MARK + json.dumps(rows), flush=True)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def predict(stage: int, offload: str, n: int, p: int, g: int, persistent: int = 0, active: int = 0,
            slots: int = 2) -> dict[str, float]:
    """docs/architecture.md's bytes per rank (bf16 weights and gradients, AdamW: 12 bytes of state per parameter)."""
    # stage 1/2: + the scratch shard of the update; 3: + DeepSpeed's persistent parameters, kept whole
    weights = {0: 2 * p, 3: 2 * p / n + 2 * persistent}.get(stage, 2 * p + 2 * g / n)
    # stage 0 (torch path): the .grad tensors of the group that is active now; 1-3: buffers sized for the largest
    grads = 2 * (active or g) if stage == 0 else 2 * g + 2 * g / n
    shard = 1 if stage == 0 else n
    state = 12 * (slots * g if offload == "cpu" else p) / shard
    return {"model_weights": weights, "gradients": grads, "state_device": state,
            "state_host": 12 * p / shard if offload == "cpu" else 0.0}


def run(args: argparse.Namespace, stage: int, world: int, offload: str) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_port",
           str(args.port), os.path.abspath(__file__), "--worker", "--stage", str(stage), "--offload", offload,
           *[f"--{k}={getattr(args, k)}" for k in ("hidden", "layers", "intermediate", "heads", "vocab", "batch",
                                                   "seq", "steps", "slots")],
           *[f"--{k.replace('_', '-')}={getattr(args, k)}" for k in STAGE3_KNOBS if getattr(args, k) is not None]]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARK)]
    if proc.returncode or not lines:
        raise RuntimeError(f"stage {stage}, {world} ranks, offload {offload} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len(MARK):])


def table(rows: list[dict]) -> str:
    out = ["| stage | ranks | offload | weights B/param (pred.) | gradients B/param (pred.) | "
           "state on device B/param (pred.) | state on host B/param (pred.) | RSS growth MiB, rank 0 |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m, p = r["memory"], r["params"]
        pred = predict(r["stage"], r["offload"], r["world"], p, r["largest_group"], r.get("persistent", 0),
                       r.get("active_group", 0), r.get("slots", 1))
        host = m["state_host_pinned"] + m["state_host_pageable"]
        cells = [f"{m[k] / p:.3f} ({pred[k] / p:.3f})" for k in ("model_weights", "gradients", "state_device")]
        cells.append(f"{host / p:.3f} ({pred['state_host'] / p:.3f})")
        out.append(f"| {r['stage']} | {r['world']} | {r['offload']} | " + " | ".join(cells)
                   + f" | {r['rss_delta'] / 2 ** 20:.0f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--stage", type=int, default=3)
    ap.add_argument("--offload", default="none")
    ap.add_argument("--runs", default="0:1,2:2,2:4,3:1,3:2,3:4", help="stage:ranks pairs to run")
    ap.add_argument("--offloads", default="none,cpu")
    ap.add_argument("--slots", type=int, default=2, help="hift.offload.slots: device slots of the offloaded store")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--intermediate", type=int, default=1408)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3)
    for knob in STAGE3_KNOBS:
        ap.add_argument(f"--{knob.replace('_', '-')}", dest=knob, type=int, default=None,
                        help=f"zero_optimization.stage3_{knob} (default: DeepSpeed's)")
    ap.add_argument("--port", type=int, default=29561)
    ap.add_argument("--json", default=None, help="write every rank's figures here")
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return
    rows, every = [], []
    for pair in args.runs.split(","):
        stage, world = (int(x) for x in pair.split(":"))
        for offload in args.offloads.split(","):
            ranks = run(args, stage, world, offload)
            every.extend(ranks)
            rows.append(ranks[0])
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    print(table(rows))
    if args.json:
        with tempfile.NamedTemporaryFile("w", dir=os.path.dirname(os.path.abspath(args.json)), delete=False) as f:
            json.dump({"args": vars(args), "ranks": every}, f, indent=2)
        os.replace(f.name, args.json)


if __name__ == "__main__":
    main()
