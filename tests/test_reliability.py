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
from hift_ds.train import manifest

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
    lines = [line[line.index("error: "):] for line in err.splitlines() if re.match(r"([^:]*: )?error: ", line)]
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
        assert same_checkpoint(run_dir / "checkpoints" / "step2", finished / "checkpoints" / "step2")


CLOCK = ("train_seconds", "eval_seconds")  # a checkpoint's seconds of training so far: never the same twice


def same_checkpoint(a, b) -> bool:
    """The same files, byte for byte, but the client state's clock (loaded and compared without it); a's manifest
    verifies a's files."""
    files_a, files_b = snapshot(a), snapshot(b)
    for files in (files_a, files_b):
        del files[STATES], files["manifest.json"]
    states = [{k: v for k, v in torch.load(d / STATES, weights_only=False).items() if k not in CLOCK} for d in (a, b)]
    return files_a == files_b and _same(*states) and manifest.problem(str(a)) is None


def _same(x, y) -> bool:
    if isinstance(x, torch.Tensor):
        return isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y)
    if isinstance(x, dict):
        return isinstance(y, dict) and x.keys() == y.keys() and all(_same(x[k], y[k]) for k in x)
    if isinstance(x, (list, tuple)):
        return type(x) is type(y) and len(x) == len(y) and all(_same(u, v) for u, v in zip(x, y))
    return x == y


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
    (run_dir / "eval_log.jsonl").write_text('{"step": 0}\n')  # a learning curve this run does not record
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


# ---- final/ swapped in with no moment without a model --------------------------------------------------------

