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
2. Final: each method at its best validation LR. The first seed's sweep model is evaluated
   on the test split; every further seed is trained again and evaluated on the test split.
   The table shows mean +- std over the seeds; the test split never picks anything.

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
import threading
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


def write_split(out: str, test_size: int, val_size: int, seed: int = 0) -> dict[str, str]:
    """The embedded instruction data split once into train / val / test JSONL files under ``out``."""
    from hift_ds.train import data as D
    from hift_ds.train.jobs import instruction_data

    records = D.read_jsonl(instruction_data())
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


def _bf16(config_path: str) -> bool:
    with open(config_path) as f:
        return bool(json.load(f).get("bf16", {}).get("enabled"))


def evaluate_saved(model_dir: str, data_path: str, max_length: int, batch_size: int, bf16: bool = False) -> dict:
    """Loss and perplexity of a saved final model on ``data_path``, encoded as launch/train.py encodes it."""
    import torch
    import transformers

    from hift_ds.train import data as D
    from hift_ds.train.evaluation import evaluate

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)  # in the dtype it was saved in
    if bf16:
        model.to(torch.bfloat16)  # as launch/train.py evaluates under a bf16 config
    ds = D.encode_instruction(D.read_jsonl(data_path), tok, max_length, data_path)
    return evaluate(model, torch.utils.data.DataLoader(ds, batch_size=batch_size), D.INSTRUCTION)


def _option(extra: list[str], name: str, default: int) -> int:
    return int(extra[extra.index(name) + 1]) if name in extra else default


def main(argv=None) -> list[dict]:
    """Sweep on the validation split, then the final runs on the test split; print and save the table."""
    args, extra = parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    lrs = parse_lrs(args.lrs)
    wanted = set((args.only or "fpft,bottom2up,top2down,random,badam").split(","))
    methods = [m for m in METHODS if (m[2] or m[1]) in wanted]
    missing = sorted({strategy or mode for _, mode, strategy in methods if strategy not in lrs and mode not in lrs})
    if missing:
        raise SystemExit(f"quality_llm.py: no --lrs for {missing}")
    split = write_split(args.out, args.test_size, args.val_size)
    common = ["--deepspeed", args.deepspeed, "--task", "instruction", "--samples", "0", *extra]
    threads = str(max(1, (os.cpu_count() or 1) // args.jobs))
    os.environ["OMP_NUM_THREADS"] = threads  # the runs share the cores instead of oversubscribing them

    def run(job):
        label, mode, strategy, seed, lr, evals, out = job
        done = os.path.join(out, "result.json")
        if os.path.isfile(done):  # finished by an earlier, interrupted invocation: not trained again
            with open(done) as f:
                return json.load(f)
        res = train_run(label, mode, strategy, seed, lr, out, [*common, "--data", split["train"], "--eval-data",
                                                               split[evals]])
        shutil.rmtree(os.path.join(out, "checkpoints"), ignore_errors=True)  # ~1.6 GB each, not needed here
        if "error" not in res:
            with open(done, "w") as f:
                json.dump(res, f)
        return res

    def jobs_for(phase: str, seed: int, chosen: dict | None) -> list[tuple]:
        # Round-robin over the methods (each one's first LR, then each one's second, ...): the
        # methods interleave in time, so a busy spell of the machine does not hit one method only.
        per_method = [[(label, mode, strategy, seed, lr, "val" if phase == "sweep" else "test",
                        os.path.join(args.out, phase, label.replace(" ", "_"), f"lr{lr:g}_seed{seed}"))
                       for lr in (lrs.get(strategy, lrs.get(mode)) if chosen is None else [chosen[label]])]
                      for label, mode, strategy in methods if chosen is None or label in chosen]
        return [jobs[i] for i in range(max(map(len, per_method), default=0)) for jobs in per_method
                if i < len(jobs)]

    import transformers  # noqa: F401 - imported here once: first imports racing in the pool's threads fail
    with ThreadPoolExecutor(args.jobs) as pool:
        sweep_jobs = jobs_for("sweep", seeds[0], None)
        sweep = list(pool.map(run, sweep_jobs))
        chosen, best_dirs = {}, {}
        for (label, *_, out), res in zip(sweep_jobs, sweep):
            if "error" in res:
                print(f"sweep {label} lr {res['lr']:g}: error: {res['error']}")
                continue
            print(f"sweep {label} lr {res['lr']:g}: val loss {res['after']['eval_loss']:.4f} "
                  f"({res['seconds']:.0f} s)", flush=True)
            if label not in chosen or res["after"]["eval_loss"] < best_dirs[label][1]["after"]["eval_loss"]:
                chosen[label], best_dirs[label] = res["lr"], (out, res)
        max_length, batch = _option(extra, "--max-length", 128), _option(extra, "--batch-size", 8)
        # The other seeds train (fpft, the longest, first) while the first seed's chosen models are
        # scored on the test split.
        final_runs = [pool.submit(run, j) for s in seeds[1:] for j in jobs_for("final", s, chosen)]
        lock = threading.Lock()  # from_pretrained is not thread-safe (global init/dtype state): one at a time

        def score(out: str) -> dict:
            with lock:
                return evaluate_saved(os.path.join(out, "final"), split["test"], max_length, batch)
        tests = {label: pool.submit(score, out) for label, (out, _) in best_dirs.items()}
        final = [f.result() for f in final_runs]
        before = next((r["before"] for r in final if "error" not in r), None)
        if before is None:  # no further seed ran: the untrained model on the test split, measured here
            from hift_ds.train.jobs import instruction_model
            before = evaluate_saved(instruction_model(), split["test"], max_length, batch,
                                    bf16=_bf16(args.deepspeed))
        runs = [{**res, "val_after": res["after"], "after": tests[label].result(), "before": before}
                for label, (_, res) in best_dirs.items()]
    runs += final
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
