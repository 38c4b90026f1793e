"""Nothing a user had is lost (issue 27): damaged checkpoints, non-finite losses, no silent overwrite, bad input.

Table-driven: each case is an input (a damage done to a real run's output directory, or a command line) and
what must follow: the exit status, the one ``error:`` line or warning naming the problem and the fix, and
which files are left untouched. The damage is done to a copy of one real 2-step run (a checkpoint at each
step), made once per module. ``train.run`` runs in this process (the command line without the process
start); subprocesses only where the process itself matters (a SIGKILL, launch/train.py's own exit status).
"""
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from tinymodel import make_classifier, sentiment_jsonl
from hift_ds import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--deepspeed", os.path.join(ROOT, "ds_configs", "hift_fp32.json"), "--batch-size", "8", "--max-length", "16",
        "--no-progress", "--log-every", "0"]
STATES = "mp_rank_00_model_states.pt"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("assets")
    return {"model": make_classifier(str(d / "model")), "data": sentiment_jsonl(str(d / "data.jsonl")), "dir": d}


@pytest.fixture(autouse=True)
def single_rank_env(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)


def common(assets, out) -> list[str]:
    return ["--model", assets["model"], "--data", assets["data"], "--output-dir", str(out), "--max-steps", "2",
            "--save-every", "1", *FAST]


@pytest.fixture(scope="module")
def finished(assets, tmp_path_factory):
    """A real 2-step run: checkpoints step1 and step2 (latest: step2), its log, metrics.json and final/."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train.main(common(assets, out))
    return out


@pytest.fixture
def run_dir(finished, tmp_path):
    """A copy of the finished run to damage."""
    shutil.copytree(finished, tmp_path / "run")
    return tmp_path / "run"


def cli(argv, monkeypatch, capsys) -> tuple[int, str]:
    """launch/train.py's command line in this process: (exit status, stderr)."""
    # run() ends the process group after a run; later tests in this process still need it.
    monkeypatch.setattr(torch.distributed, "destroy_process_group", lambda *a: None)
    capsys.readouterr()
    try:
        rc = train.run(argv)
    except SystemExit as e:  # argparse's errors
        rc = e.code
    return rc, capsys.readouterr().err


def snapshot(folder) -> dict[str, str]:
    """Every file under ``folder`` with a hash of its bytes."""
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def error_line(err: str) -> str:
    """The one ``error:`` line of stderr (and no traceback), from ``error:`` on (argparse puts the program first)."""
    assert "Traceback" not in err, err[-3000:]
    lines = [line[line.index("error: "):] for line in err.splitlines() if re.match(r"(\S+: )?error: ", line)]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


def weights(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(os.path.join(folder, "model.safetensors"))


# ---- damaged checkpoints -----------------------------------------------------------------------------------

def _truncate(path, size=None):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2 if size is None else size)


def _flip_bit(path):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x10]))


