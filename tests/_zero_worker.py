"""Worker for tests/test_zero.py, run under torchrun: HiFT at ZeRO stages 0/1/2 on N gloo ranks.

Every run uses the same global batch of 8 per step, split evenly over the ranks, so results are
comparable across stages and world sizes. ``phases`` is a comma-separated list run in one launch:

  stages    stages 0/1/2 side by side (and, on 2 ranks, fp16)
  save      each checkpoint variant trains to mid-cycle, saves to CKPT/w<N>/<variant>, and goes on
            uninterrupted to the end
  resume<M> each variant loads CKPT/w<M>/<variant> (saved by M ranks) and trains to the same end

Rank 0 writes what the test checks to OUT/<phase>_w<N>.pt.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

import hift_ds  # noqa: E402
from conftest import batch, tiny_llama  # noqa: E402

OPTS = {"adamw": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.1}},
        "sgd": {"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9}}}
BUCKET = 3000  # stage-2 reduce_bucket_size: every block group is reduced in several buckets
# Checkpoints: ZeRO-2 with several buckets per group, per optimizer and precision.
CKPT_VARIANTS = [(opt, dtype) for opt in OPTS for dtype in ("fp32", "bf16")]
SAVE_AT, STOP_AT = 7, 12  # 5 groups: saved mid-cycle 1, resumed across the boundary into cycle 2


def engine_for(stage: int, opt: str, world: int, gas: int = 1, dtype: str = "fp32", scale_power: int = 12):
    model = tiny_llama()
    # Small stage-2 buckets so a group is reduced in several pieces during backward.
    zero = {"stage": stage, "reduce_bucket_size": BUCKET} if stage == 2 else {"stage": stage}
    cfg = {"train_micro_batch_size_per_gpu": 8 // world // gas, "gradient_accumulation_steps": gas,
           "optimizer": OPTS[opt], "gradient_clipping": 1.0, "zero_optimization": zero,
           "hift": {"strategy": "random", "seed": 1}}
    if dtype == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif dtype == "fp16":
        cfg["fp16"] = {"enabled": True, "initial_scale_power": scale_power, "hysteresis": 1}
    engine, optimizer, _, _ = hift_ds.initialize(model=model, config=cfg)
    return model, engine, optimizer


def run(engine, rank: int, world: int, start: int, stop: int) -> int:
    """Train steps [start, stop); the ZeRO-2 buckets started during backward (before each step), summed."""
    gas, per_rank = engine.gradient_accumulation_steps(), 8 // world
    reducer = getattr(engine.optimizer.sharding, "reducer", None)
    in_backward = 0
    for s in range(start, stop):
        x = batch(s, size=8)[rank * per_rank:(rank + 1) * per_rank]
        for micro in x.chunk(gas):
            engine.backward(engine(input_ids=micro, labels=micro).loss)
            if reducer is not None and engine.is_gradient_accumulation_boundary():
                in_backward += sum(reducer.launched)
            engine.step()
    return in_backward


def params_of(model) -> list:
    return [p.detach().clone() for p in model.parameters()]


def ranks_equal(params: list, world: int) -> bool:
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, params)
    return all(all(torch.equal(a, b) for a, b in zip(params, other)) for other in gathered)


def train_stages(rank: int, world: int) -> dict:
    results = {}
    for opt, gas in [*((o, 1) for o in OPTS), ("adamw", 2)]:
        for stage in (0, 1, 2) if gas == 1 else (0, 2):
            model, engine, optimizer = engine_for(stage, opt, world, gas)
            steps = 2 * optimizer.num_groups
            comm = getattr(optimizer.sharding, "comm", None)
            before = dict(comm.bytes) if comm else {}
            in_backward = run(engine, rank, world, 0, 1)
            one_step = {k: v - before.get(k, 0) for k, v in (comm.bytes if comm else {}).items()}
            first_group = optimizer.schedule.order(0)[0]
            in_backward += run(engine, rank, world, 1, steps)
            params = params_of(model)
            results[(opt, stage) if gas == 1 else (opt, stage, f"gas{gas}")] = {
                "params": params, "ranks_equal": ranks_equal(params, world),
                "memory": optimizer.memory_report(), "bytes_first_step": one_step, "first_group": first_group,
                "group_numels": [sum(p.numel() for p in ps) for ps in optimizer._params],
                "order": [optimizer.schedule.order(c) for c in range(2)],
                "buckets_in_backward": in_backward,
                "buckets": [lay.buckets for lay in optimizer.sharding.layouts] if stage else []}
    return results


def fp16_on_cpu_ranks(rank: int, world: int) -> dict:
    """Stage 0 is refused at start-up where DeepSpeed's all-reduce has no fp16 (gloo on CPUs without fp16
    support), and trains where it has; stage 2 reduces fp16 itself everywhere."""
    from deepspeed.accelerator import get_accelerator

    out = {"accelerator_fp16": torch.float16 in get_accelerator().supported_dtypes()}
    try:
        model, engine, optimizer = engine_for(0, "adamw", world, dtype="fp16")
        out["refusal"] = None
        out["stage0"] = _one_fp16_cycle(model, engine, optimizer, rank, world)
    except ValueError as e:
        out["refusal"] = str(e)
    model, engine, optimizer = engine_for(2, "adamw", world, dtype="fp16")
    out["stage2"] = _one_fp16_cycle(model, engine, optimizer, rank, world)
    return out


def _one_fp16_cycle(model, engine, optimizer, rank: int, world: int) -> dict:
    init = params_of(model)
    run(engine, rank, world, 0, optimizer.num_groups)
    params = params_of(model)
    return {"ranks_equal": ranks_equal(params, world), "skipped": optimizer.skipped_steps,
            "steps_done": optimizer.schedule.steps_done, "moved": [not torch.equal(a, b) for a, b in zip(init, params)],
            "dtype": params[0].dtype}


def save_checkpoints(rank: int, world: int, ckpt: str) -> dict:
    results = {}
    for opt, dtype in CKPT_VARIANTS:
        model, engine, optimizer = engine_for(2, opt, world, dtype=dtype)
        assert max(lay.buckets for lay in optimizer.sharding.layouts) > 1
        run(engine, rank, world, 0, SAVE_AT)
        engine.save_checkpoint(os.path.join(ckpt, f"w{world}", f"{opt}-{dtype}"), tag="mid")
        saved = {"params": params_of(model), "optimizer": optimizer.state_dict()}
        run(engine, rank, world, SAVE_AT, STOP_AT)
        results[(opt, dtype)] = {"saved": saved, "final": params_of(model), "final_optimizer": optimizer.state_dict()}
    return results


def resume_checkpoints(rank: int, world: int, ckpt: str, saved_world: int) -> dict:
    results = {}
    for opt, dtype in CKPT_VARIANTS:
        model, engine, optimizer = engine_for(2, opt, world, dtype=dtype)
        path, _ = engine.load_checkpoint(os.path.join(ckpt, f"w{saved_world}", f"{opt}-{dtype}"), tag="mid")
        assert path is not None and optimizer.schedule.steps_done == SAVE_AT
        loaded = {"params": params_of(model), "optimizer": optimizer.state_dict()}
        run(engine, rank, world, SAVE_AT, STOP_AT)
        final = params_of(model)
        results[(opt, dtype)] = {"loaded": loaded, "final": final, "final_optimizer": optimizer.state_dict(),
                                 "ranks_equal": ranks_equal(final, world)}
    return results


def main(out: str, ckpt: str, phases: str) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    for phase in phases.split(","):
        if phase == "stages":
            results = train_stages(rank, world)
            if world == 2:
                results["fp16"] = fp16_on_cpu_ranks(rank, world)
        elif phase == "save":
            results = save_checkpoints(rank, world, ckpt)
        else:
            results = resume_checkpoints(rank, world, ckpt, int(phase.removeprefix("resume")))
        save(results, out, phase)
    leave()


def save(results: dict, out: str, phase: str) -> None:
    """Rank 0 saves ``results`` to OUT/<phase>_w<world>.pt (what the tests read)."""
    if torch.distributed.get_rank() == 0:
        torch.save(results, os.path.join(out, f"{phase}_w{torch.distributed.get_world_size()}.pt"))


def finish(results: dict, out: str, phase: str) -> None:
    """A worker's one phase is done: save ``results`` (rank 0), then every rank leaves."""
    save(results, out, phase)
    leave()


def leave() -> None:
    """Every rank leaves the process group together."""
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
