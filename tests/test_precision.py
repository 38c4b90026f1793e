"""fp16: the dynamic loss scaler, and a skipped overflow step (standalone optimizer and DeepSpeed engine).

A step that overflows must leave no trace but the lower loss scale: same weights, same optimizer
state and step counts, same group and LR next step. So a run with one overflow must equal, step by
step and bit for bit, a clean run started at the lowered scale (scaling by a power of two is exact
in fp16 away from its range limits, measured here: the clean runs at 2**16 and 2**15 are identical).
"""
import math
import re

import pytest
import torch

from conftest import batch, tiny_llama
from hift_ds import HiFTOptimizer
from hift_ds.precision import DynamicLossScaler, cast_parameters


def poison_a_gradient(model) -> None:
    """Put an inf into one gradient of the active group, as an fp16 overflow in backward would."""
    grad = next(p.grad for p in model.parameters() if p.grad is not None)
    grad.view(-1)[0] = math.inf


# ---- the model's cast -----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cast_parameters_casts_floating_parameters_only_in_place(dtype):
    """Floating parameters change dtype in place (the optimizer keeps its references); an integer
    parameter and every buffer (such as the rotary inv_freq) stay as they are."""
    model = torch.nn.Linear(3, 2)
    model.register_buffer("inv_freq", torch.tensor([1.0, 1e-4, 1 / 3]))
    model.codes = torch.nn.Parameter(torch.tensor([1, 2]), requires_grad=False)
    params, weight, buffer = list(model.parameters()), model.weight.detach().clone(), model.inv_freq.clone()
    assert cast_parameters(model, dtype) is model
    assert list(model.parameters()) == params  # the same Parameter objects
    assert model.weight.dtype == model.bias.dtype == dtype
    assert torch.equal(model.weight, weight.to(dtype))
    assert model.codes.dtype == torch.int64 and torch.equal(model.inv_freq, buffer)  # buffer still fp32


# ---- the scaler ------------------------------------------------------------------------------------
@pytest.mark.parametrize("hysteresis,consecutive,window", [(1, False, 3), (2, False, 3), (3, False, 3), (2, True, 3),
                                                            (1, False, 1), (2, True, 1)])
def test_loss_scaler_follows_deepspeed(monkeypatch, hysteresis, consecutive, window):
    """Same scale after every step as DeepSpeed's DynamicLossScaler for the same fp16 config."""
    from deepspeed.runtime.fp16 import loss_scaler as ds

    monkeypatch.setattr(ds.dist, "get_rank", lambda *a, **k: 0)  # it only logs on rank 0
    fp16 = {"enabled": True, "initial_scale_power": 10, "loss_scale_window": window, "hysteresis": hysteresis,
            "consecutive_hysteresis": consecutive, "min_loss_scale": 4}
    ours = DynamicLossScaler.from_ds_fp16(fp16)
    ours.raise_at_min_scale = False  # as the reference below, to follow it along the floor
    ref = ds.DynamicLossScaler(init_scale=2.0 ** 10, scale_window=window, min_scale=4, delayed_shift=hysteresis,
                               consecutive_hysteresis=consecutive, raise_error_at_min_scale=False)
    g = torch.Generator().manual_seed(hysteresis + 10 * consecutive)
    # Window 1 doubles the scale after every clean step: more overflows keep it in range.
    flags = (torch.rand(200, generator=g) < (0.3 if window > 1 else 0.7)).tolist() + [True] * 30 + [False] * 10
    scales = []
    for overflow in flags:
        ours.update(overflow)
        ref.update_scale(overflow)
        assert ours.scale == ref.cur_scale, f"step {len(scales)}: {ours.scale} != {ref.cur_scale}"
        scales.append(ours.scale)
    assert len(set(scales)) > 3 and min(scales) == 4  # it went up and down, and hit the floor


def test_loss_scaler_stops_the_run_when_overflowing_at_the_minimum():
    s = DynamicLossScaler(init_scale=8.0, min_scale=4.0)
    s.update(True)
    assert s.scale == 4.0
    with pytest.raises(FloatingPointError, match="^" + re.escape(
            "fp16 gradients still overflow at the minimum loss scale (4); the run has diverged or needs more range: "
            "lower the LR, enable gradient_clipping, use bf16, or lower fp16.min_loss_scale") + "$"):
        s.update(True)


