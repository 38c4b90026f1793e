"""HiFT at ZeRO-3: 2 and 4 gloo ranks against one rank at stage 0 (tests/_zero3_worker.py); one rank in-process."""
import pytest
import torch

from _zero3_worker import CASES, RESUME
from conftest import torchrun_worker


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero3")
    ckpt = str(out / "ckpt")
    # World 2 writes the checkpoints that worlds 4 and 1 resume, so it runs first.
    return {w: torchrun_worker("_zero3_worker.py", w, str(out), ckpt, "train" if w > 1 else "reference", timeout=600)
            for w in (2, 4, 1)}


def relative(a: dict, b: dict, base: dict) -> float:
    """||a - b|| / ||base - b|| over every tensor: the deviation relative to how far training moved."""
    num = sum(((a[k].float() - b[k].float()) ** 2).sum() for k in b)
    den = sum(((base[k].float() - b[k].float()) ** 2).sum() for k in b)
    return float((num / den) ** 0.5)


def initial_weights(bf16: bool) -> dict:
    from conftest import tiny_llama
    return tiny_llama(dtype=torch.bfloat16 if bf16 else torch.float32).state_dict()


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("case", list(CASES))
def test_stage3_follows_one_rank_at_stage0(runs, case, world):
    ref, got = runs[1][("stage0", case)], runs[world][case]
    assert set(ref["weights"]) == set(got["weights"])
    init = initial_weights(CASES[case]["bf16"])
    moved = max(float((ref["weights"][k].float() - init[k].float()).abs().max()) for k in init)
    if not CASES[case]["bf16"]:
        # fp32: only the order in which gradients are summed differs (ranks, DeepSpeed's backward hooks).
        # Adam divides by sqrt(v): where a gradient nearly cancels that last bit becomes ~1e-6 of a weight.
        tol = 3e-5 if CASES[case]["opt"]["type"] == "AdamW" else 1e-6
        assert moved > 100 * tol
        for k in ref["weights"]:
            torch.testing.assert_close(got["weights"][k], ref["weights"][k], atol=tol, rtol=0, msg=k)
        for g, (a, b) in enumerate(zip(ref["state"], got["state"])):
            for kind in a:
                torch.testing.assert_close(b[kind], a[kind], atol=1e-7, rtol=1e-4, msg=f"group {g} {kind}")
    else:
        # bf16: N ranks' bf16 gradients sum to other roundings than one rank's batch; the trajectory
        # stays within a few percent of how far training moved (a wrong partition or reduction: ~100%).
        assert relative(got["weights"], ref["weights"], init) < 0.05
        for g, (a, b) in enumerate(zip(ref["state"], got["state"])):
            for kind in a:
                assert float((b[kind] - a[kind]).norm() / a[kind].norm()) < 0.05, (g, kind)


@pytest.mark.parametrize("world", [2, 4])
def test_only_the_active_group_is_trained_and_communicated(runs, world):
    for case, r in runs[world]["first_step"].items():
        assert not r["grads_after_backward"], case  # full gradients are moved out and freed by the hook
        assert r["trainable_is_active_group"], case
        assert r["frozen_partitions_unchanged"] and r["active_partitions_changed"], case
        assert r["frozen_state_unchanged"], case
        elem = 2  # bf16 gradients
        # one reduce-scatter of the active group's gradients, one fp32 norm² for clipping, no all-gather:
        # DeepSpeed gathers weights module by module in the next forward, as at any ZeRO-3 step
        assert r["bytes"] == {"reduce_scatter": elem * r["active_padded_numel"], "all_reduce": 4}, case
        assert r["active_padded_numel"] < world * sum(r["partition_numels"]) / 2  # frozen groups are not in it


