"""Helpers shared by tests/test_engine.py and its subprocess runs of ``hift_ds.initialize``.

Importing this module has no side effects. Run as a script it does one of:

  python tests/_engine_worker.py ckpt-ab OUT      run A (uninterrupted) and run B (stop mid-cycle, save_checkpoint)
  python tests/_engine_worker.py ckpt-c OUT       run C: new process, load_checkpoint, continue to the end
  torchrun --nproc_per_node 2 tests/_engine_worker.py dist OUT
                                                  two data-parallel ranks, each on its half of every batch

Every run writes its final parameters, optimizer state and the sequence of active groups under OUT.
"""
from __future__ import annotations

import json
import os
import sys

import torch

VOCAB = 100


def tiny_llama(layers: int = 2, seed: int = 0):
    """A seeded tiny LlamaForCausalLM (layers + 2 HiFT units)."""
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                                   num_key_value_heads=2, intermediate_size=64, vocab_size=VOCAB,
                                   max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg)


def tokens(step: int, micro: int = 0, size: int = 2, seq: int = 8) -> torch.Tensor:
    """Token ids fixed by (step, micro-batch index) alone, so any process regenerates them."""
    g = torch.Generator().manual_seed(7919 * step + 31 * micro + 12345)
    return torch.randint(0, VOCAB, (size, seq), generator=g)


def ds_config(micro: int = 2, gas: int = 1, world: int = 1, optimizer: dict | None = None, hift: dict | None = None,
              **extra) -> dict:
    cfg = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": gas,
           "train_batch_size": micro * gas * world,
           "optimizer": optimizer or {"type": "AdamW", "params": {"lr": 1e-2, "betas": [0.9, 0.99],
                                                                   "eps": 1e-8, "weight_decay": 0.1}},
           "hift": hift if hift is not None else {"group_size": 1},
           "gradient_clipping": 0.0, "steps_per_print": 10 ** 9, "wall_clock_breakdown": False}
    cfg.update(extra)
    return cfg


def train_engine(engine, optimizer, start: int, stop: int, micro: int, gas: int, rank: int = 0, world: int = 1,
                 record: list | None = None, lrs: list | None = None) -> None:
    """Optimizer steps ``start .. stop-1``; rank r takes rows [r*micro, (r+1)*micro) of each batch."""
    for s in range(start, stop):
        if record is not None:
            record.append(optimizer.active_group)
        if lrs is not None:
            lrs.append(optimizer.param_groups[optimizer.active_group]["lr"])
        for i in range(gas):
            x = tokens(s, i, size=micro * world)[rank * micro:(rank + 1) * micro].to(engine.device)
            loss = engine(input_ids=x, labels=x).loss
            engine.backward(loss)
            engine.step()


def params_of(module) -> dict:
    return {n: p.detach().cpu().clone() for n, p in module.named_parameters()}


# ---- checkpoint runs ---------------------------------------------------------------------------
TOTAL_STEPS = 12  # 3 cycles of 4 groups
STOP_AT = 6       # mid-cycle: cycle 1, index 2
VARIANTS = {
    "fp32": dict(gas=1, extra={}),
    "bf16": dict(gas=2, extra={"bf16": {"enabled": True}}),
}


def ckpt_config(variant: str) -> dict:
    v = VARIANTS[variant]
    return ds_config(micro=2, gas=v["gas"], hift={"group_size": 1, "strategy": "random", "seed": 3},
                     scheduler={"type": "WarmupDecayLR",
                                "params": {"warmup_min_lr": 1e-3, "warmup_max_lr": 1e-2, "warmup_num_steps": 4,
                                           "total_num_steps": 16, "warmup_type": "linear"}},
                     gradient_clipping=1.0, **v["extra"])


def _dump(path: str, engine, optimizer, order: list, lrs: list) -> None:
    torch.save({"params": params_of(engine.module), "optimizer": optimizer.state_dict(), "order": order, "lrs": lrs,
                "steps_done": optimizer.schedule.steps_done, "global_steps": engine.global_steps}, path)


