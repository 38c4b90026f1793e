"""HiFTOptimizer against a plain-PyTorch re-implementation of HiFT's semantics (DESIGN §2)."""
import copy

import pytest
import torch
from torch import nn

from conftest import batch, buckets_started, tiny_llama
from hift_ds import HiFTOptimizer, lr_cycle_scheduler
from hift_ds.distributed.zero12 import Zero12Sharding

OPTIMIZERS = {
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
    "adam": (torch.optim.Adam, dict(lr=1e-2, weight_decay=0.05)),
    "sgd": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=0.1)),
    "sgd_nesterov": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True)),
    "adagrad": (torch.optim.Adagrad, dict(lr=0.05, lr_decay=0.01, weight_decay=0.1)),
}


def train_hift(model, name, steps, **kw):
    opt_name = "sgd" if name.startswith("sgd") else name
    opt = HiFTOptimizer(model, opt_name, **kw, **OPTIMIZERS[name][1])
    order = []
    for s in range(steps):
        order.append(opt.active_group)
        x = batch(s)
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    return opt, order


def train_reference(model, name, order, group_names):
    """torch.optim over all parameters; at each step only the active group has gradients."""
    cls, kw = OPTIMIZERS[name]
    opt = cls(model.parameters(), **kw)
    for s, g in enumerate(order):
        active = set(group_names[g])
        for n, p in model.named_parameters():
            p.requires_grad_(n in active)
        x = batch(s)
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def assert_same_params(a, b):
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(p, q, msg=n)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("strategy", ["bottom2up", "top2down", "random", "shuffled"])
@pytest.mark.parametrize("group_size", [1, 2, 3])  # 5 units: 3 does not divide
def test_equivalent_to_torch_with_only_active_grads(name, strategy, group_size):
    model = tiny_llama()
    ref = copy.deepcopy(model)
    steps = 2 * -(-5 // group_size)
    opt, order = train_hift(model, name, steps, strategy=strategy, group_size=group_size, seed=7)
    assert opt.cycle == 2
    assert sorted(order[:opt.num_groups]) == list(range(opt.num_groups))
    train_reference(ref, name, order, [opt.group_param_names(i) for i in range(opt.num_groups)])
    assert_same_params(model, ref)


def test_custom_optimizer_class_runs_inner():
    model = tiny_llama()
    ref = copy.deepcopy(model)
    opt = HiFTOptimizer(model, torch.optim.RMSprop, lr=1e-2, group_size=2)
    assert opt.backend == "inner"
    order = []
    for s in range(2 * opt.num_groups):
        order.append(opt.active_group)
        x = batch(s)
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    ropt = torch.optim.RMSprop(ref.parameters(), lr=1e-2)
    names = [opt.group_param_names(i) for i in range(opt.num_groups)]
    for s, g in enumerate(order):
        for n, p in ref.named_parameters():
            p.requires_grad_(n in names[g])
        x = batch(s)
        ref(input_ids=x, labels=x).loss.backward()
        ropt.step()
        ropt.zero_grad()
    assert_same_params(model, ref)


def test_frozen_parameters_unchanged_and_without_grad():
    model = tiny_llama()
    opt = HiFTOptimizer(model, "adamw", lr=1e-2, weight_decay=0.1)
    named = dict(model.named_parameters())
    for s in range(2 * opt.num_groups):
        active = set(opt.group_param_names(opt.active_group))
        assert all(p.requires_grad == (n in active) for n, p in named.items())
        before = {n: p.detach().clone() for n, p in named.items()}
        x = batch(s)
        model(input_ids=x, labels=x).loss.backward()
        assert all(p.grad is None for n, p in named.items() if n not in active)
        opt.step()
        for n, p in named.items():
            if n not in active:
                assert torch.equal(p, before[n]), n
        assert any(not torch.equal(named[n], before[n]) for n in active)
        assert all(p.grad is None for p in named.values())  # step() leaves the frozen group clean


def test_lr_advances_once_per_cycle():
    model = tiny_llama()
    opt = HiFTOptimizer(model, "sgd", lr=1.0)
    sched = lr_cycle_scheduler(torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5), opt)
    lrs = []
    for s in range(3 * opt.num_groups):
        lrs.append(opt.param_groups[0]["lr"])
        x = batch(s)
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    k = opt.num_groups
    assert lrs == [1.0] * k + [0.5] * k + [0.25] * k
    state = sched.state_dict()
    assert state["cycles_seen"] == 3