@pytest.mark.parametrize("world", [2, 4])
def test_memory_per_rank_is_one_nth(runs, world):
    for case, r in runs[world]["first_step"].items():
        mem, parts, kinds = r["memory"], sum(r["partition_numels"]), r["kinds"]
        n = sum(r["group_numels"])
        full = runs[1]["memory_stage0"][case]  # the same case at stage 0 on one rank
        slots = CASES[case].get("offload_slots", 0)  # 0: no offload
        home = (lambda m: m["state_host_pinned"] + m["state_host_pageable"]) if slots else (lambda m: m["state_device"])
        assert full["model_weights"] == 2 * n and home(full) == 4 * kinds * n
        # bf16 partitions (DeepSpeed pads each parameter to a multiple of N) + its persistent full copies
        assert n / world <= parts < n / world + r["num_params"]
        assert mem["model_weights"] == 2 * parts + 2 * r["persistent_numel"]
        # masters + state of this rank's partitions of every group; with offload on the host, and the
        # store's slots of the largest group's partitions on the device
        assert home(mem) == 4 * kinds * parts
        if slots:
            assert mem["state_device"] == slots * 4 * kinds * max(r["partition_numels"])
        # one group's bf16 gradient (rows of every rank) and this rank's shard of it
        assert mem["gradients"] == 2 * max(r["padded_numels"]) + 2 * max(r["partition_numels"])


@pytest.mark.parametrize("world", [1, 4])
@pytest.mark.parametrize("case", RESUME)
def test_checkpoint_from_two_ranks_resumes_on_other_world_sizes(runs, case, world):
    saved, res = runs[2][("save", case)], runs[world][("save", case)]
    # Loaded exactly: every group's whole state and the weights as saved, on a different number of ranks.
    for a, b in zip(saved["saved"]["state"]["state"], res["loaded"]["state"]["state"]):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert saved["saved"]["state"]["hift"] == res["loaded"]["state"]["hift"]
    assert all(torch.equal(v, res["loaded"]["weights"][k]) for k, v in saved["saved"]["weights"].items())
    # ... and training continues as the uninterrupted 2-rank run (up to the order of the gradient sums).
    if CASES[case]["bf16"]:
        assert relative(res["resumed"], saved["uninterrupted"], initial_weights(True)) < 0.05
    else:
        for k, v in saved["uninterrupted"].items():
            torch.testing.assert_close(res["resumed"][k], v, atol=3e-5, rtol=0, msg=k)


# ---- one rank, in this process ----------------------------------------------------------------------
def stage3_config(bf16: bool = False, **zero) -> dict:
    return {"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9}},
            "bf16": {"enabled": bf16},
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 40, **zero},
            "hift": {}}


def train_steps(engine, steps: int) -> None:
    from conftest import batch
    for s in range(steps):
        x = batch(s)
        engine.backward(engine(input_ids=x, labels=x).loss)
        engine.step()


@pytest.mark.usefixtures("single_rank_env")
def test_model_built_inside_zero_init_trains_as_a_converted_one():
    """zero.Init construction and conversion of a built model (zero.Init(module=...)) give the same run."""
    import deepspeed
    import transformers  # the model class is imported before entering zero.Init (dynamo fails inside it)

    import hift_ds
    from conftest import tiny_llama
    from hift_ds.distributed.zero3 import gathered_state_dict

    reference = tiny_llama()
    init = {k: v.clone() for k, v in reference.state_dict().items()}
    with deepspeed.zero.Init(config_dict_or_path=stage3_config()):
        built = transformers.LlamaForCausalLM(reference.config)
    for p, q in zip(built.parameters(), reference.parameters()):  # zero.Init skipped transformers' weight init
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
            p.data.copy_(q.data)
    results = []
    for model in (built, reference):
        engine, optimizer, _, _ = hift_ds.initialize(model=model, config=stage3_config())
        assert all(p.ds_tensor.numel() and not p.numel() for p in model.parameters())  # partitioned, released
        train_steps(engine, 2 * optimizer.num_groups)
        results.append(gathered_state_dict(model))
    assert max(float((results[1][k] - v).abs().max()) for k, v in init.items()) > 1e-3  # it trained
    assert results[0].keys() == init.keys()
    for k in results[0]:
        torch.testing.assert_close(results[0][k], results[1][k], atol=1e-6, rtol=0, msg=k)


