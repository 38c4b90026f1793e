"""``hift_ds.initialize``: what a DeepSpeed config may say, and the clear errors for what it may not."""
import argparse
import os
import sys

import pytest
import torch

import hift_ds
from hift_ds.optim.store import MASTER

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _engine_worker as W  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
pytestmark = pytest.mark.usefixtures("single_rank_env")


# ---- 4. config errors -----------------------------------------------------------------------------
def _cfg(**kw):
    return W.ds_config(**kw)


CONFIG_ERRORS = {
    "unknown_hift_key": (_cfg(hift={"group_size": 1, "colour": "red"}), ValueError,
                         r"unknown key 'colour' \(valid keys: group_size, num_groups, strategy, seed"),
    "unknown_offload_key": (_cfg(hift={"offload": {"device": "cpu", "speed": 3}}), ValueError,
                            r"unknown key 'offload.speed' \(valid keys: device, pin_memory, prefetch, slots, "
                            r"chunk_mib\)"),
    "offload_slots": (_cfg(hift={"offload": {"device": "cpu", "slots": 4}}), ValueError,
                      r"offload.slots: Input should be 1, 2 or 3 \(got 4\)"),
    "offload_chunk_mib": (_cfg(hift={"offload": {"device": "cpu", "chunk_mib": -1}}), ValueError,
                          r"offload.chunk_mib: must be >= 1 \(MiB\), got -1"),
    "unknown_strategy": (_cfg(hift={"strategy": "sideways"}), ValueError,
                         r"strategy: unknown HiFT strategy 'sideways'; use one of bottom2up, top2down, random, "
                         r"shuffled"),
    "group_size_0": (_cfg(hift={"group_size": 0}), ValueError, r"group_size: .*must be >= 1, got 0"),
    "num_groups_0": (_cfg(hift={"num_groups": 0}), ValueError, r"num_groups: .*must be >= 1, got 0"),
    "group_size_and_num_groups": (_cfg(hift={"group_size": 2, "num_groups": 2}), ValueError,
                                  r'^invalid "hift" settings: set either group_size \(2\) or num_groups \(2\), '
                                  r'not both$'),
    "hift_not_object": (_cfg(hift=[1]), TypeError, r'"hift" config block must be a JSON object, got list'),
    "missing_hift": ({"train_micro_batch_size_per_gpu": 2}, ValueError,
                     r'no "hift" block; add "hift": \{"group_size": 1\} \(its default offload, "auto", keeps inactive '
                     r"groups' state in pinned host memory when the model is on CUDA\)"),
    "unknown_optimizer": (_cfg(optimizer={"type": "Lamb", "params": {"lr": 1e-3}}), ValueError,
                          r"optimizer.type: unknown optimizer 'Lamb'; use one of Adam, AdamW, SGD, Adagrad"),
    "unknown_optimizer_option": (_cfg(optimizer={"type": "AdamW", "params": {"lr": 1e-3, "momentum": 0.9}}),
                                 ValueError,
                                 r"optimizer.params: unknown adamw option\(s\) \['momentum'\]; valid options: "),
    "bad_optimizer_value": (_cfg(optimizer={"type": "AdamW", "params": {"lr": "fast"}}), ValueError,
                            r"adamw lr must be a finite number >= 0, got 'fast'"),
    "bad_betas": (_cfg(optimizer={"type": "Adam", "params": {"betas": [0.9]}}), ValueError,
                  r"adamw betas must be two numbers in \[0, 1\), got \[0.9\]"),
    "no_bias_correction": (_cfg(optimizer={"type": "Adam", "params": {"bias_correction": False}}), ValueError,
                           r"bias_correction=false is not supported with HiFT"),
    "auto_steps": (_cfg(scheduler={"type": "WarmupLR", "params": {"warmup_num_steps": "auto"}}), ValueError,
                   r'scheduler.params.warmup_num_steps is "auto", which only launch/train.py fills in'),
    "float_steps": (_cfg(scheduler={"type": "WarmupLR", "params": {"warmup_num_steps": 2.5}}), ValueError,
                    r"warmup_num_steps must be an integer number of optimizer steps, got 2.5"),
    "amp": (_cfg(amp={"enabled": True}), ValueError, r'"amp" is not supported with the hift block; use "bf16"'),
    "torch_autocast": (_cfg(torch_autocast={"enabled": True}), ValueError,
                       r'"torch_autocast" is not supported with the hift block'),
    "bf16_and_bfloat16": (_cfg(bf16={"enabled": True}, bfloat16={"enabled": True}), ValueError,
                          r'both "bf16" and its old name "bfloat16"'),
    "unknown_scheduler": (_cfg(scheduler={"type": "CosineForever", "params": {}}), ValueError,
                          r"scheduler type 'CosineForever' is not one of DeepSpeed's"),
    "bf16_and_fp16": (_cfg(bf16={"enabled": True}, fp16={"enabled": True}), ValueError,
                      r"both bf16 and fp16 are enabled"),
    "zero_stage_4": (_cfg(zero_optimization={"stage": 4}), ValueError,
                     r"zero_optimization.stage=4 is not one of 0, 1, 2, 3"),
    "zero3_offload_param": (_cfg(zero_optimization={"stage": 3, "offload_param": {"device": "cpu"}}), ValueError,
                            r'offload_param is not supported with HiFT at stage 3: .*'
                            r'"hift": \{"offload": \{"device": "cpu"\}\}'),
    "zero3_hpz": (_cfg(zero_optimization={"stage": 3, "zero_hpz_partition_size": 2}), ValueError,
                  r"zero_hpz_partition_size > 1 \(hpZ secondary partitions\) is not supported with HiFT at stage 3"),
    "zero3_quantized": (_cfg(zero_optimization={"stage": 3, "zero_quantized_weights": True}), ValueError,
                        r"zero_quantized_weights is not supported with HiFT at stage 3"),
    "zero3_custom_optimizer": (_cfg(optimizer={"type": "Lamb", "params": {"lr": 1e-3}},
                                    zero_optimization={"stage": 3}), ValueError,
                               r"optimizer.type: unknown optimizer 'Lamb'; use one of Adam, AdamW, SGD"),
    "zero_offload_optimizer": (_cfg(zero_optimization={"stage": 2, "offload_optimizer": {"device": "cpu"}}),
                               ValueError, r"zero_optimization.offload_optimizer does not apply to HiFT"),
    "zero_offload_param": (_cfg(zero_optimization={"stage": 1, "offload_param": {"device": "cpu"}}), ValueError,
                           r'zero_optimization.offload_param does not apply to HiFT; remove it and set "hift": '
                           r'\{"offload": \{"device": "cpu"\}\}'),
    "zero_bucket_size": (_cfg(zero_optimization={"stage": 2, "reduce_bucket_size": "auto"}), ValueError,
                         r"zero_optimization.reduce_bucket_size must be a number of elements >= 1, got 'auto'"),
    "negative_clipping": (_cfg(gradient_clipping=-1), ValueError,
                          r"^gradient_clipping must be >= 0 \(0 disables clipping\), got -1$"),
    "fp16_bad_scaler": (_cfg(fp16={"enabled": True, "hysteresis": 0}), ValueError,
                        r"invalid loss scaler settings: .*hysteresis=0"),
    "bf16_not_object": (_cfg(bf16=True), ValueError, r'"bf16" config block must be a JSON object, got bool'),
    "config_not_dict_or_path": (42, TypeError, r"config must be a dict or a path to a JSON file, got int"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_ERRORS))