@pytest.mark.parametrize("optimizer", ["sgd", torch.optim.RMSprop], ids=["builtin", "inner"])
def test_max_grad_norm_clips_the_active_group(optimizer):
    model = tiny_llama()
    ref = copy.deepcopy(model)
    opt = HiFTOptimizer(model, optimizer, lr=0.1, max_grad_norm=0.01)
    names = set(opt.group_param_names(0))
    x = batch(0)
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    for n, p in ref.named_parameters():
        p.requires_grad_(n in names)
    ref(input_ids=x, labels=x).loss.backward()
    assert torch.nn.utils.clip_grad_norm_([p for p in ref.parameters() if p.requires_grad], 0.01) > 0.01
    ref_cls = torch.optim.SGD if optimizer == "sgd" else optimizer
    ref_cls([p for p in ref.parameters() if p.requires_grad], lr=0.1).step()
    assert_same_params(model, ref)


def test_no_norm_is_reported_without_clipping():
    """DeepSpeed's engine reports the optimizer's _global_grad_norm; without clipping none is computed."""
    model = tiny_llama()
    opt = HiFTOptimizer(model, "sgd", lr=0.1)
    x = batch(0)
    opt.backward(model(input_ids=x, labels=x).loss)
    opt.step()
    assert opt._global_grad_norm is None


def test_clip_coefficient_is_torchs_for_a_small_norm():
    """torch clips by max_norm / (norm + 1e-6); with a norm near 1e-3 the 1e-6 moves the update by 1e-3 (relative),
    so the update is compared with torch's, not the weights (which it moves by little)."""
    model, max_norm, factor = tiny_llama(), 1e-4, 1e-3
    ref = copy.deepcopy(model)
    opt = HiFTOptimizer(model, "sgd", lr=10.0, max_grad_norm=max_norm)
    active = [n for n in opt.group_param_names(0)]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = batch(0)
    (model(input_ids=x, labels=x).loss * factor).backward()
    opt.step()
    params = dict(ref.named_parameters())
    (ref(input_ids=x, labels=x).loss * factor).backward()
    norm = torch.nn.utils.clip_grad_norm_([params[n] for n in active], max_norm)
    assert 1e-4 < norm < 1e-2  # clipped, and small enough for the 1e-6 to matter
    assert opt._global_grad_norm == pytest.approx(float(norm), rel=1e-5)  # what DeepSpeed's engine reports
    for n in active:
        moved, expected = model.get_parameter(n) - before[n], -10.0 * params[n].grad
        torch.testing.assert_close(moved, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item(), msg=n)


def test_zero_grad_drops_or_zeroes_the_active_gradients():
    model = tiny_llama()
    opt = HiFTOptimizer(model, "sgd", lr=0.1)
    active = opt._params[opt.active_group]
    x = batch(0)
    model(input_ids=x, labels=x).loss.backward()
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in active)
    model(input_ids=x, labels=x).loss.backward()
    opt.zero_grad()  # torch's default: set to None
    assert all(p.grad is None for p in active)