def _torn_log(run):
    with open(run / "train_log.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 0.6')  # a kill while step 3's line was written


DAMAGE = {
    # name: (damage, warning that names the file, the step the run resumes from)
    "truncated states": (lambda run: _truncate(run / "checkpoints" / "step2" / STATES),
                         rf"checkpoint \S+step2 is damaged: {STATES} is \d+ bytes, its manifest says \d+", 1),
    "zero-length states": (lambda run: _truncate(run / "checkpoints" / "step2" / STATES, 0),
                           rf"step2 is damaged: {STATES} is 0 bytes, its manifest says \d+", 1),
    "bit flip": (lambda run: _flip_bit(run / "checkpoints" / "step2" / STATES),
                 rf"step2 is damaged: {STATES} does not match its \w+ checksum", 1),
    "damaged manifest": (lambda run: (run / "checkpoints" / "step2" / "manifest.json").write_text('{"files": '),
                         r"step2 is damaged: manifest.json is damaged", 1),
    "latest deleted step": (lambda run: shutil.rmtree(run / "checkpoints" / "step2"),
                            r"step2 is damaged: \S+step2 does not exist", 1),
    "binary latest": (lambda run: (run / "checkpoints" / "latest").write_bytes(b"\x1f\x8b\x08\x00\xff\xfe"),
                      r"latest is not text \(damaged\)", 2),
    "torn log line": (_torn_log, r"train_log.jsonl: dropped 1 unreadable line \(line 3;", 2),
    "no manifest (older hift-ds)": (lambda run: (run / "checkpoints" / "step2" / "manifest.json").unlink(),
                                    r"step2 has no manifest \(saved before hift-ds verified checkpoints\): "
                                    r"resuming from it unverified", 2),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_a_damaged_run_resumes_from_what_is_intact(case, assets, finished, run_dir, monkeypatch, capsys, caplog):
    damage, warning, resumed_at = DAMAGE[case]
    damage(run_dir)
    with caplog.at_level(logging.INFO, logger="hift_ds"):
        rc, err = cli([*common(assets, run_dir), "--resume"], monkeypatch, capsys)
    assert rc == 0, err[-3000:]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("hift_ds")]
    assert any(re.search(warning, w) for w in warnings), warnings
    resumed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("resumed from")]
    assert resumed == [f"resumed from {run_dir / 'checkpoints' / f'step{resumed_at}'} at optimizer step {resumed_at}"]
    if resumed_at != 2:
        assert any("falling back to" in w and w.endswith(f"step{resumed_at}, the newest intact checkpoint (latest now "
                                                         "names it)") for w in warnings), warnings
    # The same model as the uninterrupted run, bit for bit, and the same log; the damage is gone.
    for name, tensor in weights(finished / "final").items():
        assert torch.equal(weights(run_dir / "final")[name], tensor), name
    assert (run_dir / "train_log.jsonl").read_text() == (finished / "train_log.jsonl").read_text()
    assert (run_dir / "checkpoints" / "latest").read_text() == "step2"
    if resumed_at != 2:  # the damaged save was written again, manifest and all
        assert snapshot(run_dir / "checkpoints" / "step2") == snapshot(finished / "checkpoints" / "step2")


ERRORS = {
    # name: (damage, the error line's pattern)
    "every checkpoint damaged": (
        lambda run: [_truncate(run / "checkpoints" / f"step{s}" / STATES) for s in (1, 2)],
        rf"error: --resume: no intact checkpoint in \S+checkpoints \(step2: {STATES} is \d+ bytes, its manifest says "
        rf"\d+; step1: {STATES} is \d+ bytes, its manifest says \d+; checkpoint folders: \['step1', 'step2'\]\); "
        r"restore one, or start over: drop --resume and pass --overwrite-output-dir"),
    "latest names a missing step, no other intact": (
        lambda run: [(run / "checkpoints" / "latest").write_text("step8"), _truncate(run / "checkpoints" / "step1" /
                                                                                    STATES),
                     shutil.rmtree(run / "checkpoints" / "step2")],
        r"no intact checkpoint in \S+ \(step8: \S+step8 does not exist; step1: "),
    "latest names an empty folder": (
        lambda run: [(run / "checkpoints" / "latest").write_text("step8"), (run / "checkpoints" / "step8").mkdir(),
                     _truncate(run / "checkpoints" / "step1" / STATES), shutil.rmtree(run / "checkpoints" / "step2")],
        r"\(step8: \S+step8 holds no model states; step1: .*; checkpoint folders: \['step1', 'step8'\]\)"),
    "old checkpoint, truncated": (
        lambda run: [(run / "checkpoints" / "step2" / "manifest.json").unlink(),
                     _truncate(run / "checkpoints" / "step2" / STATES)],
        r"error: --resume: cannot load checkpoint \S+step2 \(\w+: .*\); resume with the --model and config that "
        r"saved it, or start over: drop --resume and pass --overwrite-output-dir$"),
}


@pytest.mark.parametrize("case", ERRORS)
def test_a_run_with_no_intact_checkpoint_stops_and_changes_nothing(case, assets, run_dir, monkeypatch, capsys):
    damage, message = ERRORS[case]
    damage(run_dir)
    before = snapshot(run_dir)
    rc, err = cli([*common(assets, run_dir), "--resume"], monkeypatch, capsys)
    assert rc == 2 and re.search(message, error_line(err)), err[-3000:]
    assert snapshot(run_dir) == before


# ---- --save-total-limit -------------------------------------------------------------------------------------