def test_config_errors(case):
    config, exc, match = CONFIG_ERRORS[case]
    with pytest.raises(exc, match=match):
        hift_ds.initialize(model=W.tiny_llama(), config=config)


def test_fp16_at_stage0_refused_where_deepspeeds_all_reduce_has_no_fp16(monkeypatch):
    """Several ranks on a device whose DeepSpeed all-reduce lacks fp16 (gloo on most CPUs): one line, the fixes."""
    import hift_ds.deepspeed.engine as engine_module
    monkeypatch.setattr(engine_module, "_world_size", lambda: 2)
    monkeypatch.setattr(engine_module, "_reduces_fp16", lambda: False)
    with pytest.raises(ValueError, match=r'^fp16 at ZeRO stage 0 with 2 ranks is not supported on this device: '
                                         r'.*use "bf16": \{"enabled": true\}, GPUs, or zero_optimization.stage 1 or 2'):
        hift_ds.initialize(model=W.tiny_llama(), config=_cfg(fp16={"enabled": True}))


def test_readme_config_with_auto_steps_names_the_fix():
    """The shipped configs leave step counts to launch/train.py; the API must say so, not raise TypeError."""
    with pytest.raises(ValueError, match=r'total_num_steps is "auto"|warmup_num_steps is "auto"'):
        hift_ds.initialize(model=W.tiny_llama(), config=os.path.join(os.path.dirname(HERE), "ds_configs", "hift.json"))


