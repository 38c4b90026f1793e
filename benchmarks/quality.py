#!/usr/bin/env python
"""HiFT vs full fine-tuning on the same real model and data: eval metrics side by side.

Runs launch/train.py once per mode (fpft, then HiFT with each strategy) and seed, same data and
epochs, each in its own process, and prints one table (mean +- std over the seeds) with the
untrained baseline. The peak LR is ``--lr`` for every run unless ``--hift-lr`` gives HiFT its own
(each group is updated on only 1/k of the steps, so its best LR is often higher); the table shows
the LR of each row. Target (issue 7): every HiFT strategy within 1 accuracy point (or 2% eval
loss) of fpft, on the means.

    python benchmarks/quality.py                      # embedded default model + data (CPU, minutes)
    python benchmarks/quality.py --model M --data D --epochs 3 --lr 2e-5 --hift-lr 1e-4 --seeds 1,2,3
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# launch/train.py options this script sets itself for each run (from its own --deepspeed, --lr/--hift-lr, --seeds).
SET_PER_RUN = ("--mode", "--strategy", "--seed", "--output-dir", "--overwrite-output-dir", "--deepspeed", "--lr",
               "--no-progress")
RUNS = [("fpft", "fpft", None), ("hift bottom2up", "hift", "bottom2up"), ("hift top2down", "hift", "top2down"),
        ("hift random", "hift", "random")]


def passed_through() -> list[str]:
    """The launch/train.py options that go to every run unchanged: all but those set per run."""
    from hift_ds.train import build_parser

    return [max(a.option_strings, key=len) for a in build_parser()._actions
            if a.option_strings and a.help != argparse.SUPPRESS and not isinstance(a, argparse._HelpAction)
            and max(a.option_strings, key=len) not in SET_PER_RUN]


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options; launch/train.py's own options are passed to every run unchanged."""
    epilog = (f"Options of launch/train.py passed on to every run unchanged: {', '.join(passed_through())} (see "
              f"python launch/train.py --help). Set per run by this script: {', '.join(SET_PER_RUN)}.")
    # Wrapped here, not by argparse, which would split option names at their hyphens.
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=textwrap.fill(epilog, width=100, break_on_hyphens=False))
    p.add_argument("--out", default="runs/quality", help="one sub-directory per run, plus quality.json")
    p.add_argument("--deepspeed", default=os.path.join(ROOT, "ds_configs", "hift_fp32.json"),
                   help="config for every run (its hift block is dropped for fpft)")
    p.add_argument("--only", default=None, help="comma-separated subset of: fpft,bottom2up,top2down,random")
    p.add_argument("--lr", type=float, default=None, help="peak LR of every run (default: the config's)")
    p.add_argument("--hift-lr", type=float, default=None, help="peak LR of the HiFT runs (default: --lr)")
    p.add_argument("--seeds", default="42", help="comma-separated seeds (data split, order, init); the table "
                   "shows mean +- std over them, since one seed on a small eval set is noisy")
    return p.parse_known_args(argv)


def _without(args: list[str], flags: tuple[str, ...]) -> list[str]:
    """``args`` less the options ``flags`` and their values ("--flag value" or "--flag=value")."""
    out, skip = [], False
    for a in args:
        if skip or a.split("=", 1)[0] in flags:
            skip = a in flags  # its value comes next
            continue
        out.append(a)
    return out


def run_args(mode: str, out: str, train_args: list[str]) -> list[str]:
    """launch/train.py's options for a benchmark's run of ``mode`` into ``out``, trained from the start whatever ``out``
    holds, with ``train_args`` (less HiFT's own options for another mode, which launch/train.py refuses)."""
    from hift_ds.train.cli import HIFT_ONLY

    if mode != "hift":  # options shared by every run of a benchmark (after its --) that apply to HiFT's alone
        train_args = _without(train_args, HIFT_ONLY)
    # --overwrite-output-dir: a benchmark runs a run again only to train it again from the start (a previous
    # attempt's files are replaced, never resumed).
    return ["--mode", mode, "--output-dir", out, "--overwrite-output-dir", *train_args]


