"""Worker for tests/test_zero3.py, run under torchrun: HiFT at ZeRO-3 on N gloo ranks, and its yardstick.

Every run uses the same global batch of 8 per optimizer step, split evenly over the ranks and
micro-batches. Phases:

- ``train`` (world 2 and 4): every case of CASES at stage 3, with what the tests check (whole-group
  optimizer state, gathered weights, memory, bytes communicated, frozen partitions untouched);
  world 2 also saves checkpoints mid-run and trains on to the end (the uninterrupted runs);
  world 4 then resumes world 2's checkpoints.
- ``reference`` (world 1): every case at stage 0 on one rank (the yardstick), and the resume of
  world 2's checkpoints.

Rank 0 writes the results to OUT/<phase>_w<world>.pt.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

import hift_ds  # noqa: E402
from _zero_worker import finish, run  # noqa: E402  (run: the same global batch of 8 per step)
from conftest import batch, tiny_llama  # noqa: E402
from hift_ds.distributed.zero3 import gathered_state_dict  # noqa: E402

ADAMW = {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.1}}
# bf16 runs: the ranks' bf16 gradients are summed in another order than one rank's, and Adam with
# eps=1e-8 turns a last-bit change of a near-zero gradient into a +-lr step (stage 0 on N ranks
# drifts from one rank exactly as much); eps=1e-3 keeps Adam's update proportional to the gradient.
ADAMW_BF16 = {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.1, "eps": 1e-3}}
SGD = {"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9}}
CASES = {
    "fp32-random-adamw-gas2": dict(bf16=False, strategy="random", opt=ADAMW, gas=2, clip=0.5),
    "fp32-bottom2up-sgd": dict(bf16=False, strategy="bottom2up", opt=SGD, gas=1, clip=1.0),
    "bf16-bottom2up-adamw": dict(bf16=True, strategy="bottom2up", opt=ADAMW_BF16, gas=1, clip=1.0),
    "bf16-random-sgd-gas2-offload": dict(bf16=True, strategy="random", opt=SGD, gas=2, clip=0.5, offload_slots=2),
}
RESUME = ("fp32-random-adamw-gas2", "bf16-random-sgd-gas2-offload")
PERSIST = 40  # stage3_param_persistence_threshold: norms (32 elements) stay gathered, matrices are released


def engine_for(case: str, stage: int, world: int):
    c = CASES[case]
    hift = {"strategy": c["strategy"], "seed": 1}
    if c.get("offload_slots"):
        hift["offload"] = {"device": "cpu", "slots": c["offload_slots"]}
    cfg = {"train_micro_batch_size_per_gpu": 8 // world // c["gas"], "gradient_accumulation_steps": c["gas"],
           "optimizer": c["opt"], "gradient_clipping": c["clip"], "bf16": {"enabled": c["bf16"]},
           "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": PERSIST}, "hift": hift}
    model = tiny_llama()
    engine, optimizer, _, _ = hift_ds.initialize(model=model, config=cfg)
    return model, engine, optimizer


def weights(model, stage: int) -> dict:
    """The model's whole state dict (gathered at stage 3) on rank 0."""
    return gathered_state_dict(model) if stage == 3 else {k: v.clone() for k, v in model.state_dict().items()}


def trajectory(case: str, stage: int, rank: int, world: int, steps: int) -> dict:
    model, engine, optimizer = engine_for(case, stage, world)
    run(engine, rank, world, 0, steps)
    return {"state": optimizer.state_dict()["state"], "weights": weights(model, stage)}