@pytest.mark.usefixtures("single_rank_env")
def test_save_16bit_model_writes_the_gathered_weights(tmp_path):
    import hift_ds
    from conftest import tiny_llama
    from hift_ds.distributed.zero3 import gathered_state_dict

    model = tiny_llama()
    model.lm_head.weight.requires_grad_(False)  # frozen by the user: saved, unless excluded
    keys = model.state_dict().keys()
    engine, optimizer, _, _ = hift_ds.initialize(
        model=model, config=stage3_config(bf16=True, stage3_gather_16bit_weights_on_model_save=True))
    train_steps(engine, 3)
    assert engine.save_16bit_model(str(tmp_path / "trained"), exclude_frozen_parameters=True)
    assert torch.load(tmp_path / "trained" / "pytorch_model.bin", weights_only=True).keys() == keys - {"lm_head.weight"}
    assert engine.save_16bit_model(str(tmp_path))
    saved = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    expected = gathered_state_dict(model)
    assert saved.keys() == expected.keys() == keys
    assert all(torch.equal(saved[k], expected[k]) and saved[k].dtype == expected[k].dtype for k in keys)
    fresh = tiny_llama(dtype=torch.bfloat16)
    fresh.load_state_dict(saved)  # a whole, loadable model
    # the trained group's weights are what the optimizer's masters say
    g = optimizer.schedule.order(0)[0]
    masters = optimizer.state_dict()["state"][g]["master"]
    name = optimizer.group_param_names(g)[0]
    assert torch.equal(saved[name].reshape(-1), masters[:saved[name].numel()].to(torch.bfloat16))
    assert not hift_ds.initialize(model=tiny_llama(), config=stage3_config())[0].save_16bit_model(str(tmp_path / "no"))
    assert not (tmp_path / "no").exists()  # as DeepSpeed: nothing without stage3_gather_16bit_weights_on_model_save


@pytest.mark.usefixtures("single_rank_env")
def test_stage3_checkpoint_errors_are_clear(tmp_path):
    import hift_ds
    from conftest import tiny_llama

    engine, _, _, _ = hift_ds.initialize(model=tiny_llama(), config=stage3_config())
    train_steps(engine, 2)
    engine.save_checkpoint(str(tmp_path), tag="z3")
    engine, _, _, _ = hift_ds.initialize(model=tiny_llama(), config=stage3_config())
    for kwargs in ({"load_module_only": True}, {"load_optimizer_states": False}):
        with pytest.raises(ValueError, match=r"at ZeRO stage 3 the checkpoint's weights live in the HiFT optimizer "
                                             r"state .* cannot restore them"):
            engine.load_checkpoint(str(tmp_path), tag="z3", **kwargs)
    cfg0 = {**stage3_config(), "zero_optimization": {"stage": 0}}
    engine, _, _, _ = hift_ds.initialize(model=tiny_llama(), config=cfg0)
    with pytest.raises(ValueError, match=r"a checkpoint saved at ZeRO stage 3 resumes only at stage 3"):
        engine.load_checkpoint(str(tmp_path), tag="z3")


@pytest.mark.usefixtures("single_rank_env")
def test_models_that_cannot_be_partitioned_are_clear_errors():
    import deepspeed
    import transformers

    import hift_ds
    from conftest import tiny_llama
    from hift_ds.distributed.zero3 import Zero3Sharding, partition_model

    config = tiny_llama().config
    with torch.device("meta"):
        meta = transformers.LlamaForCausalLM(config)
    with pytest.raises(ValueError, match=r"the model has tensors on the meta device .* Build it inside `with "
                                         r"deepspeed.zero.Init\(config_dict_or_path=ds_config\):`"):
        hift_ds.initialize(model=meta, config=stage3_config())
    with deepspeed.zero.Init(config_dict_or_path=stage3_config(bf16=False)):
        fp32 = transformers.LlamaForCausalLM(config)
    with pytest.raises(ValueError, match=r"partitioned by zero.Init in torch.float32, but the config trains in "
                                         r"torch.bfloat16: pass the same DeepSpeed config to zero.Init"):
        hift_ds.initialize(model=fp32, config=stage3_config(bf16=True))
    with pytest.raises(ValueError, match=r"ZeRO-3 sharding needs a model partitioned by DeepSpeed ZeRO-3; use "
                                         r"hift_ds.initialize"):
        hift_ds.HiFTOptimizer(tiny_llama(), "adamw", sharding=Zero3Sharding(param_fetcher=None))
    model = tiny_llama()
    fetcher = partition_model(model, stage3_config(), torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"ZeRO stage 3 needs a built-in optimizer"):
        hift_ds.HiFTOptimizer(model, torch.optim.RMSprop, sharding=Zero3Sharding(fetcher))


