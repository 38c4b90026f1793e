"""HiFTTrainer (hift_ds.hf) in one process without DeepSpeed: schedule, accumulation, clipping, precision, resume."""
import math
import os
import sys

import pytest
import torch
import transformers

from hift_ds import HiFTOptimizer
from hift_ds.optim.store import MASTER

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _hf_worker as W  # noqa: E402
from conftest import tiny_llama  # noqa: E402

K = 5  # a 3-layer tiny Llama has 5 units: one group each with group_size 1


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    with W.isolated_accelerate():
        yield


def linear_lr_with_warmup(step: int, peak: float, steps: int, warmup_steps: int) -> float:
    """The LR HiFT's step ``step`` (0-based) trains with: linear warm-up/decay over cycles, cycle c at point c + 1."""
    cycles, warm = math.ceil(steps / K), math.ceil(warmup_steps / K)
    point, total = step // K + 1, cycles + 1
    return peak * (point / warm if point < warm else (total - point) / (total - warm))


def hand_written_hift(steps: int, micro: int, accumulation: int, clip: float, lr_of_step) -> dict:
    """The same job as a plain loop around HiFTOptimizer, micro-batches in dataset order, LR set per step."""
    model = tiny_llama()
    opt = HiFTOptimizer(model, "adamw", group_size=1, lr=0.0, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                        max_grad_norm=clip)
    data, lrs = W.CountingData(), []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_of_step(step)
        for m in range(accumulation):
            first = (step * accumulation + m) * micro
            batch = torch.utils.data.default_collate([data[i] for i in range(first, first + micro)])
            (model(**batch).loss / accumulation).backward()
        lrs.append(opt.param_groups[opt.active_group]["lr"])
        opt.step()
        opt.zero_grad()
    return {"weights": {n: p.detach().clone() for n, p in model.named_parameters()}, "lr": lrs}


