#!/usr/bin/env python
"""HiFT vs full fine-tuning vs BAdam on a causal LM with instruction data: held-out loss and perplexity.

The embedded instruction job of launch/train.py (SmolLM2-135M-Instruct, dequantised from a
Q4_1 GGUF, so its weights carry 4-bit quantisation noise; English chatterbot corpus) is split
once, with a fixed seed, into test (held out), validation (carved from the training part) and
train. Every run trains on the same train file for the same number of optimizer steps and
micro-batch size (same token budget), in its own launch/train.py process.

1. Sweep: each method (fpft, HiFT bottom2up / top2down / random, BAdam) at each of its
   candidate peak LRs, first seed, judged on the validation split only.
   A finished run (its result.json) is not trained again, so an interrupted study resumes.
2. Final: each method at its best validation LR, every further seed trained again. Every run
   scores itself on both splits in its own process (launch/train.py --test-data); the table
   shows the test split, mean +- std over the seeds; the test split never picks anything. A run
   whose untrained model scores like a uniform guess (its weights did not load) stops the study.

    python benchmarks/quality_llm.py --out runs/qllm --seeds 42,1 --jobs 2 \\
        --lrs fpft=5e-5,2e-4 hift=2e-4,6e-4 badam=5e-5,2e-4 -- --max-steps 24 --batch-size 4 --max-length 64
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from quality import ROOT, aggregate, format_table, train_run  # noqa: E402

METHODS = [("fpft", "fpft", None), ("hift bottom2up", "hift", "bottom2up"), ("hift top2down", "hift", "top2down"),
           ("hift random", "hift", "random"), ("badam", "badam", None)]


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    """Options; everything after ``--`` goes to every launch/train.py run unchanged."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/quality_llm", help="split files, one directory per run, quality_llm.json")
    p.add_argument("--deepspeed", default=os.path.join(ROOT, "ds_configs", "hift.json"),
                   help="config of every run (its hift block is dropped for fpft and BAdam)")
    p.add_argument("--lrs", nargs="+", default=["fpft=5e-5,2e-4", "hift=2e-4,6e-4", "badam=5e-5,2e-4"],
                   help="candidate peak LRs per mode (hift: every strategy, unless a strategy has its own "
                   "entry such as top2down=3e-4), as mode=lr,lr,...")
    p.add_argument("--seeds", default="42,1", help="comma-separated seeds; the first one also runs the sweep")
    p.add_argument("--only", default=None, help="comma-separated subset of: fpft,bottom2up,top2down,random,badam")
    p.add_argument("--test-size", type=int, default=64, help="held-out test records")
    p.add_argument("--val-size", type=int, default=32, help="validation records carved from the training part")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (each with OMP_NUM_THREADS=cores/jobs)")
    return p.parse_args(argv), extra


def parse_lrs(specs: list[str]) -> dict[str, list[float]]:
    """{"fpft": [5e-5, 2e-4], ...} from ["fpft=5e-5,2e-4", ...]."""
    out = {}
    for spec in specs:
        mode, _, values = spec.partition("=")
        try:
            out[mode] = [float(v) for v in values.split(",")]
        except ValueError:
            raise SystemExit(f"quality_llm.py: --lrs entries look like fpft=5e-5,2e-4; got {spec!r}") from None
    return out


def write_split(out: str, test_size: int, val_size: int, seed: int = 0, source: str | None = None) -> dict[str, str]:
    """Records (the embedded instruction data unless ``source``) split once into train / val / test JSONL files under ``out``."""
    from hift_ds.train import data as D
    from hift_ds.train.jobs import instruction_data

    records = D.read_jsonl(source or instruction_data())
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    parts = {"test": order[:test_size], "val": order[test_size:test_size + val_size],
             "train": order[test_size + val_size:]}
    os.makedirs(out, exist_ok=True)
    paths = {}
    for name, idx in parts.items():
        paths[name] = os.path.join(out, f"{name}.jsonl")
        with open(paths[name], "w", encoding="utf-8") as f:
            f.writelines(json.dumps(records[i]) + "\n" for i in idx)
    return paths


def checked(res: dict) -> dict:
    """A run's result, with its held-out scores checked: a model that did not load stops the study."""
    from hift_ds.train.evaluation import load_failure

    if "error" in res:
        if "--check-pretrained" in res["error"]:  # launch/train.py refused the untrained model's scores
            raise SystemExit(f"quality_llm.py: {res['label']} lr {res['lr']:g} seed {res['seed']}: {res['error']}")
        return res
    for name in ("before", "test_before"):
        why = load_failure(res[name], res.get("vocab_size"))
        if why:
            raise SystemExit(f"quality_llm.py: {res['label']} lr {res['lr']:g} seed {res['seed']}: the untrained "
                             f"model scores as if its weights did not load: {why}")
    why = load_failure(res["after"], res.get("vocab_size"))
    return {**res, "error": f"diverged: {why}"} if why else res


