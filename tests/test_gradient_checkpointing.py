"""Gradient checkpointing with HiFT: the same trajectory as without it (optimizer and launch/train.py)."""
import json
import os

import pytest
import torch
from torch import nn

from conftest import batch, tiny_llama
from hift_ds import HiFTOptimizer, train
from hift_ds.activations import enable_gradient_checkpointing
from hift_ds.profile import SavedTensorMeter
from tinymodel import instruction_jsonl, make_causal_lm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _trajectory(checkpointing: bool, dtype, steps: int, **kw):
    model = tiny_llama(layers=3, dtype=dtype)
    if checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    opt = HiFTOptimizer(model, "adamw", lr=1e-2, weight_decay=0.1, **kw)
    losses, saved = [], []
    for s in range(steps):
        x = batch(s)
        with SavedTensorMeter(model) as meter:
            loss = model(input_ids=x, labels=x).loss
        saved.append(meter.bytes)
        opt.backward(loss)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return model, losses, saved


@pytest.mark.parametrize("dtype,kw", [(torch.float32, {}), (torch.bfloat16, dict(offload="cpu", strategy="random"))],
                         ids=["fp32", "bf16-offload-random"])
def test_hift_with_checkpointing_follows_the_same_trajectory(dtype, kw):
    a, losses_a, saved_a = _trajectory(False, dtype, 10, **kw)
    b, losses_b, saved_b = _trajectory(True, dtype, 10, **kw)
    assert losses_a == losses_b
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
    # It really checkpointed: the most activations kept for a backward (the lowest groups' steps) went down.
    assert max(saved_b) < max(saved_a) / 2, (saved_a, saved_b)


def test_train_py_gradient_checkpointing_same_log(tmp_path, monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    lm, data = make_causal_lm(str(tmp_path / "lm")), instruction_jsonl(str(tmp_path / "d.jsonl"))
    common = ["--model", lm, "--data", data, "--max-steps", "6", "--lr", "1e-2", "--batch-size", "4",
              "--max-length", "16", "--no-progress", "--log-every", "0",
              "--deepspeed", os.path.join(ROOT, "ds_configs", "hift_fp32.json")]
    train.main([*common, "--output-dir", str(tmp_path / "a")])
    train.main([*common, "--output-dir", str(tmp_path / "b"), "--gradient-checkpointing"])
    log = lambda d: [json.loads(line) for line in open(tmp_path / d / "train_log.jsonl")]  # noqa: E731
    assert log("a") == log("b") and len(log("a")) == 6


def test_models_without_checkpointing_support_are_refused():
    with pytest.raises(ValueError, match="does not support gradient checkpointing; drop --gradient-checkpointing"):
        enable_gradient_checkpointing(nn.Linear(2, 2))


def test_saved_tensor_meter_counts_activations_once_and_not_weights():
    lin = nn.Linear(4, 3)
    x = torch.randn(5, 4)
    with SavedTensorMeter(lin) as meter:
        lin(x).sum()
    assert meter.bytes == x.numel() * 4  # the input, saved for the weight's gradient; the weight itself not
    with SavedTensorMeter(lin) as meter:
        h = lin(x)
        (h * h).sum()  # h is saved twice by the product: counted once
    assert meter.bytes == x.numel() * 4 + h.numel() * 4


def test_frozen_groups_below_the_active_one_keep_no_activations():
    """DESIGN §2: autograd stores no activations below the lowest active unit."""
    model = tiny_llama(layers=4)
    opt = HiFTOptimizer(model, "sgd", lr=0.1, strategy="top2down")  # head first, then blocks, embeddings last
    saved = []
    for s in range(opt.num_groups):
        x = batch(s)
        with SavedTensorMeter(model) as meter:
            loss = model(input_ids=x, labels=x).loss
        saved.append(meter.bytes)
        loss.backward()
        opt.step()
        opt.zero_grad()
    blocks = saved[:-1]  # head, block 3, ..., block 0 (the embeddings' step last)
    assert all(a < b for a, b in zip(blocks, blocks[1:])), saved  # grows as the active group moves down
    assert saved[0] < saved[-2] / 3, saved
