#!/usr/bin/env python
"""The runs of llm_study.py: each one a launch/train.py process, jobs at a time, under the machine's heavy-job lock.

A run's command line (``train_command``), its result.json from its files (``collect``), and ``Runner``, which
keeps ``jobs`` runs going, stops a hung one, and lets a waiting heavy job take the lock between runs (the
lock helpers read /proc/locks). llm_study.py decides which runs; this module only runs them.
"""
from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, BENCH)
import llm_study_report as report  # noqa: E402
from llm_study_plan import BY_LABEL, Run, Study, run_config  # noqa: E402
from quality import run_args  # noqa: E402

DEFAULT_LOCK = "/tmp/heavy.lock"
TRAIN = os.path.join(ROOT, "launch", "train.py")


def train_command(study: Study, run: Run, split: dict, config: str | None, out: str) -> list[str]:
    """The launch/train.py command line of one run into ``out`` (trained from the start: quality.run_args)."""
    method = BY_LABEL[run.method]
    args = ["--task", "instruction", "--deepspeed", config or study.deepspeed, "--data", split["train"],
            "--eval-data", split["val"], "--test-data", split["test"], "--check-pretrained", "--lr", repr(run.lr),
            "--seed", str(run.seed), "--epochs", f"{run.epochs:g}", "--batch-size", str(study.batch_size),
            "--max-length", str(study.max_length), "--samples", "0", "--no-progress", "--log-every", "50"]
    if method.strategy:  # HiFT's own options: the other modes refuse them
        args += ["--strategy", run.strategy or method.strategy, "--group-size", str(run.group_size or study.group_size)]
    if run.eval_every:
        args += ["--eval-every-epochs", f"{run.eval_every:g}"]
    # study.train_args (after the study's --) go to every run, less HiFT's options for the other modes
    return [sys.executable, TRAIN, *run_args(method.mode, out, [*args, *study.train_args])]


class BadInput(Exception):
    """A run refused its input or its model did not load: every later run would fail alike, so the study stops."""


def collect(run: Run, out: str, seconds: float, cmd: list[str], threads: int) -> dict:
    """result.json's content from a finished run's files; BadInput if its untrained model did not load."""
    from hift_ds.train.evaluation import load_failure

    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    metrics.pop("samples", None)
    vocab = metrics.get("vocab_size")
    for name in ("before", "test_before"):
        why = metrics.get(name) and load_failure(metrics[name], vocab)
        if why:
            raise BadInput(f"{run.key}: the untrained model scores as if its weights did not load: {why}")
    curve_path = os.path.join(out, "eval_log.jsonl")
    curve = [json.loads(line) for line in open(curve_path)] if os.path.isfile(curve_path) else []
    groups = [json.loads(line)["group"] for line in open(os.path.join(out, "train_log.jsonl"))]
    result = {"run": dataclasses.asdict(run), "key": run.key, "metrics": metrics, "curve": curve,
              "seconds": seconds, "threads": threads, "groups_trained": len(set(groups) - {None}),
              "switches": sum(a != b for a, b in zip(groups, groups[1:])), "command": cmd,
              "commit": git_commit(), "date": time.strftime("%Y-%m-%d %H:%M:%S %z")}
    # A trained model may diverge at a high LR: a result (never chosen), not a reason to stop.
    result["diverged"] = load_failure(metrics["after"], vocab)
    return result