def test_loss_scaler_loads_state_saved_by_the_earlier_counters():
    s = DynamicLossScaler(hysteresis=2)
    s.load_state_dict({"scale": 1024.0, "clean_steps": 5, "overflows_left": 1})
    assert s.scale == 1024.0
    s.update(True)  # one overflow left before a drop
    assert s.scale == 512.0
    # The clean steps count towards the growth window as they did: 4 of 5 saved, so the second clean step grows.
    s = DynamicLossScaler(growth_interval=5)
    s.load_state_dict({"scale": 1024.0, "clean_steps": 4, "overflows_left": 1})
    s.update(False)
    assert s.scale == 1024.0
    s.update(False)
    assert s.scale == 2048.0


def test_loss_scaler_round_trips():
    s = DynamicLossScaler(init_scale=8.0, growth_interval=2)
    for overflow in (False, False, True, False):
        s.update(overflow)
    t = DynamicLossScaler()
    t.load_state_dict(s.state_dict())
    assert t.state_dict() == s.state_dict()
    assert DynamicLossScaler.from_ds_fp16({"loss_scale": 128}).dynamic is False


def test_loss_scaler_defaults_and_bad_settings():
    s = DynamicLossScaler()
    assert (s.scale, s.growth_interval, s.factor, s.min_scale, s.hysteresis, s.consecutive_hysteresis, s.dynamic,
            s.raise_at_min_scale) == (2.0 ** 16, 1000, 2.0, 1.0, 1, False, True, True)
    DynamicLossScaler(init_scale=0.5, factor=1.5, growth_interval=1, hysteresis=1)  # the edges are valid
    for bad in (dict(init_scale=0), dict(factor=1.0), dict(growth_interval=0), dict(hysteresis=0)):
        kw = dict(init_scale=2.0 ** 16, factor=2.0, growth_interval=1000, hysteresis=1) | bad
        with pytest.raises(ValueError, match="^" + re.escape(
                f"invalid loss scaler settings: init_scale={kw['init_scale']}, factor={kw['factor']}, "
                f"growth_interval={kw['growth_interval']}, hysteresis={kw['hysteresis']}") + "$"):
            DynamicLossScaler(**kw)


def test_loss_scaler_from_a_deepspeed_fp16_block():
    """Each key of DeepSpeed's "fp16" block, and DeepSpeed's defaults where a key is absent."""
    ds = DynamicLossScaler.from_ds_fp16({"initial_scale_power": 5, "loss_scale_window": 7, "min_loss_scale": 0.5,
                                         "hysteresis": 3, "consecutive_hysteresis": True})
    assert (ds.scale, ds.growth_interval, ds.min_scale, ds.hysteresis, ds.consecutive_hysteresis, ds.dynamic) == (
        32.0, 7, 0.5, 3, True, True)
    default = DynamicLossScaler.from_ds_fp16({})
    assert (default.scale, default.growth_interval, default.min_scale, default.hysteresis,
            default.consecutive_hysteresis) == (2.0 ** 16, 1000, 1.0, 2, False)
    for value in (128, 1):
        static = DynamicLossScaler.from_ds_fp16({"loss_scale": value})
        for overflow in (True, True, False):
            static.update(overflow)
        assert (static.scale, static.dynamic) == (value, False)


# ---- a skipped step, standalone ---------------------------------------------------------------------
def train_fp16(init_scale: float, steps: int, overflow_at: tuple = (), **kw) -> tuple:
    """``steps`` applied steps (plus a skipped attempt at each of ``overflow_at``); snapshots after each attempt."""
    model = tiny_llama(dtype=torch.float16)
    opt = HiFTOptimizer(model, "adamw", lr=1e-2, weight_decay=0.1, loss_scaler=DynamicLossScaler(
        init_scale, hysteresis=1), **kw)
    attempts, applied = [], 0
    while applied < steps:
        x = batch(applied)  # the retry of a skipped step sees the same batch
        group = opt.active_group
        opt.backward(model(input_ids=x, labels=x).loss)
        if len(attempts) in overflow_at:
            poison_a_gradient(model)
        opt.step()
        opt.zero_grad()
        applied += not opt.overflow
        attempts.append(dict(group=group, overflow=opt.overflow, scale=opt.loss_scale,
                             steps=list(opt.group_steps), done=opt.schedule.steps_done,
                             params=[p.detach().clone() for p in model.parameters()]))
    return opt, attempts