def observe_one_step(model, engine, optimizer, rank: int, world: int) -> dict:
    """What the first step does: gradients, communication, and which partitions and state it writes."""
    g = optimizer.active_group
    partitions = [p.ds_tensor.clone() for p in model.parameters()]
    homes = [{k: v.clone() for k, v in bufs.items()} for bufs in optimizer.store.home]
    x = batch(0, size=8)[rank * (8 // world):(rank + 1) * (8 // world)]
    before = dict(optimizer.sharding.comm.bytes)
    micros = x.chunk(engine.gradient_accumulation_steps())
    for i, micro in enumerate(micros):
        engine.backward(engine(input_ids=micro, labels=micro).loss)
        if i == len(micros) - 1:  # after the last backward, before the update
            grads_after_backward = [p.grad is not None for p in model.parameters()]
            trainable = {id(p) for p in model.parameters() if p.requires_grad}
        engine.step()
    active, params = {id(p) for p in optimizer._params[g]}, list(model.parameters())
    return {"active_group": g,
            "bytes": {k: v - before.get(k, 0) for k, v in optimizer.sharding.comm.bytes.items()},
            "active_padded_numel": optimizer.sharding.layouts[g].padded,
            "grads_after_backward": any(grads_after_backward),
            "trainable_is_active_group": trainable == active,
            "frozen_partitions_unchanged": all(torch.equal(a, p.ds_tensor) for a, p in zip(partitions, params)
                                               if id(p) not in active),
            "active_partitions_changed": any(not torch.equal(a, p.ds_tensor) for a, p in zip(partitions, params)
                                             if id(p) in active),
            "frozen_state_unchanged": all(torch.equal(a[k], b[k]) for i, (a, b) in
                                          enumerate(zip(homes, optimizer.store.home)) if i != g for k in a),
            "memory": optimizer.memory_report(),
            "partition_numels": [lay.shard_numel for lay in optimizer.sharding.layouts],
            "padded_numels": [lay.padded for lay in optimizer.sharding.layouts],
            "group_numels": [lay.n for lay in optimizer.sharding.layouts],
            "num_params": sum(len(ps) for ps in optimizer._params),
            "persistent_numel": sum(p.ds_numel for p in optimizer.sharding.fetcher.persistent_parameters),
            "kinds": len(optimizer.store.kinds)}


def save_and_continue(case: str, ckpt: str, rank: int, world: int) -> dict:
    model, engine, optimizer = engine_for(case, 3, world)
    k = optimizer.num_groups
    run(engine, rank, world, 0, k + 2)  # mid-cycle
    engine.save_checkpoint(ckpt, tag=case)
    saved = {"state": optimizer.state_dict(), "weights": weights(model, 3)}
    run(engine, rank, world, k + 2, 3 * k)
    return {"saved": saved, "uninterrupted": weights(model, 3)}


def resume(case: str, ckpt: str, rank: int, world: int) -> dict:
    model, engine, optimizer = engine_for(case, 3, world)
    k = optimizer.num_groups
    engine.load_checkpoint(ckpt, tag=case)
    loaded = {"state": optimizer.state_dict(), "weights": weights(model, 3)}
    run(engine, rank, world, k + 2, 3 * k)
    return {"loaded": loaded, "resumed": weights(model, 3)}


def main(out: str, ckpt: str, phase: str) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    steps = 2 * 5  # two cycles of the 5 groups of tiny_llama()
    results = {}
    if phase == "train":
        for case in CASES:
            results[case] = trajectory(case, 3, rank, world, steps)
        results["first_step"] = {case: observe_one_step(*engine_for(case, 3, world), rank, world)
                                 for case in ("bf16-bottom2up-adamw", "bf16-random-sgd-gas2-offload")}
        for case in RESUME:
            results[("save", case)] = save_and_continue(case, ckpt, rank, world) if world == 2 else \
                resume(case, ckpt, rank, world)
    else:
        for case in CASES:
            results[("stage0", case)] = trajectory(case, 0, rank, world, steps)
        results["memory_stage0"] = {case: engine_for(case, 0, world)[2].memory_report()
                                    for case in ("bf16-bottom2up-adamw", "bf16-random-sgd-gas2-offload")}
        for case in RESUME:
            results[("save", case)] = resume(case, ckpt, rank, world)
    finish(results, out, phase)


if __name__ == "__main__":
    main(*sys.argv[1:4])
