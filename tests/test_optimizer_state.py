"""HiFTOptimizer.state_dict / load_state_dict: every kind of state resumes exactly; mismatches are refused."""
import copy
import math
import re

import pytest
import torch

from conftest import assert_equal_tree, batch, tiny_llama
from hift_ds import HiFTOptimizer
from hift_ds.distributed.zero12 import Zero12Sharding
from hift_ds.precision import DynamicLossScaler

# Each variant keeps different state: moments and a random order; an inner torch optimizer's own state dict;
# fp32 masters of bf16 weights in the offloaded store; fp16's loss scale and skipped steps; ZeRO-2 shards.
VARIANTS = {
    "adamw-random": dict(dtype=torch.float32, optimizer="adamw", strategy="random", seed=3, lr=1e-2,
                         weight_decay=0.1),
    "inner-rmsprop": dict(dtype=torch.float32, optimizer=torch.optim.RMSprop, lr=1e-2),
    "bf16-offload": dict(dtype=torch.bfloat16, optimizer="adamw", offload="cpu", lr=1e-2),
    "fp16-overflow": dict(dtype=torch.float16, optimizer="sgd", lr=0.1, momentum=0.9),
    "zero2-one-rank": dict(dtype=torch.bfloat16, optimizer="adamw", lr=1e-2,
                           sharding=lambda: Zero12Sharding(2, reduce_bucket_size=500)),
}
SAVE_AT, STOP_AT, OVERFLOW_AT = 7, 12, 2


def make(variant: str, seed: int = 0) -> tuple:
    kw = dict(VARIANTS[variant])
    model = tiny_llama(seed=seed, dtype=kw.pop("dtype"))
    if variant.startswith("fp16"):
        kw["loss_scaler"] = DynamicLossScaler(hysteresis=1)
    if "sharding" in kw:
        kw["sharding"] = kw["sharding"]()  # one strategy per optimizer
    return model, HiFTOptimizer(model, **kw)


def train(model, opt, start: int, stop: int) -> None:
    for s in range(start, stop):
        x = batch(s)
        opt.backward(model(input_ids=x, labels=x).loss)
        if s == OVERFLOW_AT and opt.scaler is not None:
            next(p.grad for p in model.parameters() if p.grad is not None).view(-1)[0] = math.inf
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_state_dict_round_trip_resumes_exactly(variant):
    """Saved mid-cycle, loaded into a new optimizer (created with other hyper-parameters): the same run, bit for bit."""
    a, opt_a = make(variant)
    train(a, opt_a, 0, SAVE_AT)
    for pg in opt_a.param_groups:  # as an LR scheduler would: the checkpoint must carry it
        pg["lr"] *= 0.5
    saved_model, saved_opt = copy.deepcopy(a.state_dict()), copy.deepcopy(opt_a.state_dict())
    assert saved_opt["hift"]["version"] == 1 and all("params" not in pg for pg in saved_opt["param_groups"])
    train(a, opt_a, SAVE_AT, STOP_AT)

    b, opt_b = make(variant, seed=5)
    if not opt_b.keeps_masters:  # fp32 weights are the model's; bf16/fp16 weights must come from the saved masters
        b.load_state_dict(saved_model)
    opt_b.load_state_dict(saved_opt)
    assert [pg["lr"] for pg in opt_b.param_groups] == [pg["lr"] for pg in opt_a.param_groups]
    assert opt_b.schedule.steps_done == SAVE_AT - opt_a.skipped_steps and opt_b.active_group == (
        opt_a.schedule.order(1)[2] if variant == "adamw-random" else opt_b.schedule.steps_done % opt_b.num_groups)
    if variant.startswith("fp16"):
        assert (opt_b.skipped_steps, opt_b.loss_scale) == (1, 2.0 ** 15)
    train(b, opt_b, SAVE_AT, STOP_AT)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
    assert_equal_tree(opt_b.state_dict(), opt_a.state_dict(), "optimizer")


def whole(message: str) -> str:
    return "^" + re.escape(message) + "$"


def test_state_dict_from_another_run_is_refused():
    opt1 = HiFTOptimizer(tiny_llama(), "adamw", group_size=1)
    opt2 = HiFTOptimizer(tiny_llama(), "adamw", group_size=2)
    with pytest.raises(ValueError, match=whole(
            "checkpoint grouping differs from this optimizer's: saved 5 groups, this run has 3, or the parameter names "
            "differ; use the same model, units, group_size/num_groups as the saved run")):
        opt2.load_state_dict(opt1.state_dict())
    with pytest.raises(ValueError, match=whole(
            "not a HiFTOptimizer state dict (no 'hift' entry); was it saved by another optimizer?")):
        opt2.load_state_dict(torch.optim.AdamW(tiny_llama().parameters()).state_dict())
    opt3 = HiFTOptimizer(tiny_llama(), "sgd", group_size=1, lr=0.1)
    with pytest.raises(ValueError, match=whole("checkpoint was saved with optimizer 'adamw', this run uses 'sgd'")):
        opt3.load_state_dict(opt1.state_dict())
    amsgrad = HiFTOptimizer(tiny_llama(), "adamw", amsgrad=True)
    with pytest.raises(ValueError, match=whole(
            "checkpoint lacks optimizer state 'max_exp_avg_sq' of group 0; it was saved with other optimizer settings "
            "(e.g. amsgrad, momentum or precision)")):
        amsgrad.load_state_dict(opt1.state_dict())


def test_fp16_state_resumes_in_bf16():
    """Switching an fp16 run to bf16 on resume: masters and moments load, the loss scale is dropped."""
    a, opt_a = make("fp16-overflow")
    train(a, opt_a, 0, SAVE_AT)
    b = tiny_llama(seed=5, dtype=torch.bfloat16)
    opt_b = HiFTOptimizer(b, "sgd", lr=0.1, momentum=0.9)
    opt_b.load_state_dict(opt_a.state_dict())
    assert opt_b.scaler is None and opt_b.schedule.steps_done == opt_a.schedule.steps_done
    masters = opt_a.state_dict()["state"]
    for g in range(opt_b.num_groups):  # the bf16 weights are the casts of the fp16 run's masters
        assert all(torch.equal(p, m.to(torch.bfloat16)) for p, m in zip(opt_b._params[g],
                                                                         opt_b.sharding.split(g, masters[g]["master"])))
