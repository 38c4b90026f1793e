#!/usr/bin/env python
"""A newcomer's first run: the README's quick-start command, cut short, and what it prints and writes.

The command is read from README.md (between the quickstart markers), so the two cannot drift. It
runs with ``--max-steps N`` in an empty directory (``launch/train.py`` made absolute, nothing else
changed), and the check expects what the README promises: metrics printed, ``runs/hift`` holding
the log, metrics.json and the final model in bf16, no checkpoint (none was asked for), no other
mode's directory, and a warning when N is shorter than one HiFT cycle.

    python .ci/first_run.py [--max-steps 3]
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEGIN, END = "<!-- quickstart:begin -->", "<!-- quickstart:end -->"


def quickstart_command(readme: str) -> list[str]:
    """The one command between the README's quickstart markers, as argv for this Python."""
    block = readme.split(BEGIN)[1].split(END)[0]
    lines = [line for line in block.splitlines() if line.strip() and not line.startswith("```")]
    if len(lines) != 1 or not lines[0].startswith("python launch/train.py"):
        raise SystemExit(f"expected one 'python launch/train.py ...' line in the README quick start, found {lines}")
    argv = shlex.split(lines[0])
    return [sys.executable, os.path.join(ROOT, "launch", "train.py"), *argv[2:]]


def check_outputs(cwd: str, stdout: str, stderr: str, steps: int, mode: str = "hift") -> list[str]:
    """Every way the run's output differs from what the README promises (empty: none)."""
    problems = []
    out = os.path.join(cwd, "runs", mode)
    final = os.path.join(out, "final")
    if "accuracy" not in stdout or "eval_loss" not in stdout:
        problems.append("the metrics table (eval_loss, accuracy before/after) was not printed")
    if f"final model (bfloat16): {os.path.join('runs', mode, 'final')}" not in stdout:
        problems.append("the path of the final model, saved in bf16, was not printed")
    try:
        with open(os.path.join(out, "metrics.json")) as f:
            metrics = json.load(f)
        if metrics.get("steps") != steps or "accuracy" not in metrics.get("after", {}):
            problems.append(f"metrics.json has steps={metrics.get('steps')} (expected {steps}) or no accuracy")
    except (OSError, ValueError) as e:
        problems.append(f"no readable {mode} metrics.json: {e}")
    try:
        with open(os.path.join(out, "train_log.jsonl")) as f:
            logged = sum(1 for _ in f)
        if logged != steps:
            problems.append(f"train_log.jsonl has {logged} steps, expected {steps}")
    except OSError as e:
        problems.append(f"no train_log.jsonl: {e}")
    try:
        with open(os.path.join(final, "config.json")) as f:
            dtype = json.load(f).get("dtype") or "unknown"
        if dtype != "bfloat16" or not os.path.isfile(os.path.join(final, "model.safetensors")):
            problems.append(f"the final model is not a bf16 safetensors save_pretrained (dtype {dtype})")
    except (OSError, ValueError) as e:
        problems.append(f"no final model config: {e}")
    if os.path.exists(os.path.join(out, "checkpoints")):
        problems.append("a checkpoint was written although --save-every was not given")
    others = sorted(set(os.listdir(os.path.join(cwd, "runs"))) - {mode}) if os.path.isdir(os.path.join(cwd, "runs")) \
        else []
    if others:
        problems.append(f"runs/ holds other directories than runs/{mode}: {others}")
    if "shorter than one cycle" not in stderr:
        problems.append(f"no warning that a {steps}-step run is shorter than one HiFT cycle")
    return problems


def main(argv: list[str] | None = None) -> int:
    """Run the quick start cut to --max-steps in a fresh directory and check it; 0 when all is as promised."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--max-steps", type=int, default=3, help="steps to run (fewer than one cycle of 8: warned)")
    args = p.parse_args(argv)
    with open(os.path.join(ROOT, "README.md")) as f:
        cmd = [*quickstart_command(f.read()), "--max-steps", str(args.max_steps), "--no-progress"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    with tempfile.TemporaryDirectory(prefix="first_run_") as cwd:
        print("+ (in an empty directory)", shlex.join(cmd), flush=True)
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
        print(proc.stdout[-2000:], flush=True)
        if proc.returncode != 0:
            print(proc.stderr[-4000:], file=sys.stderr)
            print(f"first run: the quick start exited {proc.returncode}", file=sys.stderr)
            return 1
        problems = check_outputs(cwd, proc.stdout, proc.stderr, args.max_steps)
    for problem in problems:
        print(f"first run: {problem}", file=sys.stderr)
    if not problems:
        print("first run: as the README says")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
