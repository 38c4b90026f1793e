"""HiFTSFTTrainer: TRL's SFTTrainer with HiFT, on prompt/completion instruction data and a model loaded by path."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _hf_worker as W  # noqa: E402
from tinymodel import WORDS, make_causal_lm  # noqa: E402

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    with W.isolated_accelerate():
        yield


def test_sft_trainer_trains_with_hift_on_instruction_data(tmp_path):
    from hift_ds import HiFTOptimizer
    from hift_ds.hf import HiFTSFTTrainer

    torch.manual_seed(0)  # make_causal_lm initialises from the global generator
    model_dir = make_causal_lm(str(tmp_path / "model"))  # 2 layers: 4 units, 4 groups
    data = datasets.Dataset.from_list([{"prompt": f"the movie was {w}", "completion": f" {w} {w} {w}"}
                                       for w in WORDS[:10]] * 4)
    k, steps, peak = 4, 12, 2e-2
    args = trl.SFTConfig(output_dir=str(tmp_path / "out"), max_steps=steps, per_device_train_batch_size=4,
                         learning_rate=peak, lr_scheduler_type="linear", logging_steps=1, report_to=[], use_cpu=True,
                         save_strategy="no", max_length=32, seed=0, disable_tqdm=True)
    trainer = HiFTSFTTrainer(model=model_dir, args=args, train_dataset=data, hift={"group_size": 1})
    trainer.train()
    assert isinstance(trainer.hift_optimizer, HiFTOptimizer) and trainer.hift_optimizer.num_groups == k
    assert W.is_checkpointing(trainer.model)  # SFTConfig's default, with HiFT's frozen lower groups
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["learning_rate"] for h in logs] == pytest.approx([peak * (3 - s // k) / 3 for s in range(steps)])
    assert all("mean_token_accuracy" in h for h in logs)  # TRL's own metrics still logged
    losses = [h["loss"] for h in logs]
    assert sum(losses[-k:]) < 0.95 * sum(losses[:k]), losses
