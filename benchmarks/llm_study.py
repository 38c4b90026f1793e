#!/usr/bin/env python
"""Issue 28's study: HiFT vs full fine-tuning vs BAdam on a real chat LLM at 1-2 epochs, resumable, in one command.

    python benchmarks/llm_study.py --out runs/llm_study            # run the study, or resume it
    python benchmarks/llm_study.py --out runs/llm_study --plan     # the plan and the time estimate, no training
    python benchmarks/llm_study.py --out runs/llm_study --report   # report.md / study.json / curves.png now

The embedded instruction job (SmolLM2-135M-Instruct, chatterbot records) split once with a fixed
seed into test / validation / train (48 / 24 / rest, as quality_llm.py); micro-batch 4 x 64
tokens, no accumulation: the same tokens per step for every method, and the same data order for
a given seed (launch/train.py's sampler is seeded by --seed alone).

a. LR grid (1 epoch, first seed), chosen on validation perplexity: fpft, HiFT bottom2up /
   top2down / random (4 groups of 8 units), BAdam (its own switch rule). A grid whose best LR is
   at an edge grows one step (x2) outward, until the best is bracketed or MAX_EXTENSIONS.
b. Curves: each method at its chosen LR for 2 epochs, every seed, validation and test
   perplexity every quarter epoch, with training and wall seconds.
c. Ablations (ABLATIONS, 1 epoch, first seed, HiFT random at its chosen LR): group count,
   the LR schedule's length in cycles, weight decay, the official HiFT code's unit order ("shuffled").
d. The report (llm_study_report.py), rewritten after every run, so it can be read mid-study.

The design (methods, grids, ablations, the plan) is in llm_study_plan.py; running the runs, under the
lock below, in llm_study_runner.py.

Each run is one launch/train.py process in out/<phase>/<method>/<run>/; a run is finished when
its result.json exists, and is then never run again; an unfinished one is deleted and started
over (with --overwrite-output-dir; no run is resumed). --jobs 2 (the default) keeps two runs
going with one thread each: on the 2-core machine that trains 1.4x faster than one run with two
threads (measured, see llm_study_report.py).
Runs hold the machine's heavy-job lock (/tmp/heavy.lock, the `heavy` command's; HIFT_STUDY_LOCK=
none or another path) from start to end: while another process waits for the lock, no new run
starts, and once the runs in flight end the lock goes to it, so other heavy jobs run between
runs, never during one. Do not start the study itself under `heavy` (it would hold the lock for
hours; it notices and says so). A run whose untrained model scores like a model that did not
load (train.py --check-pretrained), or that is refused as bad input, stops the study; a run that
crashes otherwise is reported and retried by the next invocation.
"""

import argparse
import dataclasses
import fcntl
import json
import math
import os
import signal
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)
import llm_study_report as report  # noqa: E402
from llm_study_plan import ABLATIONS, BY_LABEL, METHODS, Run, Study, plan  # noqa: E402
from llm_study_runner import DEFAULT_LOCK, BadInput, Runner  # noqa: E402

LOCK_ENV = "HIFT_STUDY_LOCK"


# ---- the study --------------------------------------------------------------------------------
def load_results(out: str) -> dict:
    """{run key: result} of every finished run under ``out``."""
    results = {}
    for dirpath, _, files in os.walk(out):
        if "result.json" in files:
            with open(os.path.join(dirpath, "result.json")) as f:
                result = json.load(f)
            results[result["key"]] = result
    return results


def make_split(study: Study, out: str, source: str | None) -> dict:
    """The study's train / val / test files under out/split (quality_llm.py's split, the same records)."""
    import quality_llm

    paths = quality_llm.write_split(os.path.join(out, "split"), study.test_size, study.val_size, study.split_seed,
                                    source)
    if study.train_size:
        with open(paths["train"]) as f:
            lines = f.readlines()[:study.train_size]
        with open(paths["train"], "w") as f:
            f.writelines(lines)
    return paths


def estimate(study: Study, runs: list[Run], results: dict, jobs: int) -> float:
    """Seconds the given runs will take, from the finished runs' times (else the measured defaults)."""
    rates = report.rates(results, study)
    total = sum(report.run_seconds(run, study, rates) for run in runs)
    return total * rates["parallel_slowdown"].get(str(jobs), 1.0) / jobs