@pytest.mark.parametrize("kernel", ["torch", "triton"], ids=["torch", "flat"])
def test_overflows_skip_and_the_run_equals_a_clean_run_at_the_lower_scale(kernel, caplog):
    """AdamW fp16, two overflows on the first step of group 2: nothing moves, then the retry is the clean run's step."""
    at = 2
    with caplog.at_level("WARNING", logger="hift_ds.optim.optimizer"):
        opt, attempts = train_fp16(2.0 ** 16, 8, overflow_at=(at, at + 1), kernel=kernel, offload="cpu")
    assert [r.getMessage() for r in caplog.records if r.name == "hift_ds.optim.optimizer"] == [
        "fp16 overflow: step skipped, loss scale now 32768", "fp16 overflow: step skipped, loss scale now 16384"]
    ref_opt, ref = train_fp16(2.0 ** 14, 8, kernel=kernel, offload="cpu")
    skipped = [attempts.pop(at), attempts.pop(at)]
    assert opt.skipped_steps == 2 and ref_opt.skipped_steps == 0
    assert [s["scale"] for s in skipped] == [2.0 ** 15, 2.0 ** 14]
    before = attempts[at - 1]
    for s in skipped:
        assert s["overflow"] and s["group"] == attempts[at]["group"] == 2
        assert s["done"] == before["done"] and s["steps"] == before["steps"]  # no step was counted
        assert all(torch.equal(p, q) for p, q in zip(s["params"], before["params"]))
    for i, (mine, theirs) in enumerate(zip(attempts, ref)):
        assert not mine["overflow"] and (mine["group"], mine["done"], mine["steps"]) == (
            theirs["group"], theirs["done"], theirs["steps"]), f"applied step {i}"
        assert all(torch.equal(p, q) for p, q in zip(mine["params"], theirs["params"])), f"applied step {i} differs"
    assert not all(torch.equal(p, q) for p, q in zip(attempts[-1]["params"], attempts[0]["params"]))
    mine, theirs = opt.state_dict(), ref_opt.state_dict()
    for g, (a, b) in enumerate(zip(mine["state"], theirs["state"])):
        assert all(torch.equal(a[k], b[k]) for k in b), f"group {g}: optimizer state differs"


def test_fp16_masters_follow_fp32_sgd_on_unscaled_clipped_gradients():
    """The update sees each gradient divided by the loss scale, and clipped by the active group's unscaled norm.
    Group norms here are 0.6-1.5: a clip at 1 bites on some groups (a wrong clip shows) and not on others (where a
    wrong unscale shows; under the clip it would cancel out)."""
    model = tiny_llama(dtype=torch.float16)
    opt = HiFTOptimizer(model, "sgd", lr=0.1, momentum=0.9, max_grad_norm=1.0, offload="cpu",
                        loss_scaler=DynamicLossScaler(2.0 ** 12, hysteresis=1))
    ref = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    ref_opt = torch.optim.SGD(list(ref.values()), lr=0.1, momentum=0.9)
    clipped = []
    for s in range(2 * opt.num_groups):
        active = opt.group_param_names(opt.active_group)
        x = batch(s)
        opt.backward(model(input_ids=x, labels=x).loss)
        for n, p in model.named_parameters():
            ref[n].grad = p.grad.float() / opt.loss_scale if n in active else None
        clipped.append(bool(torch.nn.utils.clip_grad_norm_([ref[n] for n in active], 1.0) > 1.0))
        opt.step()
        ref_opt.step()
        opt.zero_grad()
    assert any(clipped) and not all(clipped), clipped
    assert not opt.skipped_steps and opt.loss_scale == 2.0 ** 12
    opt.store.synchronize()  # the last group's copy home waits for a forward that does not come
    for g in range(opt.num_groups):
        for name, m, p in zip(opt.group_param_names(g), opt.sharding.split(g, opt.store.home[g]["master"]), opt._params[g]):
            torch.testing.assert_close(m, ref[name], msg=name)
            assert torch.equal(p, m.to(torch.float16)), name


def test_flat_path_keeps_grads_as_views_through_a_skipped_step():
    """After model.zero_grad() and an overflow, the retried group's grads are views into the flat buffer again,
    also for a parameter that got no gradient (as an unused one)."""
    model = tiny_llama(dtype=torch.float16)
    opt = HiFTOptimizer(model, "adamw", kernel="triton", strategy="top2down", lr=1e-2)  # head unit: 2 parameters
    model.zero_grad(set_to_none=True)
    x = batch(0)
    opt.backward(model(input_ids=x, labels=x).loss * math.inf)
    opt._params[opt.active_group][0].grad = None
    opt.step()
    buf = opt.sharding.grads.buf_device
    assert opt.overflow and all(p.grad is not None and buf.data_ptr() <= p.grad.data_ptr() < buf.data_ptr() +
                                buf.numel() * buf.element_size() for p in opt._params[opt.active_group])


