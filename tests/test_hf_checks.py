"""Every input a HiFT trainer refuses: one clear error at construction, and nothing built or changed."""
import copy
import json
import os
import sys

import deepspeed
import pytest
import torch
import transformers

from hift_ds.units import FROZEN_BY_HIFT

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _hf_worker as W  # noqa: E402
from conftest import tiny_llama  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures("single_rank_env")  # the DeepSpeed cases build their arguments in process


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    with W.isolated_accelerate():
        yield


def ds(**changes) -> dict:
    """ds_configs/trainer/hift.json with top-level keys replaced."""
    with open(os.path.join(ROOT, "ds_configs", "trainer/hift.json")) as f:
        return {**json.load(f), **changes}


def lora_model():
    import peft

    return peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))


def _adapters_via_transformers():
    # What PreTrainedModel.add_adapter marks (it needs peft >= 0.22; the registry here has 0.21.2).
    model = tiny_llama()
    model._hf_peft_config_loaded = True
    return model


# case: (trainer keyword arguments, TrainingArguments keyword arguments, exception, message)
CASES = {
    "unknown_hift_key": (dict(hift={"group_sise": 2}), {}, ValueError,
                         r"unknown key 'group_sise' \(valid keys: group_size, num_groups"),
    "hift_not_a_dict": (dict(hift="group_size=1"), {}, TypeError, r"hift= must be a dict of HiFT settings"),
    "optim_set": (dict(), dict(optim="adafactor"), ValueError,
                  r"optim='adafactor' is set, but HiFT builds its own optimizer .*remove optim="),
    "optim_args_set": (dict(), dict(optim_args="foo=1"), ValueError, r"optim_args='foo=1' is set"),
    "optimizers_given": (dict(optimizers=(torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=1.0), None)), {},
                         ValueError, r"optimizers= is set, but HiFT builds the optimizer"),
    "scheduler_given": (dict(optimizers=(None, object())), {}, ValueError, r"optimizers= is set"),
    "optimizer_cls_not_a_class": (dict(optimizer_cls_and_kwargs=("sgd", {})), {}, TypeError,
                                  r"optimizer_cls_and_kwargs must be \(a torch.optim.Optimizer subclass"),
    "peft_lora_model": (dict(model=lora_model), {}, ValueError,
                        r"PeftModel carries PEFT adapters .*merge_and_unload"),
    "adapters_added_by_transformers": (dict(model=_adapters_via_transformers), {}, ValueError,
                                       r"LlamaForCausalLM carries PEFT adapters"),
    "fp16_weights_without_deepspeed": (dict(model=lambda: tiny_llama(dtype=torch.float16)), {}, ValueError,
                                       r"weights are float16, .*load the model in bfloat16"),
    "zero_3": (dict(), dict(deepspeed=ds(zero_optimization={"stage": 3})), ValueError,
               r"zero_optimization.stage=3 in the DeepSpeed config is not supported by the HiFT Trainer; use stage "
               r"0, 1 or 2 .* or train at ZeRO-3 with hift_ds.initialize or launch/train.py"),
    "deepspeed_offload_optimizer": (dict(), dict(deepspeed=ds(zero_optimization={
        "stage": 2, "offload_optimizer": {"device": "cpu"}})), ValueError,
        r"zero_optimization.offload_optimizer does not apply to HiFT; .*\"offload\": \{\"device\": \"cpu\"\}"),
    "zero_4": (dict(), dict(deepspeed=ds(zero_optimization={"stage": 4})), ValueError,
               r"^zero_optimization.stage=4 is not one of 0, 1, 2, 3$"),
    "deepspeed_offload_param": (dict(), dict(deepspeed=ds(zero_optimization={
        "stage": 1, "offload_param": {"device": "cpu"}})), ValueError,
        r"^zero_optimization.offload_param does not apply to HiFT; "),
    "deepspeed_optimizer_option": (dict(), dict(deepspeed=ds(optimizer={"type": "AdamW", "params": {"momentum": 0.9}})),
                                   ValueError, r"optimizer.params: unknown adamw option\(s\) \['momentum'\]"),
    "deepspeed_scheduler_type": (dict(), dict(deepspeed=ds(scheduler={"type": "CosineForever", "params": {
        "warmup_num_steps": "auto"}})), ValueError, r"scheduler type 'CosineForever' is not one of DeepSpeed's"),
    "deepspeed_negative_clipping": (dict(), dict(deepspeed=ds(), max_grad_norm=-1.0), ValueError,
                                    r"^gradient_clipping must be >= 0 \(0 disables clipping\), got -1.0$"),
    "hift_twice": (dict(hift={"group_size": 2}), dict(deepspeed=ds()), ValueError,
                   r"HiFT settings are given twice: as hift= and as the DeepSpeed config's \"hift\" block"),
    "unknown_hift_key_in_deepspeed_config": (dict(), dict(deepspeed=ds(hift={"sharding": 1})), ValueError,
                                             r"unknown key 'sharding'"),
    "deepspeed_optimizer_not_hift": (dict(), dict(deepspeed=ds(optimizer={"type": "Lamb", "params": {}})), ValueError,
                                     r"optimizer.type: unknown optimizer 'Lamb'"),
    "deepspeed_and_optimizer_cls": (dict(optimizer_cls_and_kwargs=(torch.optim.SGD, {})), dict(deepspeed=ds()),
                                    ValueError, r"optimizer_cls_and_kwargs= is set together with deepspeed="),
    "deepspeed_and_metric_schedule": (dict(), dict(deepspeed=ds(), lr_scheduler_type="reduce_lr_on_plateau",
                                                   eval_strategy="steps"), ValueError,
                                      r"lr_scheduler_type='reduce_lr_on_plateau' steps on evaluation metrics"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_refused_with_one_clear_error_and_nothing_built(tmp_path, case):
    from hift_ds.hf import HiFTTrainer

    trainer_kwargs, args_kwargs, exc, match = copy.copy(CASES[case])
    model = trainer_kwargs.pop("model", tiny_llama)()
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    initialize = deepspeed.initialize
    args = transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], **args_kwargs)
    with pytest.raises(exc, match=match):
        HiFTTrainer(model=model, args=args, train_dataset=W.CountingData(), **trainer_kwargs)
    # Nothing half-built: no parameter frozen or marked by HiFT, no weight changed, DeepSpeed untouched.
    assert {n: p.requires_grad for n, p in model.named_parameters()} == requires_grad
    assert not any(hasattr(p, FROZEN_BY_HIFT) for p in model.parameters())
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    assert deepspeed.initialize is initialize


def test_sft_trainer_refuses_peft_config(tmp_path):
    import peft
    from hift_ds.hf import HiFTSFTTrainer

    with pytest.raises(ValueError, match=r"peft_config= is set, but HiFT is full-parameter fine-tuning"):
        HiFTSFTTrainer(model=tiny_llama(), train_dataset=W.CountingData(), peft_config=peft.LoraConfig(r=2))


def test_with_hift_needs_a_trainer_class():
    from hift_ds.hf import HiFTTrainer, with_hift

    with pytest.raises(TypeError, match=r"with_hift needs a transformers.Trainer subclass, got <class 'dict'>"):
        with_hift(dict)
    assert with_hift(HiFTTrainer) is HiFTTrainer
    assert HiFTTrainer.__name__ == "HiFTTrainer" and issubclass(HiFTTrainer, transformers.Trainer)
