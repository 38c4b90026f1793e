"""One HiFT Trainer job on a tiny Llama: imported by test_hf*.py, and run by torchrun for the multi-process tests.

``python -m torch.distributed.run --nproc_per_node 2 tests/_hf_worker.py OUT.pt [--deepspeed none CFG ...]``
runs, for each config in turn, a job and then a short bf16 job that starts from a different
initialisation on each rank, and saves each rank's logs and final weights to OUT.pt.rank<r>.
"""
import argparse
import contextlib
import os
import sys
from collections.abc import Iterator

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import transformers  # noqa: E402

from conftest import tiny_llama  # noqa: E402

# Schedule and optimizer settings shared by every job unless a test overrides them.
DEFAULTS = dict(learning_rate=1e-2, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=0,
                lr_scheduler_type="linear", max_grad_norm=1.0, disable_tqdm=True)


class CountingData(torch.utils.data.Dataset):
    """Learnable sequences: each cycles through five tokens from its own start."""

    def __init__(self, n: int = 64, seq: int = 8):
        self.n, self.seq = n, seq

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        ids = 10 + (torch.arange(self.seq) + i) % 5
        return {"input_ids": ids, "labels": ids.clone()}


def reset_accelerate() -> None:
    """Forget accelerate's process-wide state: a DeepSpeed trainer would otherwise leak into the next one."""
    from accelerate.state import AcceleratorState
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    AcceleratorState._reset_state(True)
    unset_hf_deepspeed_config()


@contextlib.contextmanager
def isolated_accelerate() -> Iterator[None]:
    """accelerate's state and the variables it sets (ACCELERATE_USE_DEEPSPEED, OMP_NUM_THREADS) undone afterwards."""
    env = dict(os.environ)
    reset_accelerate()
    try:
        yield
    finally:
        reset_accelerate()
        os.environ.clear()
        os.environ.update(env)


# transformers renamed gradient checkpointing to activation checkpointing (TrainingArguments and the
# model's flag); the tests use whichever name the installed version has, so they run on both.
CHECKPOINTING = ("activation_checkpointing" if "activation_checkpointing" in
                 transformers.TrainingArguments.__dataclass_fields__ else "gradient_checkpointing")


def is_checkpointing(model) -> bool:
    """Whether activation (gradient) checkpointing is on for ``model``, under either name."""
    return bool(getattr(model, f"is_{CHECKPOINTING}"))


def run(out_dir: str, steps: int = 10, batch: int = 4, hift: dict | None = None, model=None, resume=None,
        callbacks: list | None = None, **training_args) -> dict:
    """Train a HiFTTrainer; its per-step log (loss, learning_rate, grad_norm), final weights and the trainer."""
    from hift_ds.hf import HiFTTrainer

    args = transformers.TrainingArguments(output_dir=out_dir, max_steps=steps, per_device_train_batch_size=batch,
                                          **{**DEFAULTS, **training_args})
    # model="init": built by the Trainer through model_init (again inside train()).
    models = dict(model_init=lambda: tiny_llama()) if model == "init" else dict(
        model=model if model is not None else tiny_llama())
    trainer = HiFTTrainer(**models, args=args, callbacks=callbacks, train_dataset=CountingData(), hift=hift)
    trainer.train(resume_from_checkpoint=resume)
    steps_logged = [h for h in trainer.state.log_history if "loss" in h]
    return {"loss": {h["step"]: h["loss"] for h in steps_logged},
            "lr": {h["step"]: h["learning_rate"] for h in steps_logged},
            "grad_norm": {h["step"]: h.get("grad_norm") for h in steps_logged},
            "weights": {n: p.detach().float().clone() for n, p in trainer.model.named_parameters()},
            "trainer": trainer}


def main() -> None:
    """torchrun entry point: the jobs of each --deepspeed config (or none), every rank saves its results."""
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--deepspeed", nargs="+", default=["none"], help="configs to run in turn; none: no DeepSpeed")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    opts = parser.parse_args()
    out_dir, rank = os.path.dirname(opts.out), int(os.environ["RANK"])
    results = {}
    for name in opts.deepspeed:
        config = None if name == "none" else name
        reset_accelerate()
        result = run(out_dir, steps=opts.steps, batch=opts.batch, deepspeed=config)
        result = {k: v for k, v in result.items() if k != "trainer"}
        # Then one cycle in bf16 (fp32 masters in HiFT's store) from a different initialisation on
        # each rank: rank 0's weights must reach every rank's weights and masters before the first update.
        reset_accelerate()
        hift = None if config else {"offload": {"device": "cpu"}}  # a DeepSpeed config has its own block
        result["bf16_weights"] = run(out_dir, steps=5, batch=opts.batch, deepspeed=config, hift=hift, bf16=True,
                                     model=tiny_llama(seed=rank, dtype=torch.bfloat16))["weights"]
        results[name] = result
    torch.save(results, f"{opts.out}.rank{rank}")
    torch.distributed.destroy_process_group()

if __name__ == "__main__":
    main()