def git_commit() -> str | None:
    """The checkout's commit, with "+changes" when its tracked files differ from it (None outside git)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=ROOT, timeout=30).returncode
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (head + ("+changes" if dirty else "")) or None


def _last_error(log_path: str) -> str:
    lines = [l.strip() for l in open(log_path, errors="replace") if l.strip()] if os.path.isfile(log_path) else []
    errors = [l for l in lines if l.startswith("error:")]
    return (errors or lines or ["no output"])[-1]


def _die_with_parent() -> None:  # in the child, before exec: SIGTERM when the study process dies
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Flight:
    """A run in progress."""

    run: Run
    proc: subprocess.Popen
    cmd: list[str]
    out: str
    t0: float
    limit: float | None = None  # seconds after which it counts as hung


class Runner:
    """Keeps ``jobs`` launch/train.py runs going, under the heavy-job lock, letting waiting heavy jobs in between runs.

    The lock is taken before a run starts and kept while runs follow each other. When another
    process waits for it, no new run starts; once the runs in flight end, the lock is released,
    the waiting job runs, and the study takes the lock back for its next run.
    """

    def __init__(self, study: Study, out: str, split: dict, jobs: int = 1, lock: str | None = DEFAULT_LOCK,
                 keep_models: bool = False):
        self.study, self.out, self.split, self.jobs, self.keep_models = study, out, split, jobs, keep_models
        self.lock = None if lock_held_by_ancestor(lock) else lock
        if lock and self.lock is None:
            print(f"note: {lock} is held by a parent of this process (started under `heavy`?): the whole study "
                  "holds it, and no other heavy job runs until it ends", flush=True)
        self.threads = max(1, (os.cpu_count() or 1) // jobs)
        self._fd: int | None = None
        self.time_limit = None  # seconds a run may take before it counts as hung (None: no limit)

    def start(self, run: Run, context: dict) -> Flight:
        """Start one run in a clean directory."""
        out = os.path.join(self.out, run.key)
        shutil.rmtree(out, ignore_errors=True)  # an unfinished earlier attempt starts over
        os.makedirs(out)
        config = None
        horizon = run.schedule == "steps"  # only this schedule needs the run's length and group count
        cfg = run_config(context["base_config"], run, context["steps"](run) if horizon else 0,
                         context["groups"](run) if horizon else 0)
        if cfg is not None:
            config = os.path.join(out, "ds_config.json")
            with open(config, "w") as f:
                json.dump(cfg, f, indent=2)
        cmd = train_command(self.study, run, self.split, config, out)
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
        # This checkout's hift_ds, whatever is installed; the runs share the cores.
        env.update(PYTHONPATH=os.pathsep.join([ROOT] + [p for p in [env.get("PYTHONPATH")] if p]),
                   OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads))
        with open(os.path.join(out, "command.txt"), "w") as f:
            f.write(" ".join(cmd) + "\n")
        with open(os.path.join(out, "train.log"), "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                    preexec_fn=_die_with_parent)
        return Flight(run, proc, cmd, out, time.time(), self.time_limit(run) if self.time_limit else None)

    def finish(self, flight: Flight) -> tuple[dict | None, str | None]:
        """(result, None) of a run that ended well, written as its result.json; (None, error) of one that crashed;
        BadInput for bad input or a model that did not load."""
        rc, log = flight.proc.returncode, os.path.join(flight.out, "train.log")
        if rc == 2:  # launch/train.py's exit status for bad input (a ValueError), --check-pretrained's too
            raise BadInput(f"{flight.run.key}: {_last_error(log)}")
        if rc != 0:
            return None, f"exit status {rc}: {_last_error(log)}"
        result = collect(flight.run, flight.out, time.time() - flight.t0, flight.cmd, self.threads)
        if not self.keep_models:
            shutil.rmtree(os.path.join(flight.out, "final"), ignore_errors=True)  # 270 MB each
        report.write_json(os.path.join(flight.out, "result.json"), result)  # from now on the run is finished
        return result, None

    def run(self, pending, context, on_start, on_done) -> None:
        """Run what ``pending()`` (re-read after every run) lists, ``jobs`` at a time, until it lists nothing."""
        flights: dict[str, Flight] = {}
        draining = False
        try:
            while True:
                for run in ([] if draining else pending()):
                    if len(flights) >= self.jobs:
                        break
                    if run.key not in flights:
                        self._acquire()
                        flights[run.key] = self.start(run, context())
                        on_start(run, [f.run for f in flights.values()])
                if not flights:
                    if not draining:
                        return
                    self._release()  # the waiting heavy job runs now; the next start waits for it
                    time.sleep(2)
                    draining = False
                    continue
                key = self._wait_any(flights)
                flight = flights.pop(key)
                on_done(flight.run, *self.finish(flight))
                draining = draining or self._others_waiting()
        finally:
            for flight in flights.values():  # interrupted or stopped: no orphan keeps training
                if flight.proc.poll() is None:
                    flight.proc.terminate()
                    try:
                        flight.proc.wait(30)
                    except subprocess.TimeoutExpired:
                        flight.proc.kill()
                        flight.proc.wait()
            self._release()

    def _wait_any(self, flights: dict[str, Flight]) -> str:
        while True:
            for key, flight in flights.items():
                if flight.proc.poll() is not None:
                    return key
                if flight.limit is not None and time.time() - flight.t0 > flight.limit:
                    print(f"  {key}: still running after {time.time() - flight.t0:.0f} s, more than 4x its "
                          "estimate: stopped (a hang?)", flush=True)
                    flight.proc.kill()
                    flight.proc.wait()
                    return key
            time.sleep(0.05)

    def _acquire(self) -> None:
        if self.lock is None or self._fd is not None:
            return
        fd = os.open(self.lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"  [{time.strftime('%H:%M:%S')}] waiting for {self.lock} (another heavy job runs)", flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        self._fd = fd

    def _release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def _others_waiting(self) -> bool:
        return self.lock is not None and bool(lock_waiters(self.lock))


def lock_waiters(path: str) -> list[int]:
    """Processes blocked waiting for the flock on ``path`` (from /proc/locks; none where it does not exist)."""
    return [pid for blocked, pid in _flocks(path) if blocked]


def _flocks(path: str) -> list[tuple[bool, int]]:
    # /proc/locks: "1: FLOCK  ADVISORY  WRITE <pid> <major>:<minor>:<inode> 0 EOF"; a blocked
    # request is listed under its holder as "1: -> FLOCK ...".
    if not os.path.exists(path) or not os.path.exists("/proc/locks"):
        return []
    inode, out = str(os.stat(path).st_ino), []
    for line in open("/proc/locks"):
        fields = line.split()
        blocked = len(fields) > 1 and fields[1] == "->"
        fields = [fields[0]] + fields[2:] if blocked else fields
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5].rsplit(":", 1)[-1] == inode:
            out.append((blocked, int(fields[4])))
    return out


def lock_held_by_ancestor(path: str | None) -> bool:
    """Whether a parent of this process holds the flock on ``path`` (taking it again would wait forever)."""
    if not path:
        return False
    holders = {pid for blocked, pid in _flocks(path) if not blocked}
    pid = os.getppid()
    while pid > 1:
        if pid in holders:
            return True
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
    return False
