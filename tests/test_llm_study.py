"""benchmarks/llm_study.py: planning, resuming, the lock and the report on fake runs; a model that did not load stops it."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
FAKE = str(Path(__file__).with_name("_fake_study_train.py"))


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


study_mod = _load("llm_study", BENCH / "llm_study.py")  # puts benchmarks/ on sys.path for its own imports
import llm_study_plan as P  # noqa: E402
import llm_study_report as R  # noqa: E402
import llm_study_runner as RN  # noqa: E402

PLOT = R.plot


def _records(path: Path, n: int = 60) -> str:
    path.write_text("".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) + "\n" for i in range(n)))
    return str(path)


def _result(run, val: float, test: float | None = None, diverged: str | None = None) -> dict:
    m = {"after": {"eval_loss": math.log(val), "perplexity": val},
         "test_after": {"eval_loss": math.log(test or val), "perplexity": test or val}, "steps": 10,
         "steps_per_epoch": 10, "train_seconds": 5.0, "eval_seconds": 1.0}
    return {"run": {**run.__dict__}, "key": run.key, "metrics": m, "curve": [], "seconds": 8.0, "threads": 2,
            "diverged": diverged, "switches": 0, "groups_trained": 4}


def test_grids_grow_until_bracketed_then_curves_and_ablations_follow():
    study = P.Study(seeds=(7, 8), methods=("fpft", "hift random"), ablations=("k32", "steps-horizon"))
    runs, grids = P.plan(study, {})
    assert [(r.method, r.lr) for r in runs] == [("fpft", 5e-5), ("hift random", 1.5e-4), ("fpft", 1e-4),
                                                ("hift random", 3e-4), ("fpft", 2e-4), ("hift random", 6e-4)]
    assert {g["state"] for g in grids.values()} == {"running"} and all(r.phase == "grid" for r in runs)
    # fpft is best at its lowest LR: one step down (x1/2); HiFT random is bracketed at 3e-4
    vals = {("fpft", 5e-5): 8.0, ("fpft", 1e-4): 8.5, ("fpft", 2e-4): 9.0,
            ("hift random", 1.5e-4): 10.0, ("hift random", 3e-4): 9.5, ("hift random", 6e-4): 11.0}
    results = {r.key: _result(r, vals[r.method, r.lr]) for r in runs}
    runs, grids = P.plan(study, results)
    assert grids["fpft"] == {"lrs": [2.5e-5, 5e-5, 1e-4, 2e-4], "state": "running", "chosen": None}
    assert grids["hift random"] == {"lrs": [1.5e-4, 3e-4, 6e-4], "state": "bracketed", "chosen": 3e-4}
    curves = [r for r in runs if r.phase == "curve"]
    assert [(r.method, r.lr, r.seed, r.epochs, r.eval_every) for r in curves] == \
        [("hift random", 3e-4, 7, 2.0, 0.25), ("hift random", 3e-4, 8, 2.0, 0.25)]  # fpft's wait for its grid
    ablations = [r for r in runs if r.phase == "ablation"]
    assert [(r.variant, r.group_size, r.schedule, r.lr, r.seed, r.epochs) for r in ablations] == \
        [("k32", 1, "decay", 3e-4, 7, 1.0), ("steps-horizon", None, "steps", 3e-4, 7, 1.0)]
    assert [r.phase for r in runs] == ["grid"] * 7 + ["curve"] * 2 + ["ablation"] * 2  # grids first
    # 2.5e-5 is better still: down once more, then the cap: chosen at the edge, marked "capped"
    new = P.Run("grid", "fpft", 2.5e-5, 7, 1.0)
    results[new.key] = _result(new, 7.0)
    _, grids = P.plan(study, results)
    assert grids["fpft"]["lrs"][0] == 1.25e-5 and grids["fpft"]["state"] == "running"
    low = P.Run("grid", "fpft", 1.25e-5, 7, 1.0)
    results[low.key] = _result(low, 6.0)
    runs, grids = P.plan(study, results)
    assert grids["fpft"] == {"lrs": [1.25e-5, 2.5e-5, 5e-5, 1e-4, 2e-4], "state": "capped", "chosen": 1.25e-5}
    assert [r.key for r in runs if r.phase == "curve"][:2] == ["curve/fpft/lr1.25e-05_seed7",
                                                               "curve/hift_random/lr0.0003_seed7"]
    # a diverged run never wins; the middle LR is assumed chosen for the estimate of an undecided grid
    results[low.key] = _result(low, 6.0, diverged="loss nan")
    assert P.plan(study, results)[1]["fpft"]["chosen"] == 2.5e-5
    assert {r.lr for r in P.plan(study, {}, assume_chosen=True)[0] if r.phase == "curve"} == {1e-4, 3e-4}


def test_ablation_configs():
    base = json.loads((ROOT / "ds_configs" / "hift.json").read_text())
    run = P.Run("ablation", "hift random", 3e-4, 7, 1.0, variant="x")
    assert P.run_config(base, run, 289, 4) is None  # the study's own config
    steps = P.run_config(base, P.Run(**{**run.__dict__, "schedule": "steps"}), 289, 4)
    # official HiFT: its horizon in optimizer steps, counted in cycles: 4x the counts, converted back by 4
    assert steps["scheduler"]["params"]["total_num_steps"] == 1156
    assert steps["scheduler"]["params"]["warmup_num_steps"] == 112 and steps["scheduler"]["type"] == "WarmupDecayLR"
    const = P.run_config(base, P.Run(**{**run.__dict__, "schedule": "constant"}), 289, 4)
    assert const["scheduler"]["type"] == "WarmupLR" and const["scheduler"]["params"]["warmup_num_steps"] == "auto"
    wd = P.run_config(base, P.Run(**{**run.__dict__, "weight_decay": 0.0}), 289, 4)
    assert wd["optimizer"]["params"]["weight_decay"] == 0.0 and base["optimizer"]["params"]["weight_decay"] == 0.01
    from hift_ds.deepspeed.scheduler import convert_steps_to_cycles
    converted, _ = convert_steps_to_cycles("WarmupDecayLR", steps["scheduler"]["params"], 4)
    assert (converted["total_num_steps"], converted["warmup_num_steps"]) == (289 + 1, 28)  # + HiFT's one-cycle shift


class Interrupting(RN.Runner):
    """Stops (as Ctrl-C would) right after run number ``after`` + 1 has written its files."""

    def __init__(self, *a, after: int, **kw):
        super().__init__(*a, **kw)
        self.after, self.starts = after, 0

    def start(self, run, context):
        flight = super().start(run, context)
        self.starts += 1
        if self.starts > self.after:
            flight.proc.wait()  # the run finished its files, but the study stops before it takes them as done
            raise KeyboardInterrupt
        return flight


@pytest.fixture
def fake(monkeypatch, tmp_path):
    monkeypatch.setattr(RN, "TRAIN", FAKE)
    monkeypatch.setattr(R, "plot", lambda *a: None)  # the report after every run, without its 1-second picture
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"num_hidden_layers": 30}))
    study = P.Study(seeds=(7, 8), test_size=5, val_size=5, train_args=("--model", str(model)))
    return study, _records(tmp_path / "records.jsonl"), tmp_path / "study"


def test_study_runs_resumes_after_an_interruption_and_reports(fake, monkeypatch):
    study, source, out = fake
    split = study_mod.make_split(study, str(out), source)
    with pytest.raises(KeyboardInterrupt):
        study_mod.run_study(study, str(out), lock=None, source=source,
                            runner=Interrupting(study, str(out), split, lock=None, after=6))
    done = study_mod.load_results(str(out))
    assert len(done) == 6 and all(k.startswith("grid/") for k in done)
    interrupted = next(p for p in (out / "grid").glob("*/*") if p.name and str(p.relative_to(out)) not in done)
    assert (interrupted / "metrics.json").exists() and not (interrupted / "result.json").exists()
    monkeypatch.setattr(R, "plot", PLOT)
    text = R.write_report(str(out), study, done)  # a partial study reports what it has
    assert "## LR grid" in text and "| ... |" in text and (out / "curves.png").stat().st_size > 0
    monkeypatch.setattr(R, "plot", lambda *a: None)
    study_mod.run_study(study, str(out), lock=None, source=source)
    monkeypatch.setattr(R, "plot", PLOT)
    results = study_mod.load_results(str(out))
    starts = (out / "starts.log").read_text().split()
    assert sorted(set(starts)) == sorted(str(out / k) for k in results)  # every planned run, and only those
    assert starts.count(str(interrupted)) == 2 and len(starts) == len(results) + 1  # nothing else ran twice
    runs, grids = P.plan(study, results)
    assert {k: g["state"] for k, g in grids.items()} == {"fpft": "bracketed", "hift bottom2up": "bracketed",
                                                         "hift top2down": "capped", "hift random": "bracketed",
                                                         "badam": "bracketed"}
    assert grids["fpft"]["chosen"] == 2.5e-5 and grids["hift bottom2up"]["chosen"] == 1.2e-3
    assert len([k for k in results if k.startswith("curve/")]) == 10
    assert len([k for k in results if k.startswith("ablation/")]) == len(P.ABLATIONS)
    horizon = json.loads((out / "ablation/hift_random/steps-horizon_lr0.0003_seed7/ds_config.json").read_text())
    assert horizon["scheduler"]["params"]["total_num_steps"] == 10 * 4  # 1 epoch of 10 steps, k = 32 / 8
    badam = results["grid/badam/lr0.0003_seed7"]
    assert (badam["switches"], badam["groups_trained"], badam["metrics"]["badam_switch_every"]) == (1, 2, 6)
    text = R.write_report(str(out), study, results)
    s = json.loads((out / "study.json").read_text())
    assert s["pending"] == [] and s["fpft_1_epoch_test"] == results["grid/fpft/lr2.5e-05_seed7"]["metrics"][
        "test_after"]["perplexity"]
    fpft_curve = s["curves"]["fpft"]
    assert [p["epoch"] for p in fpft_curve] == [0, 0.2, 0.5, 0.8, 1.0, 1.2, 1.5, 1.8, 2.0] and \
        fpft_curve[-1]["seeds"] == 2 and fpft_curve[-1]["test"][1] > 0  # two seeds: a std
    assert s["parity"]["fpft"]["fpft_run_1"]["epoch"] == 1.5  # the fake's 2-epoch runs end 10% lower
    assert s["parity"]["badam"]["fpft_run_1"]["epoch"] is None and "not within the curve" in text
    assert "k4 (baseline)" in text and "| k32 |" in text and "grid capped (best at an edge" in text
    assert study_mod.run_study(study, str(out), lock=None, source=source)["failed"] == {}  # nothing left to run
    assert len((out / "starts.log").read_text().split()) == len(starts)


def test_a_crashed_run_is_retried_by_the_next_invocation(fake, monkeypatch):
    study, source, out = fake
    study = P.Study(**{**study.__dict__, "methods": ("hift random",), "ablations": ()})
    monkeypatch.setenv("FAKE_FAIL", "lr0.0003_seed7")
    summary = study_mod.run_study(study, str(out), lock=None, source=source)
    assert list(summary["failed"]) == ["grid/hift_random/lr0.0003_seed7"]
    assert "exit status 1: Traceback: boom" in summary["failed"]["grid/hift_random/lr0.0003_seed7"]
    monkeypatch.delenv("FAKE_FAIL")
    summary = study_mod.run_study(study, str(out), lock=None, source=source)
    assert summary["failed"] == {} and summary["grids"]["hift random"]["chosen"] == 3e-4


def test_a_hung_run_is_stopped_and_a_second_study_in_the_same_directory_refused(fake, monkeypatch):
    import fcntl

    study, source, out = fake
    study = P.Study(**{**study.__dict__, "methods": ("hift random",), "ablations": (), "seeds": (7,)})
    monkeypatch.setenv("FAKE_HANG", "lr0.0003_seed7")
    split = study_mod.make_split(study, str(out), source)
    runner = RN.Runner(study, str(out), split, lock=None)
    runner.time_limit = lambda run: 2.0
    t0 = time.time()
    summary = study_mod.run_study(study, str(out), source=source, runner=runner)
    assert time.time() - t0 < 60 and list(summary["failed"]) == ["grid/hift_random/lr0.0003_seed7"]
    assert summary["failed"]["grid/hift_random/lr0.0003_seed7"].startswith("exit status -9")
    fd = os.open(out / ".running", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as a running llm_study.py holds it
    try:
        with pytest.raises(SystemExit, match="another llm_study.py runs in"):
            study_mod.main(["--out", str(out), "--only", "hift-random", "--ablations", "none", "--seeds", "7"])
    finally:
        os.close(fd)


def test_a_model_that_did_not_load_stops_the_study(fake, monkeypatch):
    study, source, out = fake
    monkeypatch.setenv("FAKE_UNLOADED", "hift_random/lr0.0003")  # scores like a uniform guess over its vocabulary
    with pytest.raises(SystemExit, match=r"hift_random/lr0.0003_seed7: the untrained model scores as if its "
                                         r"weights did not load: its held-out perplexity is 1000, at or above 0.5"):
        study_mod.run_study(study, str(out), lock=None, source=source)
    assert not (out / "grid/hift_random/lr0.0003_seed7/result.json").exists()


@pytest.mark.parametrize("weights", ["random", "none"])
def test_real_runs_of_a_model_that_did_not_load_stop_the_study(tmp_path, weights):
    """launch/train.py itself, on a tiny LM with random weights or none: the first run stops the study."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tinymodel import instruction_jsonl, make_causal_lm

    model = make_causal_lm(str(tmp_path / "lm"))  # random init: perplexity about its vocabulary size (25)
    if weights == "none":
        for f in os.listdir(model):
            if f.endswith(".safetensors"):
                os.remove(os.path.join(model, f))
    source = instruction_jsonl(str(tmp_path / "instr.jsonl"))
    study = P.Study(methods=("hift random",), ablations=(), test_size=4, val_size=4, max_length=16, group_size=2,
                    deepspeed=str(ROOT / "ds_configs" / "hift_fp32.json"), train_args=("--model", model))
    message = "check-pretrained: the untrained model .* did not load" if weights == "random" else "has no weights"
    with pytest.raises(SystemExit, match=message):
        study_mod.run_study(study, str(tmp_path / "study"), lock=None, source=source)