def test_save_total_limit_keeps_the_newest_and_never_the_one_latest_names(assets, tmp_path, monkeypatch, capsys):
    from hift_ds.train import checkpoints
    out = tmp_path / "run"
    rc, err = cli([*common(assets, out), "--max-steps", "5", "--save-total-limit", "2"], monkeypatch, capsys)
    assert rc == 0, err[-3000:]
    assert sorted(os.listdir(out / "checkpoints")) == ["latest", "step4", "step5"]
    # A run that fell back to step3 (its step4 and step5 are newer than latest): only older ones go.
    ckpt = tmp_path / "fell_back"
    for step in range(1, 6):
        (ckpt / f"step{step}").mkdir(parents=True)
        (ckpt / f"step{step}" / STATES).write_bytes(b"x")
        if step != 2:  # step2's save never finished: it has no manifest, it is not a checkpoint to count
            checkpoints.manifest.write_manifest(str(ckpt / f"step{step}"))
    (ckpt / "latest").write_text("step3")
    checkpoints.prune(str(ckpt), 1)
    assert sorted(os.listdir(ckpt)) == ["latest", "step2", "step3", "step4", "step5"]


# ---- no silent overwrite ------------------------------------------------------------------------------------

def _only_log(run):
    for name in ("final", "checkpoints"):
        shutil.rmtree(run / name)
    (run / "metrics.json").unlink()


OVERWRITE = {
    # name: (what the directory holds, extra options, exit status, error pattern or None)
    "fresh run into a finished run": (
        None, [], 2, r"error: --output-dir \S+ holds a previous run \(train_log.jsonl, metrics.json, final, "
        r"checkpoints/\); pass --resume to continue it, --overwrite-output-dir to start over \(its log, metrics and "
        r"checkpoints are deleted\), or another --output-dir$"),
    "fresh run into a run killed before its first checkpoint": (
        _only_log, [], 2, r"error: --output-dir \S+ holds a previous run \(train_log.jsonl\); pass --resume"),
    "fresh run into a run's final/ alone": (
        lambda run: [(run / "train_log.jsonl").unlink(), shutil.rmtree(run / "checkpoints")], [], 2,
        r"holds a previous run \(metrics.json, final\)"),
    "--resume into a finished run without checkpoints": (
        lambda run: shutil.rmtree(run / "checkpoints"), ["--resume"], 2,
        r"error: --resume: nothing to resume in \S+: it holds a finished run \(train_log.jsonl, metrics.json, final\) "
        r"but no checkpoint \(it ran without --save-every\); pass --overwrite-output-dir instead of --resume to "
        r"train again from the start, or another --output-dir$"),
    "--resume and --overwrite-output-dir": (
        None, ["--resume", "--overwrite-output-dir"], 2,
        r"error: --resume continues the run in --output-dir, --overwrite-output-dir deletes it: pass one$"),
}


@pytest.mark.parametrize("case", OVERWRITE)
def test_a_previous_run_is_never_overwritten_unasked(case, assets, run_dir, monkeypatch, capsys):
    prepare, extra, status, message = OVERWRITE[case]
    if prepare:
        prepare(run_dir)
    before = snapshot(run_dir)
    rc, err = cli([*common(assets, run_dir), *extra], monkeypatch, capsys)
    assert rc == status and re.search(message, error_line(err)), err[-3000:]
    assert snapshot(run_dir) == before


def test_overwrite_output_dir_starts_over_and_keeps_final_until_replaced(assets, finished, run_dir, monkeypatch,
                                                                        capsys):
    (run_dir / "profile.json").write_text("{}")
    rc, err = cli([*common(assets, run_dir), "--overwrite-output-dir", "--save-every", "2"], monkeypatch, capsys)
    assert rc == 0, err[-3000:]
    assert sorted(os.listdir(run_dir)) == ["checkpoints", "final", "metrics.json", "train_log.jsonl"]
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["latest", "step2"]  # step1 of the previous run is gone
    assert (run_dir / "train_log.jsonl").read_text() == (finished / "train_log.jsonl").read_text()


@pytest.mark.parametrize("holds", ["nothing", "a killed run's log"])
def test_resume_with_no_checkpoint_yet_starts_at_step_0(holds, assets, finished, run_dir, monkeypatch, capsys, caplog):
    if holds == "nothing":
        shutil.rmtree(run_dir)
    else:
        _only_log(run_dir)
        with open(run_dir / "train_log.jsonl", "a") as f:
            f.write('{"step": 3, "loss": 0.5, "lr": 0.1, "group": 2}\n')  # a line no new run would write
    with caplog.at_level(logging.WARNING, logger="hift_ds"):
        rc, err = cli([*common(assets, run_dir), "--resume"], monkeypatch, capsys)
    assert rc == 0, err[-3000:]
    assert f"--resume: no checkpoint in {run_dir / 'checkpoints'} yet: starting at step 0" in caplog.text
    assert (run_dir / "train_log.jsonl").read_text() == (finished / "train_log.jsonl").read_text()


