"""Worker for tests/test_gpu_zero3.py: HiFT at ZeRO-3 and at stage 0 on one device, bf16, in a fresh process.

It runs without a launcher's environment (RANK, WORLD_SIZE, ...): the engine's single-process set-up
(``hift_ds.deepspeed.engine.single_process_env``, which ``hift_ds.initialize`` calls itself) runs first, because
``zero.Init`` needs the process group before ``initialize``. DeepSpeed picks the accelerator from
DS_ACCELERATOR, which the test sets: cuda (NCCL, the fused Triton update, the pinned offload store
with its copy streams) or cpu (gloo, the CPU rehearsal of the same code). Both stages load the same
saved model and see the same batches; stage 3 loads it as launch/train.py does, ``from_pretrained``
under ``HfDeepSpeedConfig``, i.e. inside ``deepspeed.zero.Init`` straight into partitions on the
device. (A model *constructed* inside ``zero.Init`` would differ from stage 0 from the first step:
DeepSpeed creates its buffers, the RoPE frequencies among them, in bf16; from_pretrained recomputes
them.)

    python tests/_gpu_zero3_worker.py OUT      # writes OUT/gpu_zero3.pt
"""
import os
import sys
import time

import torch
import transformers

import hift_ds
from hift_ds.distributed.zero3 import gathered_state_dict

STEPS = 12  # two cycles of the 6 groups (embeddings, 4 blocks, norm + head)
GAS, MICRO, SEQ = 2, 2, 64
PERSIST = 300  # stage3_param_persistence_threshold: norms (256) stay gathered, matrices are released


def model_config() -> transformers.LlamaConfig:
    """A small LLaMA shape (3.7 M parameters): little compute per byte, so a missing wait shows."""
    return transformers.LlamaConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                                    intermediate_size=688, vocab_size=1024, max_position_embeddings=128)


def ds_config(stage: int) -> dict:
    """bf16 AdamW with accumulation; HiFT offloads explicitly so the CPU rehearsal uses the store too.

    The gradient norm is computed but never above the limit: active clipping sums the norm in another
    order at each stage (a last-bit difference that bf16 weights turn into ~1% over two cycles; the
    multi-rank CPU tests cover it). eps=1e-3: Adam's eps=1e-8 would turn a last-bit gradient difference,
    should the GPU's matmuls differ between DeepSpeed's linear and torch's, into a full step.
    """
    return {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": GAS, "gradient_clipping": 1e3,
            "bf16": {"enabled": True},
            "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.01, "eps": 1e-3}},
            "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": PERSIST},
            "hift": {"strategy": "random", "seed": 1, "offload": {"device": "cpu"}, "kernel": "auto"}}


def build(stage: int, path: str) -> torch.nn.Module:
    """The saved model; at stage 3 loaded under HfDeepSpeedConfig, i.e. into zero.Init partitions on the device."""
    from transformers.integrations import HfDeepSpeedConfig

    zero3 = HfDeepSpeedConfig(ds_config(stage)) if stage == 3 else None  # noqa: F841 (held by weak reference)
    return transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)


def counting_batches() -> torch.Tensor:
    """(STEPS, GAS, MICRO, SEQ) token ids counting up from a random start: a task the loss can fall on."""
    starts = torch.randint(0, 1024, (STEPS, GAS, MICRO, 1), generator=torch.Generator().manual_seed(0))
    return (starts + torch.arange(SEQ)) % 1024


def train(stage: int, path: str) -> dict:
    """STEPS HiFT steps at ``stage``; the losses, the weights and optimizer state after, and where things ran."""
    model = build(stage, path)
    engine, optimizer, _, _ = hift_ds.initialize(model=model, config=ds_config(stage))
    data = counting_batches()
    losses, start = [], time.perf_counter()
    for s in range(STEPS):
        for micro in data[s]:
            ids = micro.to(engine.device)
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
            losses.append(float(loss))  # a sync point; the check is not a benchmark
    seconds = time.perf_counter() - start
    memory = optimizer.memory_report()
    facts = {"device": str(engine.device), "dist_backend": torch.distributed.get_backend(), "kernel": optimizer.backend,
             "seconds": seconds, "memory": memory, "steps_done": optimizer.schedule.steps_done}
    if stage == 3:
        persistent = {id(p) for p in optimizer.sharding.fetcher.persistent_parameters}
        facts.update(partition_devices=sorted({str(p.ds_tensor.device) for p in model.parameters()}),
                     released=all(p.data.numel() == 0 for p in model.parameters() if id(p) not in persistent),
                     persistent=len(persistent), params=len(list(model.parameters())))
        weights = gathered_state_dict(model)
    else:
        weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    state = [{k: v.detach().cpu().clone() for k, v in group.items()} for group in optimizer.state_dict()["state"]]
    return {"losses": losses, "weights": weights, "state": state, "facts": facts}


def main(out: str) -> None:
    # What hift_ds.initialize does for a launcher-less process, needed already by zero.Init (else MPI discovery).
    hift_ds.deepspeed.engine.single_process_env()
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(model_config())
    model.save_pretrained(os.path.join(out, "model"))
    results = {"initial": {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}}
    for stage in (0, 3):
        results[stage] = train(stage, os.path.join(out, "model"))
    torch.save(results, os.path.join(out, "gpu_zero3.pt"))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    transformers.logging.set_verbosity_error()
    main(sys.argv[1])