def check_settings(out: str, study: Study, force: bool) -> None:
    """Save the settings with a new study; a resumed one must have the same, or its runs would not compare."""
    path = os.path.join(out, "settings.json")
    if os.path.isfile(path) and not force:
        with open(path) as f:
            saved = json.load(f)
        differ = sorted(k for k in set(saved) | set(study.settings()) if saved.get(k) != study.settings().get(k))
        if differ:
            raise SystemExit(f"llm_study.py: {out} holds a study with other settings ({', '.join(differ)}: "
                             f"{ {k: saved.get(k) for k in differ} }); use another --out, or --force to go on")
    os.makedirs(out, exist_ok=True)
    report.write_json(path, study.settings())


def _option(args: tuple[str, ...], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args[:-1] else None


def context_for(study: Study, results: dict) -> dict:
    """What a run's generated config needs: the base config, its optimizer steps and its group count."""
    from hift_ds.config import load_ds_config

    def steps(run: Run) -> int:  # as launch/train.py counts them (--max-steps, or epochs x steps per epoch)
        if _option(study.train_args, "--max-steps"):
            return int(_option(study.train_args, "--max-steps"))
        per_epoch = next((r["metrics"]["steps_per_epoch"] for r in results.values()), None)
        if per_epoch is None:
            raise RuntimeError("no finished run tells the steps per epoch yet")
        return max(1, math.floor(run.epochs * per_epoch))

    def groups(run: Run) -> int:
        return math.ceil(units(_option(study.train_args, "--model")) / (run.group_size or study.group_size))
    return {"base_config": load_ds_config(study.deepspeed), "steps": steps, "groups": groups}


def units(model_dir: str | None) -> int:
    """hift-ds units of the study's model (a HF folder; None: the embedded one): embeddings, blocks, norm + head."""
    if model_dir is None:
        from hift_ds.train.jobs import instruction_model
        model_dir = instruction_model()
    with open(os.path.join(model_dir, "config.json")) as f:
        return json.load(f)["num_hidden_layers"] + 2


def run_study(study: Study, out: str, jobs: int = 1, lock: str | None = DEFAULT_LOCK, source: str | None = None,
              keep_models: bool = False, runner: Runner | None = None) -> dict:
    """Run every run the plan asks for (re-planned after each), keeping the report current; the last plan's grids."""
    split = make_split(study, out, source)
    runner = runner or Runner(study, out, split, jobs, lock, keep_models)
    if runner.time_limit is None:
        runner.time_limit = lambda run: 600 + 4 * estimate(study, [run], load_results(out), 1) * \
            report.DEFAULT_RATES["parallel_slowdown"].get(str(runner.jobs), 1.0)
    failed: dict[str, str] = {}  # crashed in this invocation: retried by the next one, not by this one

    def pending() -> list[Run]:
        results = load_results(out)
        return [r for r in plan(study, results)[0] if r.key not in results and r.key not in failed]

    def on_start(run: Run, in_flight: list[Run]) -> None:
        results = load_results(out)
        todo = [r for r in plan(study, results, assume_chosen=True)[0] if r.key not in results]
        print(f"[{time.strftime('%H:%M:%S')}] {len(results)} runs finished, about "
              f"{report.duration(estimate(study, todo, results, jobs))} of runs left; started {run.key} "
              f"({len(in_flight)} running)", flush=True)

    def on_done(run: Run, result: dict | None, error: str | None) -> None:
        if error:
            failed[run.key] = error
            print(f"  {run.key}: FAILED ({error}); see {os.path.join(out, run.key, 'train.log')}", flush=True)
        else:
            m = result["metrics"]
            print(f"  {run.key}: val ppl {m['after']['perplexity']:.3f}, test ppl {m['test_after']['perplexity']:.3f}"
                  f"{' (diverged)' if result['diverged'] else ''}, {result['seconds']:.0f} s", flush=True)
        _write_report(out, study)

    try:
        runner.run(pending, lambda: context_for(study, load_results(out)), on_start, on_done)
    except BadInput as e:
        _write_report(out, study)
        raise SystemExit(f"llm_study.py: stopped: {e}") from None
    if failed:
        print(f"{len(failed)} runs failed in this invocation (run the same command again to retry them): "
              + ", ".join(failed), flush=True)
    return {"grids": plan(study, load_results(out))[1], "failed": failed}


def _write_report(out: str, study: Study) -> None:
    try:
        report.write_report(out, study, load_results(out))
    except Exception as e:  # noqa: BLE001 - the study must not die of its report; --report retries it
        print(f"  warning: the report could not be written: {type(e).__name__}: {e}", flush=True)


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    """Options; everything after ``--`` goes to every launch/train.py run unchanged."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/llm_study", help="the study's directory (its runs, split and report)")
    p.add_argument("--plan", action="store_true", help="print the plan and the time estimate, train nothing")
    p.add_argument("--report", action="store_true", help="write the report from the finished runs, train nothing "
                   "(with the settings the study in --out was started with)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time, each with cores/jobs threads (keep it the "
                   "same through a study: the thread count changes bf16 results in their last digits)")
    p.add_argument("--seeds", default="7,8", help="comma-separated; the first one runs the grid and ablations")
    p.add_argument("--only", default=None, help="comma-separated methods (default: all): " +
                   ",".join(m.label.replace(" ", "-") for m in METHODS))
    p.add_argument("--ablations", default=",".join(v.name for v in ABLATIONS),
                   help="comma-separated ablation names, or 'none'")
    p.add_argument("--smoke", action="store_true", help="a rehearsal in minutes: 24 training records (6 steps an "
                   "epoch), 8 validation and 8 test records; everything else as the study")
    p.add_argument("--source", default=None, help="the records to split (default: the embedded instruction data)")
    p.add_argument("--keep-models", action="store_true", help="keep each run's final model (270 MB each)")
    p.add_argument("--force", action="store_true", help="go on in --out even if its settings differ")
    return p.parse_args(argv), extra


def study_from_args(args: argparse.Namespace, extra: list[str]) -> Study:
    """The Study the options describe."""
    labels = [label.replace("-", " ") for label in args.only.split(",")] if args.only else [m.label for m in METHODS]
    names = [] if args.ablations == "none" else args.ablations.split(",")
    unknown = [x for x in labels if x not in BY_LABEL] + [x for x in names if x not in {v.name for v in ABLATIONS}]
    if unknown:
        raise SystemExit(f"llm_study.py: unknown methods or ablations {unknown}")
    try:
        seeds = tuple(int(s) for s in args.seeds.split(","))
    except ValueError:
        raise SystemExit(f"llm_study.py: --seeds must be comma-separated integers, got {args.seeds!r}") from None
    study = Study(seeds=seeds, methods=tuple(labels), ablations=tuple(names), train_args=tuple(extra))
    if args.smoke:
        study = dataclasses.replace(study, test_size=8, val_size=8, train_size=24)
    return study


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM / SIGINT: the running runs are stopped, the report is written


def main(argv=None) -> None:
    """Run (or plan, or report) the study."""
    args, extra = parse_args(argv)
    study = study_from_args(args, extra)
    lock = os.environ.get(LOCK_ENV, DEFAULT_LOCK)
    lock = None if lock.lower() in ("", "none") else lock
    results = load_results(args.out) if os.path.isdir(args.out) else {}
    if args.report:  # the study's own settings, whatever the other options say
        saved = os.path.join(args.out, "settings.json")
        if os.path.isfile(saved):
            with open(saved) as f:
                study = Study.from_settings(json.load(f))
        print(report.write_report(args.out, study, results))
        return
    os.makedirs(args.out, exist_ok=True)
    study_lock = os.open(os.path.join(args.out, ".running"), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(study_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held until this process ends
    except BlockingIOError:
        raise SystemExit(f"llm_study.py: another llm_study.py runs in {args.out}; wait for it, or stop it") from None
    check_settings(args.out, study, args.force)
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    others = sorted({r["threads"] for r in results.values()} - {threads})
    if others:
        print(f"warning: finished runs used {others} threads, these will use {threads} (--jobs {args.jobs}): bf16 "
              "sums in another order differ in their last digits", flush=True)
    full, _ = plan(study, results, assume_chosen=True)
    left = [r for r in full if r.key not in results]
    print(report.plan_summary(study, full, results, estimate(study, left, results, args.jobs), args.jobs, lock),
          flush=True)
    if args.plan:
        return
    # Set, not inherited: a shell starts a background job with SIGINT ignored, and Ctrl-C or kill -INT
    # must still stop the runs and keep the report.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _interrupt)
    try:
        run_study(study, args.out, args.jobs, lock, args.source, keep_models=args.keep_models)
    except KeyboardInterrupt:
        _write_report(args.out, study)
        raise SystemExit("llm_study.py: interrupted; the runs that finished are kept, run the same command to "
                         "resume") from None
    print(report.write_report(args.out, study, load_results(args.out)))


if __name__ == "__main__":
    main()