def run_ckpt_ab(out: str) -> None:
    import hift_ds

    for variant in VARIANTS:
        gas = VARIANTS[variant]["gas"]
        # A: uninterrupted.
        engine, opt, _, _ = hift_ds.initialize(model=tiny_llama(), config=ckpt_config(variant))
        order, lrs = [], []
        train_engine(engine, opt, 0, TOTAL_STEPS, 2, gas, record=order, lrs=lrs)
        _dump(os.path.join(out, f"A-{variant}.pt"), engine, opt, order, lrs)
        # B: same start, stop mid-cycle and save.
        engine, opt, _, _ = hift_ds.initialize(model=tiny_llama(), config=ckpt_config(variant))
        order, lrs = [], []
        train_engine(engine, opt, 0, STOP_AT, 2, gas, record=order, lrs=lrs)
        assert opt.schedule.index != 0, "the checkpoint must be taken mid-cycle"
        engine.save_checkpoint(os.path.join(out, f"ckpt-{variant}"), tag="mid")
        _dump(os.path.join(out, f"B-{variant}.pt"), engine, opt, order, lrs)


def run_ckpt_c(out: str) -> None:
    import hift_ds

    for variant in VARIANTS:
        gas = VARIANTS[variant]["gas"]
        # A different seed: the weights must come from the checkpoint, not from the initialisation.
        engine, opt, _, _ = hift_ds.initialize(model=tiny_llama(seed=99), config=ckpt_config(variant))
        path, _ = engine.load_checkpoint(os.path.join(out, f"ckpt-{variant}"), tag="mid")
        assert path is not None, "load_checkpoint found nothing"
        order, lrs = [], []
        resumed_at = opt.schedule.steps_done
        train_engine(engine, opt, resumed_at, TOTAL_STEPS, 2, gas, record=order, lrs=lrs)
        _dump(os.path.join(out, f"C-{variant}.pt"), engine, opt, order, lrs)
        with open(os.path.join(out, f"C-{variant}.json"), "w") as f:
            json.dump({"resumed_at": resumed_at}, f)


# ---- two data-parallel ranks -------------------------------------------------------------------
DIST_STEPS = 8   # 2 cycles of 4 groups
DIST_MICRO = 2   # per rank; the single-process reference uses 2 * DIST_MICRO


DIST_STAGES = (0, 1, 2)


def dist_config(world: int, stage: int = 0) -> dict:
    return ds_config(micro=DIST_MICRO * 2 // world, gas=1, world=world, zero_optimization={"stage": stage},
                     hift={"group_size": 1, "strategy": "random", "seed": 5})


def run_dist(out: str) -> None:
    import hift_ds

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    assert world == 2, world
    stages = [int(s) for s in sys.argv[3].split(",")] if len(sys.argv) > 3 else DIST_STAGES
    for stage in stages:
        try:
            engine, opt, _, _ = hift_ds.initialize(model=tiny_llama(), config=dist_config(world, stage))
            assert engine.world_size == 2 and engine.dp_world_size == 2
            order: list = []
            train_engine(engine, opt, 0, DIST_STEPS, DIST_MICRO, 1, rank=rank, world=world, record=order)
            _dump(os.path.join(out, f"dist-z{stage}-rank{rank}.pt"), engine, opt, order, [])
        except Exception as e:  # keep going: the test reports the failing stage with this message
            import traceback

            with open(os.path.join(out, f"dist-z{stage}-rank{rank}.err"), "w") as f:
                f.write(f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
        torch.distributed.barrier()
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    mode, out = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if mode != "dist":
        for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1").items():
            os.environ.setdefault(k, v)
        assert "MASTER_PORT" in os.environ, "set MASTER_PORT to a free port"
    {"ckpt-ab": run_ckpt_ab, "ckpt-c": run_ckpt_c, "dist": run_dist}[mode](out)
    if mode != "dist" and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
