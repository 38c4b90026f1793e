"""HiFTTrainer with TrainingArguments(deepspeed=...): the engine is hift_ds.initialize's (one rank, in process)."""
import json
import os
import sys

import pytest
import torch
import transformers

import hift_ds
from hift_ds.optim.optimizer import HiFTOptimizer
from hift_ds.optim.store import MASTER

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _hf_worker as W  # noqa: E402
from conftest import tiny_llama  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K = 5
pytestmark = pytest.mark.usefixtures("single_rank_env")


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    with W.isolated_accelerate():
        yield


def trainer_config(stage: int) -> dict:
    """The shipped Trainer config (every size "auto"), with a DeepSpeed scheduler block and the given stage."""
    with open(os.path.join(ROOT, "ds_configs", "trainer/hift.json")) as f:
        cfg = json.load(f)
    cfg["zero_optimization"] = {"stage": stage, "reduce_bucket_size": 1000}  # several ZeRO-2 buckets per group
    cfg["scheduler"] = {"type": "WarmupDecayLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": "auto",
                                                            "warmup_num_steps": "auto", "total_num_steps": "auto",
                                                            "warmup_type": "linear"}}
    return cfg


class AfterFirstStep(transformers.TrainerCallback):
    """Keeps a copy of the weights after optimizer step 1."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == 1:
            self.weights = {n: p.detach().float().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("stage", [0, 2])
def test_trainer_builds_the_engine_of_hift_ds_initialize(tmp_path, stage):
    steps, peak, warmup = 2 * K, 1e-2, 3
    first = AfterFirstStep()
    # Stage 0 through model_init: the Trainer replaces the model inside train(), before building the engine.
    got = W.run(str(tmp_path), steps=steps, batch=2, deepspeed=trainer_config(stage), bf16=True, learning_rate=peak,
                warmup_steps=warmup, train_sampling_strategy="sequential", callbacks=[first],
                model="init" if stage == 0 else None)
    engine = got["trainer"].model_wrapped
    # HiFT's engine: DeepSpeed at stage 0 with no bf16 wrapper (no fp32 copy of every weight), HiFT's
    # masters in host memory, sharded by HiFT itself at stage 2.
    assert isinstance(engine.optimizer, HiFTOptimizer) and engine.zero_optimization_stage() == 0
    assert not engine.bfloat16_enabled() and engine.optimizer.sharding.stage == stage
    assert all(p.dtype == torch.bfloat16 for p in got["trainer"].model.parameters())
    assert MASTER in engine.optimizer.store.home[0] and engine.optimizer.store.offloaded
    # hift_ds.initialize's timers too: DeepSpeed's throughput timer does not synchronize the device each step.
    assert engine.tput_timer.config.enabled and not engine.tput_timer.config.synchronized
    # Step 1 trained group 0 (the embeddings) only.
    init = tiny_llama().state_dict()
    changed = {n for n, w in first.weights.items() if not torch.equal(w, init[n].to(torch.bfloat16).float())}
    assert changed == set(engine.optimizer.group_param_names(0))
    # The same job by hand through hift_ds.initialize, same micro-batches: the same weights and LRs.
    config = {**trainer_config(stage), "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
              "train_batch_size": 2, "gradient_clipping": 1.0, "bf16": {"enabled": True},
              "optimizer": {"type": "AdamW", "params": {"lr": peak, "betas": [0.9, 0.999], "eps": 1e-8,
                                                        "weight_decay": 0.0}}}
    config["scheduler"]["params"].update(warmup_max_lr=peak, warmup_num_steps=warmup, total_num_steps=steps)
    ref, opt, _, _ = hift_ds.initialize(model=tiny_llama(), config=config)
    data, lrs = W.CountingData(), []
    for step in range(steps):
        lrs.append(opt.param_groups[opt.active_group]["lr"])
        ref.backward(ref(**torch.utils.data.default_collate([data[2 * step], data[2 * step + 1]])).loss)
        ref.step()
    assert [got["lr"][s + 1] for s in range(steps)] == lrs and lrs[0] > 0 and lrs[0] == lrs[K - 1] != lrs[K]
    for name, p in ref.module.named_parameters():
        assert torch.equal(got["weights"][name], p.detach().float()), name
    assert all(v is not None and v > 0 for v in got["grad_norm"].values())  # logged as without HiFT


def test_deepspeed_resume_continues_bit_for_bit_and_saves_the_model(tmp_path):
    job = dict(steps=12, batch=2, deepspeed=trainer_config(2), bf16=True, gradient_accumulation_steps=2,
               hift=None)
    whole = W.run(str(tmp_path / "a"), save_strategy="steps", save_steps=7, **job)
    resumed = W.run(str(tmp_path / "b"), resume=str(tmp_path / "a" / "checkpoint-7"), **job)
    assert resumed["loss"] == whole["loss"] and resumed["lr"] == whole["lr"] and len(whole["loss"]) == 12
    for name, value in whole["weights"].items():
        assert torch.equal(resumed["weights"][name], value), name
    resumed["trainer"].save_model(str(tmp_path / "final"))
    loaded = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "final"))
    for name, p in loaded.named_parameters():  # ZeRO-2 weights are views into HiFT's flat buffers
        assert torch.equal(p.float(), resumed["weights"][name]), name