def test_bad_input():
    model = tiny_llama()
    HiFTOptimizer(model, "adamw")  # wrapping twice is fine: the second wrapper sees every group
    assert HiFTOptimizer(model, "adamw").num_groups == 5
    with pytest.raises(ValueError, match="unknown optimizer 'lamb'"):
        HiFTOptimizer(model, "lamb")
    with pytest.raises(TypeError, match="unknown adamw option"):
        HiFTOptimizer(model, "adamw", momentum=0.9)
    with pytest.raises(ValueError, match="not both"):
        HiFTOptimizer(model, "adamw", group_size=2, num_groups=2)
    with pytest.raises(ValueError, match="group_size=9"):
        HiFTOptimizer(model, "adamw", group_size=9)
    with pytest.raises(ValueError, match="group_size: must be >= 1, got 0"):
        HiFTOptimizer(model, "adamw", group_size=0)
    with pytest.raises(ValueError, match="unknown HiFT strategy"):
        HiFTOptimizer(model, "adamw", strategy="middle-out")
    with pytest.raises(TypeError, match="needs the model"):
        HiFTOptimizer(list(model.parameters()), "adamw")
    with pytest.raises(TypeError, match="torch.optim.Optimizer subclass"):
        HiFTOptimizer(model, 3)
    with pytest.raises(ValueError, match=r"offload.device: Input should be 'auto', 'cpu' or 'none' \(got 'disk'\)"):
        HiFTOptimizer(model, "adamw", offload="disk")
    with pytest.raises(ValueError, match="nesterov"):
        HiFTOptimizer(model, "sgd", nesterov=True)
    with pytest.raises(ValueError, match="need a built-in optimizer"):
        HiFTOptimizer(model, torch.optim.RMSprop, offload="cpu")
    for kw, match in ((dict(lr=-1e-3), r"adamw lr must be a finite number >= 0, got -0.001"),
                      (dict(eps=float("nan")), r"adamw eps must be a finite number >= 0"),
                      (dict(betas=(0.9, 1.0)), r"adamw betas must be two numbers in \[0, 1\)"),
                      (dict(amsgrad="yes"), r"adamw amsgrad must be true or false, got 'yes'")):
        with pytest.raises(ValueError, match=match):
            HiFTOptimizer(model, "adamw", **kw)
    with pytest.raises(ValueError, match=r"sgd momentum must be a finite number >= 0, got '0.9'"):
        HiFTOptimizer(model, "sgd", momentum="0.9")


def test_kernel_choice_without_triton_installed(monkeypatch, caplog):
    """'auto' falls back to torch with a warning; an explicit 'triton' names the missing package."""
    import importlib.util

    from hift_ds import kernels

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name, *a))
    with caplog.at_level("WARNING"):
        assert kernels.resolve_backend("auto", "cuda") == "torch"
    assert "triton is not installed" in caplog.text
    with pytest.raises(ValueError, match="needs the triton package: pip install triton"):
        kernels.resolve_backend("triton", "cpu")
    monkeypatch.undo()
    assert kernels.resolve_backend("auto", "cuda") == "triton"


class _WithUnused(nn.Module):
    """Two units; the second holds a parameter the forward never uses."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 1)
        self.spare = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return self.b(torch.tanh(self.a(x))).square().mean()


@pytest.mark.parametrize("variant", ["inner", "flat", "zero1"])
def test_unused_parameter_gets_a_zero_gradient_on_every_backend(variant):
    """DeepSpeed's rule, on every path: weight decay and the step count still apply to it."""
    units = ["a", "b|spare"]
    ref_model, model = _WithUnused(), _WithUnused()
    ref = HiFTOptimizer(ref_model, "adamw", units=units, lr=0.1, weight_decay=0.5)
    kw = {"inner": dict(optimizer=torch.optim.AdamW), "flat": dict(optimizer="adamw", kernel="triton"),
          "zero1": dict(optimizer="adamw", sharding=Zero12Sharding(1))}[variant]
    opt = HiFTOptimizer(model, units=units, lr=0.1, weight_decay=0.5, **kw)
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    for _ in range(4):
        for m, o in ((ref_model, ref), (model, opt)):
            m(x).backward()
            o.step()
            o.zero_grad()
    assert not torch.equal(ref_model.spare, torch.ones(3))  # decayed, as with a zero gradient
    assert ref.group_steps == [2, 2]
    for p, q in zip(ref_model.parameters(), model.parameters()):
        torch.testing.assert_close(p, q)


def test_rewrapping_a_model_frees_the_previous_optimizer():
    """Gradient hooks must not keep an old optimizer (and its flat buffers) alive, nor keep firing."""
    import gc
    import weakref

    model = tiny_llama()
    old = HiFTOptimizer(model, "adamw", kernel="triton", lr=1e-2)
    hooks = sum(len(p._post_accumulate_grad_hooks or {}) for p in model.parameters())
    gone = weakref.ref(old)
    del old
    gc.collect()
    assert gone() is None
    opt = HiFTOptimizer(model, "adamw", kernel="triton", lr=1e-2)
    assert sum(len(p._post_accumulate_grad_hooks or {}) for p in model.parameters()) == hooks
    x = batch(0)
    model(input_ids=x, labels=x).loss.backward()
    opt.step()