def test_trainer_trains_like_a_hand_written_hift_loop(tmp_path):
    """Warm-up + linear decay once per cycle, accumulation over 2 micro-batches, clipping of the active group."""
    steps, warmup, peak, clip = 15, 6, 1e-2, 0.5
    lr_of_step = lambda s: linear_lr_with_warmup(s, peak, steps, warmup)  # noqa: E731
    got = W.run(str(tmp_path), steps=steps, batch=2, gradient_accumulation_steps=2, warmup_steps=warmup,
                learning_rate=peak, max_grad_norm=clip, train_sampling_strategy="sequential")
    want = hand_written_hift(steps, micro=2, accumulation=2, clip=clip, lr_of_step=lr_of_step)
    assert got["trainer"].hift_optimizer.num_groups == K
    # The logged learning_rate is the LR each step trained with; it moves only at cycle boundaries.
    assert [got["lr"][s + 1] for s in range(steps)] == pytest.approx(want["lr"], rel=1e-12)
    cycles = [want["lr"][c:c + K] for c in range(0, steps, K)]
    assert all(len(set(c)) == 1 for c in cycles) and all(a[0] != b[0] for a, b in zip(cycles, cycles[1:]))
    # Clipping happened (the norms logged are the active group's, before clipping) and trained the same way.
    assert max(got["grad_norm"].values()) > clip
    for name, value in want["weights"].items():
        torch.testing.assert_close(got["weights"][name], value, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    losses = list(got["loss"].values())
    assert sum(losses[-K:]) < 0.9 * sum(losses[:K]), losses


def test_cosine_schedule_moves_once_per_cycle(tmp_path):
    steps, peak = 3 * K, 1e-2
    got = W.run(str(tmp_path), steps=steps, batch=2, lr_scheduler_type="cosine", learning_rate=peak)
    # 3 cycles, no warm-up: cycle c at 0.5 (1 + cos(pi c / 3)) of the peak
    want = [peak * 0.5 * (1 + math.cos(math.pi * (s // K) / 3)) for s in range(steps)]
    assert [got["lr"][s + 1] for s in range(steps)] == pytest.approx(want, rel=1e-12)


def test_resume_continues_bit_for_bit(tmp_path):
    """bf16 weights with fp32 masters offloaded, random group order, saved mid-cycle: resume equals no break."""
    job = dict(steps=12, batch=2, gradient_accumulation_steps=2, warmup_steps=3,
               hift={"group_size": 1, "strategy": "random", "seed": 3, "offload": {"device": "cpu"}})
    whole = W.run(str(tmp_path / "a"), model=tiny_llama(dtype=torch.bfloat16), save_strategy="steps", save_steps=7,
                  **job)
    ckpt = str(tmp_path / "a" / "checkpoint-7")
    assert {"model.safetensors", "optimizer.pt", "rng_state.pth", "scheduler.pt"} <= set(os.listdir(ckpt))
    resumed = W.run(str(tmp_path / "b"), model=tiny_llama(dtype=torch.bfloat16), resume=ckpt, **job)
    # Steps 1-7 come back from the checkpoint's trainer_state.json, 8-12 are trained again.
    assert resumed["trainer"].state.global_step == 12 and list(resumed["loss"]) == list(range(1, 13))
    assert resumed["loss"] == whole["loss"] and resumed["lr"] == whole["lr"]
    assert resumed["grad_norm"] == whole["grad_norm"]
    for name, value in whole["weights"].items():
        assert torch.equal(resumed["weights"][name], value), name
    a, b = (r["trainer"].hift_optimizer.state_dict() for r in (whole, resumed))
    assert a["hift"] == b["hift"] and a["param_groups"] == b["param_groups"]
    assert MASTER in a["state"][0]  # bf16 weights: fp32 masters kept by HiFT, every group bit-for-bit
    for sa, sb in zip(a["state"], b["state"]):
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert all(p.dtype == torch.bfloat16 for p in whole["trainer"].model.parameters())


def test_gradient_checkpointing_trains_the_same(tmp_path):
    plain = W.run(str(tmp_path / "a"), steps=K, batch=2)
    ckpt = W.run(str(tmp_path / "b"), steps=K, batch=2, **{W.CHECKPOINTING: True})
    assert W.is_checkpointing(ckpt["trainer"].model)
    for name, value in plain["weights"].items():
        torch.testing.assert_close(ckpt["weights"][name], value, msg=lambda m: f"{name}: {m}")
    assert all(not torch.equal(plain["weights"][n], tiny_llama().state_dict()[n]) for n in plain["weights"])


def test_save_model_and_evaluate_as_without_hift(tmp_path):
    got = W.run(str(tmp_path / "run"), steps=K, batch=2)
    trainer = got["trainer"]
    trainer.save_model(str(tmp_path / "final"))
    loaded = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "final"))
    for name, p in loaded.named_parameters():
        assert torch.equal(p, got["weights"][name]), name
    assert all(p.requires_grad for p in loaded.parameters())
    metrics = trainer.evaluate(W.CountingData(n=8))
    plain = transformers.Trainer(model=loaded, args=trainer.args)
    assert metrics["eval_loss"] == pytest.approx(plain.evaluate(W.CountingData(n=8))["eval_loss"], rel=1e-6)


def test_readme_trainer_snippet_runs(tmp_path, monkeypatch):
    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")).read()
    snippet = readme.split("### With the Hugging Face Trainer")[1].split("```python\n")[1].split("```")[0]
    monkeypatch.chdir(tmp_path)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2,
                                          report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    ns = {"model": tiny_llama(), "training_args": args, "train_dataset": W.CountingData()}
    exec(snippet, ns)
    assert ns["trainer"].hift_optimizer.schedule.steps_done == 3 and ns["trainer"].hift_optimizer.store.offloaded
    assert os.path.isfile(tmp_path / "out" / "final" / "model.safetensors")
