"""Worker for tests/test_zero.py, run under torchrun: HiFT at ZeRO stages 0/1/2 on N gloo ranks.

Every run uses the same global batch of 8 per step, split evenly over the ranks, so results are
comparable across stages and world sizes. Rank 0 writes what the test checks to OUT/<tag>.pt.
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


def engine_for(stage: int, opt: str, world: int, gas: int = 1):
    model = tiny_llama()
    # Small stage-2 buckets so a group is reduced in several pieces during backward.
    zero = {"stage": stage, "reduce_bucket_size": 3000} if stage == 2 else {"stage": stage}
    cfg = {"train_micro_batch_size_per_gpu": 8 // world // gas, "gradient_accumulation_steps": gas,
           "optimizer": OPTS[opt], "gradient_clipping": 1.0, "zero_optimization": zero,
           "hift": {"strategy": "random", "seed": 1}}
    engine, optimizer, _, _ = hift_ds.initialize(model=model, config=cfg)
    return model, engine, optimizer


def run(engine, rank: int, world: int, start: int, stop: int) -> None:
    gas, per_rank = engine.gradient_accumulation_steps(), 8 // world
    for s in range(start, stop):
        x = batch(s, size=8)[rank * per_rank:(rank + 1) * per_rank]
        for micro in x.chunk(gas):
            engine.backward(engine(input_ids=micro, labels=micro).loss)
            engine.step()


def main(out: str, ckpt: str, phase: str) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    results = {}
    if phase == "train":
        for opt, gas in [*((o, 1) for o in OPTS), ("adamw", 2)]:
            for stage in (0, 1, 2) if gas == 1 else (0, 2):
                model, engine, optimizer = engine_for(stage, opt, world, gas)
                steps = 2 * optimizer.num_groups
                before = dict(optimizer._comm.bytes) if optimizer._comm else {}
                run(engine, rank, world, 0, 1)
                one_step = {k: v - before.get(k, 0) for k, v in (optimizer._comm.bytes if optimizer._comm else {}).items()}
                first_group = optimizer.schedule.order(0)[0]
                run(engine, rank, world, 1, steps)
                gathered = [None] * world
                params = [p.detach().clone() for p in model.parameters()]
                torch.distributed.all_gather_object(gathered, params)
                results[(opt, stage) if gas == 1 else (opt, stage, f"gas{gas}")] = {
                    "params": params, "ranks_equal": all(
                    all(torch.equal(a, b) for a, b in zip(params, other)) for other in gathered),
                    "memory": optimizer.memory_report(), "bytes_first_step": one_step, "first_group": first_group,
                    "group_numels": [sum(p.numel() for p in ps) for ps in optimizer._params],
                    "order": [optimizer.schedule.order(c) for c in range(2)],
                    "buckets_in_backward": optimizer._reducer.launched_in_backward if optimizer._reducer else 0,
                    "buckets": [lay.buckets for lay in optimizer._layouts]}
        # Save mid-cycle at world N for the resume test.
        model, engine, optimizer = engine_for(1, "adamw", world)
        run(engine, rank, world, 0, optimizer.num_groups + 2)
        engine.save_checkpoint(ckpt, tag="mid")
        run(engine, rank, world, optimizer.num_groups + 2, 3 * optimizer.num_groups)
        results["uninterrupted"] = [p.detach().clone() for p in model.parameters()]
    else:  # resume a checkpoint written by another world size
        model, engine, optimizer = engine_for(1, "adamw", world)
        engine.load_checkpoint(ckpt, tag="mid")
        assert optimizer.schedule.steps_done == optimizer.num_groups + 2
        run(engine, rank, world, optimizer.num_groups + 2, 3 * optimizer.num_groups)
        results["resumed"] = [p.detach().clone() for p in model.parameters()]
    finish(results, out, phase)


def finish(results: dict, out: str, phase: str) -> None:
    """Rank 0 saves ``results`` to OUT/<phase>_w<world>.pt (what torchrun_worker reads); every rank leaves."""
    if torch.distributed.get_rank() == 0:
        torch.save(results, os.path.join(out, f"{phase}_w{torch.distributed.get_world_size()}.pt"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