def test_the_lock_is_the_heavy_commands_and_a_parent_holding_it_is_seen(tmp_path):
    import fcntl

    lock = str(tmp_path / "heavy.lock")
    runner = RN.Runner(P.Study(), str(tmp_path), {}, lock=lock)
    runner._acquire()
    fd = os.open(lock, os.O_RDWR)
    with pytest.raises(BlockingIOError):  # another open file (as flock(1) opens it) cannot take it
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.close(fd)
    waiter = subprocess.Popen(["flock", lock, "true"])
    try:
        for _ in range(100):
            if RN.lock_waiters(lock):
                break
            time.sleep(0.05)
        assert RN.lock_waiters(lock) == [waiter.pid] and runner._others_waiting()
    finally:
        runner._release()
        assert waiter.wait(30) == 0  # it got the lock once the study let go
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); import llm_study_runner; "
             "print(llm_study_runner.lock_held_by_ancestor(sys.argv[2]))")
    held = subprocess.run(["flock", lock, sys.executable, "-c", probe, str(BENCH), lock], capture_output=True,
                          text=True, timeout=120)
    free = subprocess.run([sys.executable, "-c", probe, str(BENCH), lock], capture_output=True, text=True, timeout=120)
    assert (held.stdout.strip(), free.stdout.strip()) == ("True", "False"), held.stderr + free.stderr