@pytest.mark.usefixtures("single_rank_env")
def test_fused_kernel_writes_into_deepspeed_partitions():
    """The Triton path (one launch per group, bf16 cast fused) updates the partitions as the torch path does."""
    import hift_ds
    from conftest import tiny_llama
    from hift_ds.distributed.zero3 import gathered_state_dict

    runs = []
    for kernel in ("torch", "triton"):
        cfg = stage3_config(bf16=True)
        cfg.update(optimizer={"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.1}}, hift={"kernel": kernel})
        model = tiny_llama()
        engine, optimizer, _, _ = hift_ds.initialize(model=model, config=cfg)
        assert optimizer.backend == kernel
        train_steps(engine, optimizer.num_groups + 1)
        runs.append((gathered_state_dict(model), optimizer.state_dict()["state"]))
    (w_torch, s_torch), (w_triton, s_triton) = runs
    for a, b in zip(s_torch, s_triton):
        for kind in a:
            torch.testing.assert_close(b[kind], a[kind], atol=1e-5, rtol=1e-4)
    for k in w_torch:  # the interpreter's bf16 cast truncates where torch rounds: one bf16 ulp
        torch.testing.assert_close(w_triton[k].float(), w_torch[k].float(), atol=1e-6, rtol=2 ** -7)


class _TiedLM(torch.nn.Module):
    """Reads its embedding's weight outside the embedding module (a tied head written as F.linear)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(100, 16)
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(16, 16) for _ in range(2))

    def forward(self, input_ids, labels):
        h = self.embed(input_ids)
        for block in self.blocks:
            h = torch.tanh(block(h))
        logits = torch.nn.functional.linear(h, self.embed.weight)
        return type("Out", (), {"loss": torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())})


@pytest.mark.usefixtures("single_rank_env")
def test_a_parameter_read_outside_its_module_is_gathered():
    """DeepSpeed's engine flags modules "in forward" at stage 3 so such reads gather; HiFT's hooks do the same."""
    import hift_ds
    from hift_ds.distributed.zero3 import gathered_state_dict

    results = []
    for stage in (0, 3):
        model = _TiedLM()
        cfg = {**stage3_config(), "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0}}
        engine, optimizer, _, _ = hift_ds.initialize(model=model, config=cfg)
        train_steps(engine, 2 * optimizer.num_groups)
        results.append(gathered_state_dict(model) if stage else model.state_dict())
    for k, v in results[0].items():
        torch.testing.assert_close(results[1][k], v, atol=1e-6, rtol=0, msg=k)


@pytest.mark.usefixtures("single_rank_env")
def test_wrapping_the_same_model_again_hands_it_to_the_new_optimizer():
    import hift_ds
    from conftest import tiny_llama
    from hift_ds.distributed.zero3 import gathered_state_dict

    model = tiny_llama()
    engine, old, _, _ = hift_ds.initialize(model=model, config=stage3_config())
    train_steps(engine, 2)
    before = gathered_state_dict(model)
    engine, new, _, _ = hift_ds.initialize(model=model, config=stage3_config())  # `old` is still alive
    assert all(torch.equal(before[k], v) for k, v in gathered_state_dict(model).items())
    train_steps(engine, 2)
    assert new.schedule.steps_done == 2 and old.schedule.steps_done == 2
    after = gathered_state_dict(model)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert len(model.model.layers[0]._forward_pre_hooks) == 2  # DeepSpeed's pre-forward and post-backward, once