def train_run(label: str, mode: str, strategy: str | None, seed: int, lr: float | None, out: str,
              train_args: list[str]) -> dict:
    """launch/train.py once in a subprocess (output under ``out``); its metrics.json plus the wall time, or the error."""
    cmd = [sys.executable, os.path.join(ROOT, "launch", "train.py"),
           *run_args(mode, out, ["--no-progress", "--seed", str(seed), *train_args])]
    if strategy:
        cmd += ["--strategy", strategy]
    if lr is not None:
        cmd += ["--lr", str(lr)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "train.log"), "w") as f:  # the run's own log, for reading afterwards
        f.write(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        return {"label": label, "seed": seed, "lr": lr, "error": (proc.stderr or proc.stdout).strip().splitlines()[-1]}
    with open(os.path.join(out, "metrics.json")) as f:
        return {"label": label, "seed": seed, **json.load(f), "lr": lr, "seconds": time.time() - t0}


def run_one(label: str, mode: str, strategy: str | None, seed: int, args, extra: list[str]) -> dict:
    """Train one configuration with one seed in a subprocess; its metrics.json plus the wall time."""
    out = os.path.join(args.out, label.replace(" ", "_"), f"seed{seed}")
    lr = (args.hift_lr or args.lr) if mode == "hift" else args.lr
    return train_run(label, mode, strategy, seed, lr, out, ["--deepspeed", args.deepspeed, *extra])


def aggregate(runs: list[dict]) -> list[dict]:
    """One row per configuration: mean and sample std over its seeds of every before/after metric."""
    rows = []
    for label in dict.fromkeys(r["label"] for r in runs):
        mine = [r for r in runs if r["label"] == label]
        ok = [r for r in mine if "error" not in r]
        if not ok:
            rows.append({"label": label, "error": mine[0]["error"]})
            continue
        row = {"label": label, "lr": ok[0]["lr"], "seeds": [r["seed"] for r in ok],
               "seconds": statistics.fmean(r["seconds"] for r in ok)}
        for when in ("before", "after"):
            row[when] = {k: statistics.fmean(r[when][k] for r in ok) for k in ok[0][when]}
            row[when + "_std"] = {k: statistics.stdev(r[when][k] for r in ok) if len(ok) > 1 else 0.0
                                  for k in ok[0][when]}
        if len(ok) < len(mine):
            row["failed_seeds"] = [r["seed"] for r in mine if "error" in r]
        rows.append(row)
    return rows


def headline(row: dict) -> str:
    """The metric a table leads with: accuracy (classification), perplexity (causal LM), else eval loss."""
    return next(k for k in ("accuracy", "perplexity", "eval_loss") if k in row["after"])


def verdict(row: dict, ref: dict) -> str:
    """PASS when within 1 accuracy point (classification) or 2% perplexity / eval loss of fpft (means over seeds)."""
    metric = headline(row)
    if metric == "accuracy":
        return "PASS" if row["after"]["accuracy"] >= ref["after"]["accuracy"] - 0.01 else "FAIL"
    return "PASS" if row["after"][metric] <= ref["after"][metric] * 1.02 else "FAIL"


def format_table(rows: list[dict]) -> str:
    """The side-by-side table: mean +- std over seeds, delta and verdict against fpft."""
    ok = [r for r in rows if "error" not in r]
    ref = next((r for r in ok if r["label"] == "fpft"), None)
    metric = headline(ok[0]) if ok else "eval_loss"
    lines = [f"{'run':<16}{'lr':>9}{'seeds':>6}{metric:>17}{'eval_loss':>11}{'vs fpft':>9}{'seconds':>9}  target"]
    if ok:
        before = ok[0]
        lines.append(f"{'untrained':<16}{'':>9}{len(before['seeds']):>6}{before['before'][metric]:>10.4f} "
                     f"+-{before['before_std'][metric]:.3f}{before['before']['eval_loss']:>11.4f}")
    for r in rows:
        if "error" in r:
            lines.append(f"{r['label']:<16}  error: {r['error']}")
            continue
        delta = "-"  # no fpft run (--only)
        if ref:  # accuracy: difference in points; loss/perplexity: relative to fpft
            delta = (f"{r['after'][metric] - ref['after'][metric]:+.4f}" if metric == "accuracy"
                     else f"{100 * (r['after'][metric] / ref['after'][metric] - 1):+.2f}%")
        target = verdict(r, ref) if ref and r is not ref else ""
        lr = "config" if r["lr"] is None else f"{r['lr']:g}"
        lines.append(f"{r['label']:<16}{lr:>9}{len(r['seeds']):>6}{r['after'][metric]:>10.4f} "
                     f"+-{r['after_std'][metric]:.3f}{r['after']['eval_loss']:>11.4f}{delta:>9}"
                     f"{r['seconds']:>9.1f}  {target}")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    """Run every configuration for every seed and print the table."""
    args, extra = parse_args(argv)
    if "--seed" in extra or any(a.startswith("--seed=") for a in extra):
        raise SystemExit("quality.py: use --seeds (a comma-separated list), not --seed")
    allowed = passed_through()
    unknown = [a for a in extra if a.startswith("--") and a.split("=")[0] not in allowed]
    if unknown:
        raise SystemExit(f"quality.py: {', '.join(unknown)} is neither an option of quality.py nor one of "
                         f"launch/train.py's that it passes on ({', '.join(allowed)})")
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        raise SystemExit(f"quality.py: --seeds must be comma-separated integers, got {args.seeds!r}") from None
    wanted = set((args.only or "fpft,bottom2up,top2down,random").split(","))
    unknown = wanted - {strat or mode for _, mode, strat in RUNS}
    if unknown:
        raise SystemExit(f"quality.py: --only has unknown runs {sorted(unknown)}; choose from "
                         "fpft,bottom2up,top2down,random")
    runs = [run_one(label, mode, strat, seed, args, extra) for label, mode, strat in RUNS
            if (strat or mode) in wanted for seed in seeds]
    rows = aggregate(runs)
    print("\n" + format_table(rows))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "quality.json"), "w") as f:
        json.dump({"runs": runs, "rows": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