# ---- a skipped step through the DeepSpeed engine ----------------------------------------------------
def train_engine_fp16(scale_power: int, steps: int, overflow_at: int | None = None) -> tuple:
    """hift_ds.initialize with fp16 and a per-cycle LR; snapshots after each attempted step."""
    import _engine_worker as W
    import hift_ds

    # WarmupLR over 4 cycles (16 steps, k = 4): the LR differs in every cycle of this run.
    cfg = W.ds_config(fp16={"enabled": True, "initial_scale_power": scale_power, "hysteresis": 1},
                      scheduler={"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 1e-2,
                                                                "warmup_num_steps": 16}})
    engine, opt, _, _ = hift_ds.initialize(model=W.tiny_llama(), config=cfg)
    attempts, applied = [], 0
    while applied < steps:
        x = W.tokens(applied)
        group, lr = opt.active_group, opt.param_groups[opt.active_group]["lr"]
        engine.backward(engine(input_ids=x, labels=x).loss)
        if len(attempts) == overflow_at:
            poison_a_gradient(engine.module)
        engine.step()
        applied += not opt.overflow
        attempts.append(dict(group=group, lr=lr, lr_after=opt.param_groups[opt.active_group]["lr"],
                             overflow=opt.overflow, scale=opt.loss_scale, steps=list(opt.group_steps),
                             params=[p.detach().clone() for p in engine.module.parameters()]))
    return engine, opt, attempts


@pytest.mark.usefixtures("single_rank_env")
def test_engine_fp16_overflow_at_a_cycle_end_retries_like_a_clean_run_and_holds_the_lr():
    """One CPU process trains fp16 through the engine; the skipped last step of cycle 0 neither ends the cycle nor
    moves the LR, and every applied step equals the clean run at the lowered scale."""
    k, at = 4, 3
    engine, opt, attempts = train_engine_fp16(12, 2 * k, overflow_at=at)
    _, ref_opt, ref = train_engine_fp16(11, 2 * k)
    assert all(p.dtype == torch.float16 for p in engine.module.parameters())
    skipped = attempts.pop(at)
    assert skipped["overflow"] and engine.skipped_steps == 1 and opt.skipped_steps == 1
    assert skipped["scale"] == 2.0 ** 11 == ref_opt.loss_scale
    assert skipped["group"] == attempts[at]["group"] == k - 1  # the same group is retried
    assert skipped["lr_after"] == skipped["lr"] == attempts[at]["lr"]  # the LR did not advance on the skip
    assert skipped["steps"] == attempts[at - 1]["steps"]
    assert all(torch.equal(p, q) for p, q in zip(skipped["params"], attempts[at - 1]["params"]))
    for i, (mine, theirs) in enumerate(zip(attempts, ref)):
        assert (mine["group"], mine["lr"], mine["steps"]) == (theirs["group"], theirs["lr"], theirs["steps"]), i
        assert all(torch.equal(p, q) for p, q in zip(mine["params"], theirs["params"])), f"applied step {i} differs"
    lrs = [a["lr"] for a in attempts]
    assert lrs[:k] == [lrs[0]] * k and lrs[k:] == [lrs[k]] * k and 0 < lrs[0] < lrs[k]


def test_overflow_check_runs_on_the_kernel_the_user_chose(monkeypatch):
    """kernel "torch" means no Triton, the fp16 overflow check included (it used Triton on CUDA regardless)."""
    from hift_ds import kernels
    from hift_ds.optim import update

    asked = []
    monkeypatch.setattr(kernels, "has_inf_or_nan_flat", lambda grad, backend: asked.append(backend) or False)

    class OnCuda:  # a flat gradient that says it lives on a GPU; the check itself is stubbed
        is_cuda = True

    assert update.has_overflow(OnCuda(), [], "torch") is False
    assert update.has_overflow(OnCuda(), [], "triton") is False
    assert update.has_overflow(torch.zeros(3), [], "triton") is False  # a CPU tensor: never Triton
    assert asked == ["torch", "triton", "torch"]