def _process(args: list[str], script: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([ROOT, *filter(None, [env.get("PYTHONPATH")])]))
    return subprocess.run([sys.executable, script, *args], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("point", ["exchange", "aside"])
def test_sigkill_while_final_is_replaced_leaves_a_whole_model(point, assets, finished, run_dir, tmp_path):
    """Killed while the new final/ replaces the old: final/ holds one whole model (after the next start's recovery)."""
    from hift_ds import atomic
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    if point == "exchange" and not atomic.exchange(str(tmp_path / "a"), str(tmp_path / "b")):
        pytest.skip("this kernel or filesystem cannot swap names (renameat2 RENAME_EXCHANGE)")
    killed = _process([point, *common(assets, run_dir), "--resume", "--max-steps", "3"],
                      os.path.join(ROOT, "tests", "_kill_in_swap.py"))
    assert killed.returncode == -9, killed.stderr[-3000:]
    old, new = weights(finished / "final"), torch.load(run_dir / "checkpoints" / "step3" / STATES,
                                                         weights_only=False)["module"]
    if point == "exchange":  # swapped in one step: the new model is in place, the old one under the temporary name
        assert all(torch.equal(weights(run_dir / "final")[k], new[k]) for k in old)
    else:  # the moment without final/: the old one is aside, and the next start puts it back
        assert not (run_dir / "final").exists() and (run_dir / f"final{atomic.ASIDE}").is_dir()
    assert len([n for n in os.listdir(run_dir) if n.startswith("final.tmp")]) == 1
    atomic.recover_dir(str(run_dir / "final"))  # what the next run does first
    assert [n for n in os.listdir(run_dir) if n.startswith("final")] == ["final"]
    kept = weights(run_dir / "final")
    assert all(torch.equal(kept[k], (new if point == "exchange" else old)[k]) for k in old)


# ---- bad input ----------------------------------------------------------------------------------------------

def _records(path, records) -> str:
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return str(path)


def _gzipped(assets, d) -> list[str]:
    import gzip
    with open(assets["data"], "rb") as f, gzip.open(d / "data.jsonl.gz", "wb") as g:
        g.write(f.read())
    return ["--data", str(d / "data.jsonl.gz")]


def _three_labels(assets, d) -> list[str]:
    return ["--data", _records(d / "three.jsonl", [{"text": "good movie", "label": i % 3} for i in range(30)])]


def _zero_quantized_weights(assets, d, monkeypatch) -> list[str]:
    cfg = json.load(open(os.path.join(ROOT, "ds_configs", "hift_fp32.json")))
    cfg["zero_optimization"] = {"stage": 3, "zero_quantized_weights": True}
    (d / "z3q.json").write_text(json.dumps(cfg))
    from hift_ds.train import loop
    # Refused from the config alone: the model (which ZeRO-3 would build partitioned) is never loaded.
    monkeypatch.setattr(loop, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    return ["--deepspeed", str(d / "z3q.json")]


def _nan_weight(assets, d) -> list[str]:
    import transformers
    model = transformers.AutoModelForSequenceClassification.from_pretrained(assets["model"])
    with torch.no_grad():
        model.classifier.bias[0] = float("nan")
    model.save_pretrained(d / "nan_model")
    transformers.AutoTokenizer.from_pretrained(assets["model"]).save_pretrained(d / "nan_model")
    return ["--model", str(d / "nan_model")]


def _text(assets, d, texts) -> list[str]:
    return ["--data", _records(d / "texts.jsonl", [{"text": t, "label": i // 2 % 2} for i, t in enumerate(texts)])]


BAD_INPUT = {
    # name: (options or a function (assets, dir[, monkeypatch]) -> options, exit status, error or warning pattern)
    "--data x.jsonl.gz (read as it is)": (_gzipped, 0, None),
    "records with a null text (skipped)": (
        lambda a, d: _text(a, d, ["good movie", None, "bad plot", 7] * 10), 0,
        r"texts.jsonl: skipped 20 of 40 records whose text is not a string or whose label is not a string or number "
        r"\(the first: record 2, text None\)"),
    "every text null": (lambda a, d: _text(a, d, [None] * 10), 2,
                        r"error: \S+texts.jsonl: no record has a text string and a label \(string or number\); record "
                        r"1's text is None$"),
    "a single label": (
        lambda a, d: ["--data", _records(d / "one.jsonl", [{"text": "good movie", "label": 1}] * 20)], 2,
        r"error: \S+one.jsonl: every training record has the label 1: a classifier needs two labels at least; add "
        r"records of the other classes$"),
    "a saved classifier with another label count": (
        _three_labels, 2,
        r"error: --model \S+ is a classifier with 2 labels \(\['LABEL_0', 'LABEL_1'\]\), the data has 3; pass data "
        r"with its 2 labels, or the model it was fine-tuned from \(which gets a new head for the data's labels\)$"),
    "zero_quantized_weights at ZeRO-3": (
        _zero_quantized_weights, 2,
        r"error: zero_optimization.zero_quantized_weights is not supported with HiFT at stage 3: .*; remove it$"),
    "--model that does not exist": (
        lambda a, d: ["--model", str(d / "runs" / "nope" / "final")], 2,
        r"error: --model '\S+/runs/nope/final' does not exist; pass a model directory \(a save_pretrained folder\) "
        r"or a Hugging Face hub name$"),
    "--model that is a file": (
        lambda a, d: ["--model", os.path.join(a["model"], "config.json")], 2,
        r"error: --model '\S+config.json' is a file; pass the model's directory \(a save_pretrained folder: "
        r"config.json and the weights\) or a Hugging Face hub name$"),
    "--model with a nan weight": (
        _nan_weight, 2,
        r"error: --model \S+nan_model holds non-finite weights \(classifier.bias\); training cannot start from them: "
        r"pass a model whose weights are finite$"),
    "--data that is a directory": (
        lambda a, d: ["--data", str(d)], 2,
        r"error: data path '\S+' is a directory; pass the .jsonl file in it \(or a .jsonl.gz\)$"),
    "--data that is not UTF-8": (
        lambda a, d: (d / "latin1.jsonl").write_bytes('{"text": "caf\xe9", "label": 1}\n'.encode("latin-1")) and
        ["--data", str(d / "latin1.jsonl")], 2,
        r"error: \S+latin1.jsonl:1: not UTF-8 text; the data must be JSONL in UTF-8, plain or gzip-compressed"),
    "--eval-data of another task": (
        lambda a, d: ["--eval-data", _records(d / "instr.jsonl", [{"instruction": "a", "output": "b"}])], 2,
        r"error: --eval-data \S+instr.jsonl holds instruction records, --data \S+ classification records; pass "
        r"held-out records of the same task$"),
    "--mode fpft --strategy random --group-size 3": (
        ["--mode", "fpft", "--strategy", "random", "--group-size", "3"], 2,
        r"error: --group-size and --strategy set HiFT's groups, which --mode fpft does not have; drop them, or use "
        r"--mode hift$"),
    "--mode badam --group-size 2": (
        ["--mode", "badam", "--group-size", "2"], 2,
        r"error: --group-size sets HiFT's groups, which --mode badam does not have; drop it, or use --mode hift$"),
}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_is_one_clear_line(case, assets, tmp_path, monkeypatch, capsys, caplog):
    given, status, message = BAD_INPUT[case]
    out = tmp_path / "out"
    if callable(given):
        given = given(assets, tmp_path, monkeypatch) if "monkeypatch" in given.__code__.co_varnames else \
            given(assets, tmp_path)
    with caplog.at_level(logging.WARNING, logger="hift_ds"):
        rc, err = cli([*common(assets, out), "--max-steps", "1", *given], monkeypatch, capsys)
    assert rc == status, err[-3000:]
    if status:
        assert re.search(message, error_line(err)), err[-3000:]
        assert not out.exists()  # stopped before anything was written
    elif message:
        assert re.search(message, caplog.text), caplog.text


def test_launch_train_exits_2_with_one_line(assets, tmp_path):
    """The command line itself, in its own process: exit status 2, one ``error:`` line, no traceback."""
    proc = _process(["--model", assets["model"], "--data", str(tmp_path), *FAST], os.path.join(ROOT, "launch",
                                                                                                 "train.py"))
    assert proc.returncode == 2 and "is a directory" in error_line(proc.stderr)


@pytest.mark.parametrize("where, message", [
    ("file", r"--out \S+: is a file; pass a directory \(created if missing\)$"),
    ("under a file", r"--out \S+: \S+file is a file, so no directory can be made under it; pass another directory$"),
    ("unwritable", r"--out /proc/hift-profile: cannot write there \(.+\); pass a directory you can write to$")])
def test_profiler_out_that_cannot_be_written_is_one_line(where, message, tmp_path, capsys):
    from hift_ds.profile.cli import main
    (tmp_path / "file").write_text("x")
    out = {"file": tmp_path / "file", "under a file": tmp_path / "file" / "profile", "unwritable": "/proc/hift-profile"}
    with pytest.raises(SystemExit) as exc:
        main(["--out", str(out[where]), "--modes", "hift", "--steps", "1"])
    assert exc.value.code == 2 and re.search(message, error_line(capsys.readouterr().err))


def test_hift_optimizer_on_a_model_without_parameters_says_so():
    from torch import nn

    from hift_ds import HiFTOptimizer
    with pytest.raises(ValueError, match=r"^Module has no parameters, so HiFT has nothing to train; pass the model to "
                                         r"fine-tune \(its weights loaded\), not an empty or parameter-free module$"):
        HiFTOptimizer(nn.Module(), "adamw", lr=1e-3)



# ---- the Trainer's warm-up --------------------------------------------------------------------------------------

VANISHED = "HiFT: the warm-up of {w} optimizer steps is gone: the LR moves once per cycle of 5 steps (one per group)"


@pytest.mark.parametrize("warmup, warned", [(3, True), (5, True), (15, False)])
@pytest.mark.parametrize("path", ["Trainer", "hift_ds.initialize"])
def test_a_warm_up_that_vanishes_in_cycles_is_warned_about_on_both_paths(path, warmup, warned, tmp_path, caplog):
    """warmup <= k steps is one cycle, which already trains at the peak: the same warning from either path."""
    from conftest import tiny_llama
    from hift_ds import HiFTOptimizer

    optimizer = HiFTOptimizer(tiny_llama(), "adamw", lr=1e-3)  # 5 units, 5 groups
    with caplog.at_level(logging.WARNING, logger="hift_ds"):
        if path == "Trainer":
            import transformers

            from hift_ds.hf.schedule import trainer_schedule_in_cycles
            args = transformers.TrainingArguments(output_dir=str(tmp_path), warmup_steps=warmup, learning_rate=1e-3,
                                                  max_steps=40, report_to=[], use_cpu=True)
            trainer_schedule_in_cycles(args, optimizer, 40)
            setting = "warmup_steps (or warmup_ratio)"
        else:
            from hift_ds.deepspeed.scheduler import scheduler_from_config
            # DeepSpeed's default log-rate warm-up: a warm-up of 2 iterations (its minimum) peaks at the second.
            scheduler_from_config({"type": "WarmupDecayLR", "params": {
                "warmup_num_steps": warmup, "total_num_steps": 40, "warmup_max_lr": 1e-3}}, optimizer)
            setting = "scheduler.params.warmup_num_steps"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert [w for w in warnings if w.startswith(VANISHED.format(w=warmup))] == ([
        f"{VANISHED.format(w=warmup)}, and the first cycle already trains at the peak LR 0.001. For a warm-up, set "
        f"{setting} to several cycles (a few times 5 steps), or use fewer groups (a larger group_size)"] if warned
        else []), warnings