def test_deepspeed_config_spellings_are_honoured():
    """What plain DeepSpeed accepts trains the same way: old "bfloat16" key, null offload, config_params,
    AdamW without weight_decay (DeepSpeed's default 0), model_parameters=model.parameters()."""
    model = W.tiny_llama()
    cfg = _cfg(optimizer={"type": "AdamW", "params": {"lr": 1e-3, "bias_correction": True}},
               bfloat16={"enabled": True}, zero_optimization={"stage": 0, "offload_optimizer": None})
    engine, opt, _, _ = hift_ds.initialize(model=model, model_parameters=model.parameters(), config_params=cfg)
    assert next(engine.module.parameters()).dtype == torch.bfloat16 and opt.keeps_masters
    assert all(pg["weight_decay"] == 0.0 for pg in opt.param_groups)
    with pytest.raises(ValueError, match=r"model_parameters= leaves out some of the model's trainable parameters"):
        m = W.tiny_llama()
        hift_ds.initialize(model=m, model_parameters=list(m.parameters())[:3], config=_cfg())
    m = W.tiny_llama()
    m.model.embed_tokens.weight.requires_grad_(False)  # the usual filter over a partly frozen model is fine
    _, opt, _, _ = hift_ds.initialize(model=m, config=_cfg(),
                                      model_parameters=filter(lambda p: p.requires_grad, m.parameters()))
    assert "model.embed_tokens.weight" not in sum((opt.group_param_names(g) for g in range(opt.num_groups)), [])
    with pytest.raises(ValueError, match=r"model parallelism \(mpu=\) is not supported with zero_optimization.stage=1"):
        hift_ds.initialize(model=W.tiny_llama(), config=_cfg(zero_optimization={"stage": 1}), mpu=object())


def _masters_equal_weights(opt) -> bool:
    opt.store.synchronize()
    return all(torch.equal(home[MASTER], torch.cat([p.detach().reshape(-1).float() for p in ps]))
               for home, ps in zip(opt.store.home, opt._params))


def test_masters_follow_weights_deepspeed_broadcasts_and_module_only_loads(monkeypatch, tmp_path):
    """Rank 0's weights arrive after the optimizer was built; a module-only load replaces weights too."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    def broadcast(self):  # what rank 0's different weights look like to another rank
        with torch.no_grad():
            for p in self.module.parameters():
                p.add_(1.0)
    monkeypatch.setattr(DeepSpeedEngine, "_broadcast_model", broadcast)
    engine, opt, _, _ = hift_ds.initialize(model=W.tiny_llama(), config=_cfg(bf16={"enabled": True}))
    assert _masters_equal_weights(opt)
    engine.save_checkpoint(str(tmp_path), tag="t")
    W.train_engine(engine, opt, 0, 3, micro=2, gas=1)
    assert not _masters_equal_weights(opt)  # groups 1.. untouched, group 0 trained: masters differ
    engine.load_checkpoint(str(tmp_path), tag="t", load_optimizer_states=False, load_lr_scheduler_states=False)
    assert _masters_equal_weights(opt)


def test_config_file_errors(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(ValueError, match=r"DeepSpeed config file '.*nope.json' does not exist"):
        hift_ds.initialize(model=W.tiny_llama(), config=str(missing))
    with pytest.raises(ValueError, match=r"DeepSpeed config file '.*nope.json' does not exist"):
        hift_ds.initialize(args=argparse.Namespace(deepspeed_config=str(missing)), model=W.tiny_llama())
    bad = tmp_path / "bad.json"
    bad.write_text("{\"hift\": {")
    with pytest.raises(ValueError, match=r"is not valid JSON"):
        hift_ds.initialize(model=W.tiny_llama(), config=str(bad))


def test_call_errors():
    with pytest.raises(ValueError, match=r"needs model="):
        hift_ds.initialize(config=_cfg())
    with pytest.raises(ValueError, match=r"no DeepSpeed config"):
        hift_ds.initialize(model=W.tiny_llama())
    with pytest.raises(ValueError, match=r"do not pass optimizer="):
        model = W.tiny_llama()
        hift_ds.initialize(model=model, config=_cfg(), optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match=r"both in the config and passed as lr_scheduler="):
        hift_ds.initialize(model=W.tiny_llama(),
                           config=_cfg(scheduler={"type": "WarmupLR", "params": {"warmup_num_steps": 8}}),
                           lr_scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, 1))


def test_hift_block_offloads_by_default_where_it_saves_memory(caplog):
    assert hift_ds.HiFTConfig().offload.device == "auto"
    assert hift_ds.HiFTConfig(offload={"device": "cpu"}).optimizer_kwargs()["offload"] == "cpu"
    with caplog.at_level("INFO", logger="hift_ds.optim.optimizer"):
        _, opt, _, _ = hift_ds.initialize(model=W.tiny_llama(), config=_cfg(hift={"group_size": 1}))
    assert opt.offload == ("cpu" if opt.device.type == "cuda" else "none")
    assert f"offload {opt.offload} (auto: model on {opt.device.type})" in caplog.text


@pytest.mark.parametrize("var", ["RANK", "WORLD_SIZE", "LOCAL_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE",
                                 "SM_TRAINING_ENV"])
def test_launcher_environment_is_recognised(var, monkeypatch):
    from hift_ds.deepspeed.engine import _LAUNCHER_ENV, launcher_env_present

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    for key in _LAUNCHER_ENV:
        monkeypatch.delenv(key, raising=False)
    assert not launcher_env_present()  # a plain `python script.py`: hift_ds.initialize sets up one rank
    monkeypatch.setenv(var, "1")
    assert launcher_env_present()