def test_runs_pause_for_a_waiting_heavy_job_and_keep_two_going_otherwise(fake, monkeypatch):
    study, source, out = fake
    study = P.Study(**{**study.__dict__, "methods": ("hift random", "badam"), "ablations": ()})
    events = []

    class Watched(RN.Runner):
        def _acquire(self):
            if self._fd is None:
                events.append("lock")
            super()._acquire()

        def _release(self):
            if self._fd is not None:
                events.append("unlock")
            super()._release()

        def start(self, run, context):
            events.append("start")
            return super().start(run, context)

        def _others_waiting(self):  # someone waits after the 3rd run ends, and only then
            return events.count("start") == 3 and "waited" not in events and not events.append("waited")
    split = study_mod.make_split(study, str(out), source)
    study_mod.run_study(study, str(out), source=source,
                        runner=Watched(study, str(out), split, jobs=2, lock=str(out.parent / "heavy.lock")))
    assert events[:4] == ["lock", "start", "start", "start"]  # two at a time from the start: runs 1, 2, then 3
    # after the wait is seen, nothing starts until the two runs in flight end; then the lock is let go
    i = events.index("waited")
    assert events[i + 1:i + 4] == ["unlock", "lock", "start"]
    assert events[-1] == "unlock" and events.count("start") == 10  # 6 grid runs, 4 curves


