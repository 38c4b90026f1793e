"""A stand-in for launch/train.py in tests/test_llm_study.py: writes what a run writes, from a formula, in no time.

Validation perplexity = BASE x (1 + 0.05 log2(lr / BEST_LR)^2), falling with the epochs; every
start is appended to starts.log next to the study's split directory. FAKE_FAIL=<text> makes a run
whose output directory contains <text> exit 1; FAKE_HANG=<text> makes it sleep for 10 minutes;
FAKE_UNLOADED=<text> makes it score a uniform guess.
"""
import argparse
import json
import math
import os
import sys

VOCAB = 1000
BASE = {"fpft": 8.0, "hift/bottom2up": 9.0, "hift/top2down": 9.5, "hift/random": 9.2, "hift/shuffled": 9.3, "badam": 11.0}
BEST_LR = {"fpft": 3e-5, "hift/bottom2up": 1e-3, "hift/top2down": 1e-2, "hift/random": 3e-4, "hift/shuffled": 3e-4,
           "badam": 3e-4}


def main() -> None:
    p = argparse.ArgumentParser()
    for opt in ("--mode", "--strategy", "--output-dir", "--data", "--deepspeed", "--group-size"):
        p.add_argument(opt)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--epochs", type=float)
    p.add_argument("--eval-every-epochs", type=float, default=0.0)
    args, _ = p.parse_known_args()
    out = args.output_dir
    study = os.path.dirname(os.path.dirname(os.path.dirname(out)))
    with open(os.path.join(study, "starts.log"), "a") as f:
        f.write(out + "\n")
    if os.environ.get("FAKE_HANG") and os.environ["FAKE_HANG"] in out:
        import time
        time.sleep(600)
    if os.environ.get("FAKE_FAIL") and os.environ["FAKE_FAIL"] in out:
        print("Traceback: boom", file=sys.stderr)
        sys.exit(1)
    method = args.mode + (f"/{args.strategy}" if args.strategy else "")
    spe = 10
    steps = int(args.epochs * spe)
    unloaded = bool(os.environ.get("FAKE_UNLOADED")) and os.environ["FAKE_UNLOADED"] in out

    def ppl(step: int, split: str) -> float:
        if unloaded:
            return float(VOCAB)
        if step == 0:
            return 40.0
        final = BASE[method] * (1 + 0.05 * math.log2(args.lr / BEST_LR[method]) ** 2) * (1 + 0.01 * (args.seed % 3))
        if args.group_size == "1":
            final *= 1.2
        final *= 1 - 0.1 * (args.epochs - 1)  # longer training ends lower
        return (final * (1.3 - 0.3 * min(1.0, step / steps))) + (0.3 if split == "test" else 0.0)

    def scores(step: int) -> dict:
        return {name: {"eval_loss": math.log(ppl(step, name)), "perplexity": ppl(step, name)}
                for name in ("eval", "test")}
    points = [0] + sorted({round(j * args.eval_every_epochs * spe) for j in range(1, 100)
                           if args.eval_every_epochs and round(j * args.eval_every_epochs * spe) < steps} | {steps})
    os.makedirs(out, exist_ok=True)
    if args.eval_every_epochs:
        with open(os.path.join(out, "eval_log.jsonl"), "w") as f:
            for s in points:
                f.write(json.dumps({"step": s, "epoch": s / spe, "train_seconds": 0.5 * s, "wall_seconds": 0.6 * s,
                                    **scores(s)}) + "\n")
    with open(os.path.join(out, "train_log.jsonl"), "w") as f:
        for s in range(1, steps + 1):
            group = (s - 1) % 4 if args.mode == "hift" else ((s - 1) // 6 if args.mode == "badam" else None)
            f.write(json.dumps({"step": s, "loss": 1.0, "lr": args.lr, "group": group}) + "\n")
    before, after = scores(0), scores(steps)
    metrics = {"mode": args.mode, "lr": args.lr, "steps": steps, "before": before["eval"], "after": after["eval"],
               "test_before": before["test"], "test_after": after["test"], "samples": [], "steps_per_epoch": spe,
               "train_seconds": 0.5 * steps, "eval_seconds": 0.1 * len(points), "vocab_size": VOCAB}
    if args.mode == "badam":
        metrics["badam_switch_every"] = 6
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(metrics, f)


if __name__ == "__main__":
    main()