# ---- non-finite losses and gradients ------------------------------------------------------------------------

class _NanGradient(torch.autograd.Function):
    """The identity on the loss, whose backward turns every gradient into nan: a finite loss, non-finite updates."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def spoil(monkeypatch, calls=None, gradient=False):
    """The tiny classifier's training forwards number ``calls`` (None: all) get a nan loss, or a nan gradient."""
    import transformers
    cls = transformers.BertForSequenceClassification
    forward, count = cls.forward, [0]

    def spoiled(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if self.training:
            count[0] += 1
            if calls is None or count[0] in calls:
                out.loss = _NanGradient.apply(out.loss) if gradient else out.loss * float("nan")
        return out
    monkeypatch.setattr(cls, "forward", spoiled)


def saved(run) -> dict[str, str]:
    """What a run saved of its model: checkpoints, final/ and metrics.json."""
    return {k: v for k, v in snapshot(run).items() if not k.startswith(("train_log", "profile"))}


def test_a_nan_loss_is_skipped_without_an_update(assets, tmp_path, monkeypatch, capsys, caplog):
    spoil(monkeypatch, calls={2})
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="hift_ds"):
        rc, err = cli([*common(assets, out), "--max-steps", "3", "--save-every", "3"], monkeypatch, capsys)
    assert rc == 0, err[-3000:]
    assert ("optimizer step 2: the loss is nan; micro-batch skipped (no backward, no update; 1 in a row, the run "
            "stops at 10)") in caplog.text
    log = [json.loads(line) for line in open(out / "train_log.jsonl")]
    assert [e["step"] for e in log] == [1, 2, 3] and all(e["loss"] == e["loss"] for e in log)
    assert [e["group"] for e in log] == [0, 1, 2]  # the skipped batch moved neither the group nor the LR
    state = torch.load(out / "checkpoints" / "step3" / STATES, weights_only=False)
    assert state["batches"] == 4 and state["step"] == 3  # a resume reads on after the skipped batch


NONFINITE = {
    # name: (spoil options, extra options, error pattern); each resumes the finished run at step 2 and stops, rc 1
    "nan losses in a row": (
        {}, ["--max-nonfinite-batches", "3"],
        r"error: the loss was not finite for 3 micro-batches in a row at optimizer step 3 \(each was skipped; the "
        r"weights are still finite\): stopped without writing a checkpoint or final/; check the data and "
        r"--max-length, lower --lr, or raise --max-nonfinite-batches$"),
    "nan gradient, then a checkpoint": (
        {"gradient": True}, [],
        r"error: the weights hold non-finite values after optimizer step 3 \(bert\.\S+, .* and \d+ more\) although "
        r"its loss was finite \(a non-finite gradient\): checkpoint step3 not written, the checkpoints and final/ on "
        r"disk are the last good ones; --resume from the last checkpoint with a lower --lr or with gradient clipping"),
    "nan gradient, then final/": (
        {"gradient": True}, ["--save-every", "0", "--max-steps", "3"],
        r"error: the weights hold non-finite values after optimizer step 3 .*: final/ not written"),
    "nan gradient, then nan losses": (
        {"gradient": True}, ["--save-every", "0", "--max-nonfinite-batches", "2"],
        r"error: the weights hold non-finite values \(bert\.\S+, .* and \d+ more\), so every loss is too: stopped at "
        r"optimizer step 4 without writing a checkpoint or final/"),
}


@pytest.mark.parametrize("case", NONFINITE)
def test_non_finite_values_stop_the_run_and_keep_the_good_model(case, assets, run_dir, monkeypatch, capsys):
    options, extra, message = NONFINITE[case]
    spoil(monkeypatch, **options)
    before = saved(run_dir)
    rc, err = cli([*common(assets, run_dir), "--resume", "--max-steps", "4", *extra], monkeypatch, capsys)
    assert rc == 1 and re.search(message, error_line(err)), err[-3000:]
    assert saved(run_dir) == before