def main(argv=None) -> list[dict]:
    """Sweep on the validation split, then the further seeds; print and save the test-split table."""
    args, extra = parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    lrs = parse_lrs(args.lrs)
    wanted = set((args.only or "fpft,bottom2up,top2down,random,badam").split(","))
    methods = [m for m in METHODS if (m[2] or m[1]) in wanted]
    missing = sorted({strategy or mode for _, mode, strategy in methods if strategy not in lrs and mode not in lrs})
    if missing:
        raise SystemExit(f"quality_llm.py: no --lrs for {missing}")
    split = write_split(args.out, args.test_size, args.val_size)
    # Every run scores itself, in its own process, on both held-out splits (validation picks the LR,
    # test is reported): no model is loaded again here, and --check-pretrained stops a run whose
    # untrained model did not load (a uniform guess scores perplexity = vocabulary size).
    common = ["--deepspeed", args.deepspeed, "--task", "instruction", "--samples", "0", "--data", split["train"],
              "--eval-data", split["val"], "--test-data", split["test"], "--check-pretrained", *extra]
    threads = str(max(1, (os.cpu_count() or 1) // args.jobs))
    os.environ["OMP_NUM_THREADS"] = threads  # the runs share the cores instead of oversubscribing them

    def run(job):
        label, mode, strategy, seed, lr, out = job
        done = os.path.join(out, "result.json")
        if os.path.isfile(done):  # finished by an earlier, interrupted invocation: not trained again
            with open(done) as f:
                res = json.load(f)
            if "test_after" in res:  # else written before runs scored the test split themselves: run again
                return checked(res)
        res = checked(train_run(label, mode, strategy, seed, lr, out, common))
        shutil.rmtree(os.path.join(out, "checkpoints"), ignore_errors=True)  # ~1.6 GB each, not needed here
        if "error" not in res:
            with open(done, "w") as f:
                json.dump(res, f)
        return res

    def jobs_for(phase: str, seed: int, chosen: dict | None) -> list[tuple]:
        # Round-robin over the methods (each one's first LR, then each one's second, ...): the
        # methods interleave in time, so a busy spell of the machine does not hit one method only.
        per_method = [[(label, mode, strategy, seed, lr,
                        os.path.join(args.out, phase, label.replace(" ", "_"), f"lr{lr:g}_seed{seed}"))
                       for lr in (lrs.get(strategy, lrs.get(mode)) if chosen is None else [chosen[label]])]
                      for label, mode, strategy in methods if chosen is None or label in chosen]
        return [jobs[i] for i in range(max(map(len, per_method), default=0)) for jobs in per_method
                if i < len(jobs)]

    # The threads only wait on training processes; nothing is loaded or scored in them.
    with ThreadPoolExecutor(args.jobs) as pool:
        sweep = list(pool.map(run, jobs_for("sweep", seeds[0], None)))
        chosen, best = {}, {}
        for res in sweep:
            if "error" in res:
                print(f"sweep {res['label']} lr {res['lr']:g}: error: {res['error']}")
                continue
            print(f"sweep {res['label']} lr {res['lr']:g}: val loss {res['after']['eval_loss']:.4f} "
                  f"({res['seconds']:.0f} s)", flush=True)
            if res["label"] not in best or res["after"]["eval_loss"] < best[res["label"]]["after"]["eval_loss"]:
                chosen[res["label"]], best[res["label"]] = res["lr"], res
        final = list(pool.map(run, [j for s in seeds[1:] for j in jobs_for("final", s, chosen)]))
    # The table reports the test split; the validation scores that chose the LR stay as val_after.
    runs = [{**res, "val_after": res["after"], "after": res["test_after"], "before": res["test_before"]}
            if "error" not in res else res for res in [*best.values(), *final]]
    label_order = [m[0] for m in methods]
    runs.sort(key=lambda r: (label_order.index(r["label"]), seeds.index(r["seed"])))
    rows = aggregate(runs)
    print("\n" + format_table(rows))
    with open(os.path.join(args.out, "quality_llm.json"), "w") as f:
        json.dump({"split": {k: sum(1 for _ in open(v)) for k, v in split.items()}, "lrs": lrs, "chosen": chosen,
                   "sweep": sweep, "runs": runs, "rows": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