def test_flat_path_does_not_reuse_a_gradient_dropped_by_zero_grad():
    """model.zero_grad() then a backward that skips a parameter: that parameter's gradient is zero, not stale."""
    def run(kernel):
        torch.manual_seed(0)
        m = nn.ModuleDict({"a": nn.Linear(3, 3), "b": nn.Linear(3, 3)})
        opt = HiFTOptimizer(m, "sgd", units=["a|b"], kernel=kernel, lr=1.0)
        x = torch.ones(2, 3)
        m["b"](m["a"](x)).sum().backward()
        m.zero_grad()  # sets .grad to None behind the optimizer's back
        m["b"](x).sum().backward()  # a gets no gradient this time
        before = m["a"].weight.detach().clone()
        opt.step()
        return m["a"].weight.detach() - before
    assert torch.equal(run("torch"), torch.zeros(3, 3))
    assert torch.equal(run("triton"), torch.zeros(3, 3))


def test_hyper_parameters_accept_what_torch_accepts():
    import numpy as np

    opt = HiFTOptimizer(tiny_llama(), "adamw", lr=np.float32(1e-3), weight_decay=np.int64(0),
                        betas=np.array([0.9, 0.99]), eps=torch.tensor(1e-8))
    hyper = opt.param_groups[0]
    assert hyper["lr"] == pytest.approx(1e-3) and type(hyper["lr"]) is float
    assert hyper["betas"] == (0.9, 0.99) and hyper["weight_decay"] == 0.0 and type(hyper["eps"]) is float


def test_offload_auto_offloads_on_cuda_only(caplog):
    from hift_ds.optim.optimizer import resolve_offload

    assert resolve_offload("auto", torch.device("cuda", 0), builtin=True) == "cpu"
    assert resolve_offload("auto", torch.device("cpu"), builtin=True) == "none"
    assert resolve_offload("auto", torch.device("cuda", 0), builtin=False) == "none"  # torch classes cannot offload
    assert resolve_offload("cpu", torch.device("cpu"), builtin=True) == "cpu"  # an explicit choice stands
    assert resolve_offload("none", torch.device("cuda", 0), builtin=True) == "none"
    with caplog.at_level("INFO", logger="hift_ds.optim.optimizer"):
        opt = HiFTOptimizer(tiny_llama(), "adamw")  # the default is "auto"
    assert opt.offload == "none" and not opt.store.offloaded
    assert "offload none (auto: model on cpu)" in caplog.text
    assert HiFTOptimizer(tiny_llama(), "adamw", offload="cpu").store.offloaded
    assert HiFTOptimizer(tiny_llama(), torch.optim.RMSprop).offload == "none"  # "auto" does not reject it


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: offload 'auto' offloads only there")
def test_offload_auto_on_cuda_keeps_inactive_groups_in_pinned_host_memory(caplog):
    with caplog.at_level("INFO", logger="hift_ds.optim.optimizer"):
        opt = HiFTOptimizer(tiny_llama(dtype=torch.bfloat16).cuda(), "adamw")
    assert opt.offload == "cpu" and opt.store.offloaded and opt.store.pinned
    assert opt.store.home[0][next(iter(opt.store.kinds))].is_pinned()
    assert "offload cpu (auto: model on cuda), pinned" in caplog.text


def in_buffer(t: torch.Tensor, buf: torch.Tensor) -> bool:
    """Whether ``t`` is a view into the storage of the flat buffer ``buf``."""
    return buf.data_ptr() <= t.data_ptr() < buf.data_ptr() + buf.numel() * buf.element_size()


def test_zero2_backward_reduces_by_default_and_adopts_fresh_grads_as_views():
    """opt.backward() arms the in-backward reduction (last micro-batch by default); grads made by autograd after
    model.zero_grad() become views into the flat buffer, which the step reads (and must not zero again)."""
    model = tiny_llama()
    opt = HiFTOptimizer(model, "adamw", lr=1e-2, sharding=Zero12Sharding(2, reduce_bucket_size=500))
    active = opt._params[opt.active_group]
    buf = opt.sharding.grads.buf_device
    assert all(in_buffer(p.grad, buf) for p in active)
    model.zero_grad(set_to_none=True)
    x = batch(0)
    opt.backward(model(input_ids=x, labels=x).loss)
    assert buckets_started(opt) > 1
    assert all(p.grad is not None and in_buffer(p.grad, buf) for p in active)
    opt.step()
    opt.reduce_in_next_backward()  # called alone (a loop that does its own backward): last micro-batch too
    assert opt.sharding.reducer.armed