def test_settings_must_match_to_resume(tmp_path):
    study = P.Study()
    study_mod.check_settings(str(tmp_path), study, force=False)
    study_mod.check_settings(str(tmp_path), study, force=False)  # the same: fine
    assert P.Study.from_settings(json.loads((tmp_path / "settings.json").read_text())) == study
    with pytest.raises(SystemExit, match=r"other settings \(seeds"):
        study_mod.check_settings(str(tmp_path), P.Study(seeds=(1, 2)), force=False)
    args, extra = study_mod.parse_args(["--smoke", "--only", "fpft,hift-random", "--ablations", "none", "--",
                                        "--max-steps", "3"])
    smoke = study_mod.study_from_args(args, extra)
    assert (smoke.methods, smoke.ablations, smoke.train_size, smoke.train_args) == \
        (("fpft", "hift random"), (), 24, ("--max-steps", "3"))


def test_a_run_starts_over_and_only_hift_runs_get_hifts_options(tmp_path):
    """launch/train.py refuses --group-size/--strategy under --mode fpft/badam and a fresh run into a used --output-dir:
    every run is trained from the start (--overwrite-output-dir), the study's extra options reach HiFT's runs only."""
    study = P.Study(train_args=("--group-size", "2", "--max-steps", "3"))
    split = {k: str(tmp_path / f"{k}.jsonl") for k in ("train", "val", "test")}
    for method in ("fpft", "badam", "hift random"):
        cmd = RN.train_command(study, P.Run("grid", method, 1e-4, 7, 1.0), split, None, str(tmp_path / "o"))
        options = cmd[cmd.index("--mode"):]
        assert options[:5] == ["--mode", P.BY_LABEL[method].mode, "--output-dir", str(tmp_path / "o"),
                               "--overwrite-output-dir"] and "--resume" not in cmd
        hift = [cmd[i + 1] for i, a in enumerate(cmd) if a in ("--group-size", "--strategy")]
        assert hift == ([] if method != "hift random" else ["random", "8", "2"]), cmd  # the study's 8, then the extra 2
        assert cmd[-2:] == ["--max-steps", "3"]
