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


def engine_for(stage: int, opt: str, world: int):
    model = tiny_llama()
    cfg = {"train_micro_batch_size_per_gpu": 8 // world, "optimizer": OPTS[opt], "gradient_clipping": 1.0,
           "zero_optimization": {"stage": stage}, "hift": {"strategy": "random", "seed": 1}}
    engine, optimizer, _, _ = hift_ds.initialize(model=model, config=cfg)
    return model, engine, optimizer


def run(engine, rank: int, world: int, start: int, stop: int) -> None:
    for s in range(start, stop):
        x = batch(s, size=8)[rank * (8 // world):(rank + 1) * (8 // world)]
        engine.backward(engine(input_ids=x, labels=x).loss)
        engine.step()


def main(out: str, ckpt: str, phase: str) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    results = {}
    if phase == "train":
        for opt in OPTS:
            for stage in (0, 1, 2):
                model, engine, optimizer = engine_for(stage, opt, world)
                steps = 2 * optimizer.num_groups
                before = dict(optimizer._comm.bytes) if optimizer._comm else {}
                run(engine, rank, world, 0, 1)
                one_step = {k: v - before.get(k, 0) for k, v in (optimizer._comm.bytes if optimizer._comm else {}).items()}
                first_group = optimizer.schedule.order(0)[0]
                run(engine, rank, world, 1, steps)
                gathered = [None] * world
                params = [p.detach().clone() for p in model.parameters()]
                torch.distributed.all_gather_object(gathered, params)
                results[(opt, stage)] = {"params": params, "ranks_equal": all(
                    all(torch.equal(a, b) for a, b in zip(params, other)) for other in gathered),
                    "memory": optimizer.memory_report(), "bytes_first_step": one_step, "first_group": first_group,
                    "group_numels": [sum(p.numel() for p in ps) for ps in optimizer._params],
                    "order": [optimizer.schedule.order(c) for c in range(2)]}
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
    if rank == 0:
        torch.save(results, os.path.join(out, f"{phase}_w{world}.pt"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
