"""Update kernels: the torch reference against torch.optim, the Triton kernels (run by Triton's CPU
interpreter) against the reference, overflow detection, backend dispatch and the benchmark script."""
import math
import os

import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Before any Triton kernel is decorated: the kernels then run on CPU tensors through the interpreter. Not on
# a CUDA machine, where the process's kernels must compile for the GPU (tests/test_gpu.py runs them there).
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from hift_ds import kernels  # noqa: E402
from hift_ds.kernels import reference  # noqa: E402

try:
    import triton  # noqa: F401,E402
    TRITON_ERROR = None
except Exception as exc:  # pragma: no cover - depends on the machine
    TRITON_ERROR = f"triton cannot be imported: {exc!r}"
if TRITON_ERROR is None and os.environ.get("TRITON_INTERPRET") != "1":
    TRITON_ERROR = "these tests run the kernels on CPU tensors through Triton's interpreter (CPU-only machines)"
needs_triton = pytest.mark.skipif(TRITON_ERROR is not None, reason=TRITON_ERROR or "")

ROOT = Path(__file__).resolve().parents[1]
TORCH_CLS = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD,
             "adagrad": torch.optim.Adagrad}


def full(name: str, **kw) -> dict:
    """Hyper-parameters of optimizer ``name``: its defaults overridden by ``kw``."""
    return {**reference.DEFAULTS[name], **kw}


def new_state(name: str, hyper: dict, params: list[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    """Freshly initialised state lists for ``params``."""
    return {k: [torch.full_like(p, v) for p in params] for k, v in reference.state_kinds(name, hyper).items()}


# ---- 1. reference vs torch.optim -------------------------------------------------------------
REF_CASES = [
    ("adamw", dict(lr=1e-2, weight_decay=0.1)),
    ("adamw", dict(lr=1e-2, amsgrad=True, maximize=True)),
    ("adam", dict(lr=1e-2, weight_decay=0.1)),
    ("adam", dict(lr=1e-2, weight_decay=0.1, amsgrad=True, betas=(0.3, 0.9))),
    ("sgd", dict(lr=0.1)),
    ("sgd", dict(lr=0.1, momentum=0.9)),
    ("sgd", dict(lr=0.1, momentum=0.9, dampening=0.3)),
    ("sgd", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1)),
    ("sgd", dict(lr=0.1, weight_decay=0.1, maximize=True)),
    ("adagrad", dict(lr=0.1, lr_decay=0.05, initial_accumulator_value=0.3)),
    ("adagrad", dict(lr=0.1, weight_decay=0.1, eps=1e-6)),
    # Non-default eps, maximize and a weight decay of exactly 1 (a decay factor the code must not take for "off").
    ("adamw", dict(lr=1e-2, weight_decay=1.0, eps=1e-3)),
    ("adam", dict(lr=1e-2, eps=1e-3, maximize=True)),
    ("sgd", dict(lr=0.1, momentum=0.9, weight_decay=1.0)),
    ("adagrad", dict(lr=0.1, weight_decay=1.0, maximize=True)),
]


@pytest.mark.parametrize("name,kw", REF_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(REF_CASES)])
def test_reference_matches_torch_optim(name, kw):
    torch.manual_seed(0)
    hyper = full(name, **kw)
    ours = [torch.randn(7, 5), torch.randn(13)]
    theirs = [p.clone().requires_grad_() for p in ours]
    opt = TORCH_CLS[name](theirs, **hyper)
    state = new_state(name, hyper, ours)
    for step in range(1, 5):
        grads = [torch.randn_like(p) for p in ours]
        for p, g in zip(theirs, grads):
            p.grad = g.clone()
        opt.step()
        reference.update(name, hyper, ours, grads, state, [step] * len(ours))
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b.detach())


@pytest.mark.parametrize("name,kw", [("adamw", dict(lr=1e-2)), ("adam", dict(lr=1e-2, amsgrad=True)),
                                     ("sgd", dict(lr=0.1, momentum=0.9, dampening=0.5)),
                                     ("adagrad", dict(lr=0.1, lr_decay=0.1))])
def test_reference_per_parameter_steps(name, kw):
    """A parameter whose first update comes late gets torch's first-step bias correction."""
    torch.manual_seed(1)
    hyper = full(name, **kw)
    ours = [torch.randn(6), torch.randn(4)]
    theirs = [p.clone().requires_grad_() for p in ours]
    opt = TORCH_CLS[name](theirs, **hyper)
    state = new_state(name, hyper, ours)
    steps = [0, 0]
    for step in range(1, 6):
        active = [0] if step < 4 else [0, 1]  # the second parameter first trains at step 4
        grads = {i: torch.randn_like(ours[i]) for i in active}
        for i, p in enumerate(theirs):
            p.grad = grads[i].clone() if i in grads else None
        opt.step()
        for i in active:
            steps[i] += 1
        reference.update(name, hyper, [ours[i] for i in active], [grads[i] for i in active],
                         {k: [v[i] for i in active] for k, v in state.items()}, [steps[i] for i in active])
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b.detach())
    assert steps == [5, 2]


@pytest.mark.parametrize("name", sorted(reference.DEFAULTS))
def test_reference_unscales_gradients_and_fills_in_defaults(name):
    """inv_scale multiplies the gradients (fp16 loss scale, clipping); absent hyper-parameters take torch's."""
    gen = torch.Generator().manual_seed(2)
    grads = [torch.randn(9, generator=gen) for _ in range(2)]
    kw = dict(lr=0.1, momentum=0.9) if name == "sgd" else dict(lr=0.1)
    results = []
    for inv_scale, hyper, scaled in ((1.0, full(name, **kw), grads), (2.0, kw, [g / 2 for g in grads]),
                                     (0.5, full(name, **kw), [g * 2 for g in grads])):
        params = [torch.ones(9), torch.zeros(9)]
        state = new_state(name, full(name, **kw), params)
        for step in (1, 2):
            reference.update(name, hyper, params, scaled, state, [step, step], inv_scale=inv_scale)
        results.append(params)
    for params in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], params))
    assert not torch.equal(results[0][0], torch.ones(9))


def test_reference_finds_inf_and_nan_in_any_gradient():
    finite = [torch.zeros(0), torch.full((3,), torch.finfo(torch.float16).max, dtype=torch.float16), torch.ones(4)]
    assert reference.has_inf_or_nan([]) is False and reference.has_inf_or_nan(finite) is False
    for bad in (math.inf, -math.inf, math.nan):
        assert reference.has_inf_or_nan(finite + [torch.tensor([1.0, bad])]) is True


def test_state_kinds_per_optimizer_and_settings():
    assert reference.state_kinds("adamw", {}) == reference.state_kinds("adam", {"amsgrad": False}) == {
        "exp_avg": 0.0, "exp_avg_sq": 0.0}
    assert reference.state_kinds("adam", {"amsgrad": True}) == {"exp_avg": 0.0, "exp_avg_sq": 0.0,
                                                                  "max_exp_avg_sq": 0.0}
    assert reference.state_kinds("sgd", {}) == reference.state_kinds("sgd", {"momentum": 0.0}) == {}
    assert reference.state_kinds("sgd", {"momentum": 0.9}) == {"momentum_buffer": 0.0}
    assert reference.state_kinds("adagrad", {}) == {"sum": 0.0}
    assert reference.state_kinds("adagrad", {"initial_accumulator_value": 0.3}) == {"sum": 0.3}
    message = "^unknown optimizer 'lamb'; expected one of \\['adagrad', 'adam', 'adamw', 'sgd'\\]$"
    with pytest.raises(ValueError, match=message):
        reference.state_kinds("lamb", {})
    with pytest.raises(ValueError, match=message):
        reference.update("lamb", {}, [], [], {}, [])


# ---- 2. Triton (interpreter) vs reference ----------------------------------------------------
TRITON_CASES = [
    ("adamw", dict(lr=1e-2, weight_decay=0.0)),
    ("adamw", dict(lr=1e-2, weight_decay=0.1)),
    ("adamw", dict(lr=1e-2, weight_decay=0.1, amsgrad=True, maximize=True)),
    ("adam", dict(lr=1e-2, weight_decay=0.1, betas=(0.3, 0.99))),
    ("sgd", dict(lr=0.1, weight_decay=0.0)),
    ("sgd", dict(lr=0.1, momentum=0.9, dampening=0.2, weight_decay=0.1)),
    ("sgd", dict(lr=0.1, momentum=0.9, nesterov=True, maximize=True)),
    ("adagrad", dict(lr=0.1, weight_decay=0.0)),
    ("adagrad", dict(lr=0.1, lr_decay=0.05, initial_accumulator_value=0.2, eps=1e-6, weight_decay=0.1)),
]
CASE_IDS = [f"{n}-{i}" for i, (n, _) in enumerate(TRITON_CASES)]
GRAD_DTYPE = {None: torch.float32, torch.bfloat16: torch.bfloat16, torch.float16: torch.float16}
MODEL_TOL = {torch.bfloat16: dict(rtol=1.6e-2, atol=1e-5), torch.float16: dict(rtol=1e-3, atol=1e-5)}


def make_flat(name: str, hyper: dict, n: int, model_dtype, seed: int = 0, device: str = "cpu"):
    """A group of three views over flat buffers, with its state, for the flat path."""
    g = torch.Generator().manual_seed(seed)
    sizes = [n // 2, 0, n - n // 2]
    flat = {"param": torch.randn(n, generator=g).to(device)}
    for k, v in reference.state_kinds(name, hyper).items():
        flat[k] = torch.full((n,), v, device=device)
    if model_dtype is not None:
        flat["model"] = flat["param"].to(model_dtype)
    return flat, sizes


def split(t: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """Views of consecutive slices of the 1-D ``t``."""
    return list(t.split(sizes))


def run_flat_steps(name: str, hyper: dict, n: int, model_dtype, *, inv_scale: float, nsteps: int = 3,
                   device: str = "cpu") -> None:
    """Three Triton flat steps against the reference (on ``device``), checking masters, states and the cast."""
    flat, sizes = make_flat(name, hyper, n, model_dtype, device=device)
    ref_p = flat["param"].clone()
    ref_state = {k: [v.clone()] for k, v in flat.items() if k not in ("param", "model")}
    gen = torch.Generator().manual_seed(42)
    gdtype = GRAD_DTYPE[model_dtype]
    for step in range(1, nsteps + 1):
        grad = (torch.randn(n, generator=gen) / inv_scale).to(device=device, dtype=gdtype)
        flat["grad"] = grad
        params, grads = split(flat["param"], sizes), split(grad, sizes)
        state = {k: split(v, sizes) for k, v in flat.items() if k not in ("param", "grad", "model")}
        kernels.apply_update(name, hyper, params, grads, state, [step] * len(sizes), backend="triton", flat=flat,
                             inv_scale=inv_scale)
        reference.update(name, hyper, [ref_p], [grad], ref_state, [step], inv_scale=inv_scale)
        torch.testing.assert_close(flat["param"], ref_p, rtol=1e-5, atol=1e-6)
        for k, v in ref_state.items():
            torch.testing.assert_close(flat[k], v[0], rtol=1e-5, atol=1e-6)
        if model_dtype is not None:
            assert torch.equal(flat["model"], flat["param"].to(model_dtype))
            torch.testing.assert_close(flat["model"], ref_p.to(model_dtype), **MODEL_TOL[model_dtype])


@needs_triton
@pytest.mark.parametrize("model_dtype", [None, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("name,kw", TRITON_CASES, ids=CASE_IDS)
def test_triton_flat_matches_reference(name, kw, model_dtype):
    hyper = full(name, **kw)
    inv_scale = 1 / 1024 if model_dtype == torch.float16 else 0.5
    for n in (0, 1, 1023):
        run_flat_steps(name, hyper, n, model_dtype, inv_scale=inv_scale)


@needs_triton
def test_triton_flat_large_and_many_programs(monkeypatch):
    """2**20+7 elements (17 programs at the interpreter's block), then many small blocks."""
    run_flat_steps("adamw", full("adamw", lr=1e-2, weight_decay=0.1), 2**20 + 7, torch.bfloat16, inv_scale=0.5)
    monkeypatch.setenv("HIFT_TRITON_BLOCK", "128")
    run_flat_steps("sgd", full("sgd", lr=0.1, momentum=0.9), 1000, torch.float16, inv_scale=0.25)


@needs_triton
@pytest.mark.parametrize("name,kw", [TRITON_CASES[2], TRITON_CASES[3], TRITON_CASES[5], TRITON_CASES[8]],
                         ids=[CASE_IDS[i] for i in (2, 3, 5, 8)])
def test_triton_multi_tensor_matches_reference(name, kw, monkeypatch):
    """Separate tensors, per-parameter step counts, mixed grad dtypes, several chunks per tensor."""
    monkeypatch.setenv("HIFT_TRITON_BLOCK", "256")
    hyper = full(name, **kw)
    gen = torch.Generator().manual_seed(3)
    shapes = [(3,), (0,), (30, 50), (1,), (700,)]
    params = [torch.randn(s, generator=gen) for s in shapes]
    models = [p.to(torch.bfloat16) for p in params]
    ref = [p.clone() for p in params]
    state, ref_state = new_state(name, hyper, params), new_state(name, hyper, params)
    steps = [0, 4, 2, 0, 7]
    for it in range(3):
        active = [0, 1, 2, 4] if it == 0 else [0, 1, 2, 3, 4]  # param 3 first trains on the second step
        for i in active:
            steps[i] += 1
        grads = {i: (torch.randn(shapes[i], generator=gen) * 4).to(torch.bfloat16 if i % 2 else torch.float32)
                 for i in active}
        pick = lambda lst: [lst[i] for i in active]  # noqa: E731
        kernels.apply_update(name, hyper, pick(params), pick(grads), {k: pick(v) for k, v in state.items()},
                             pick(steps), backend="triton", inv_scale=0.25, model_params=pick(models))
        reference.update(name, hyper, pick(ref), pick(grads), {k: pick(v) for k, v in ref_state.items()},
                         pick(steps), inv_scale=0.25)
        for p, r, m in zip(params, ref, models):
            torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-6)
            assert torch.equal(m, p.to(torch.bfloat16))
        for k in state:
            for a, b in zip(state[k], ref_state[k]):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@needs_triton
def test_triton_flat_with_unequal_steps_falls_back_to_multi_tensor():
    name, hyper = "adamw", full("adamw", lr=1e-2, weight_decay=0.1)
    flat, sizes = make_flat(name, hyper, 600, torch.bfloat16)
    sizes = [100, 500]
    flat["grad"] = torch.randn(600)
    ref_p, ref_state = flat["param"].clone(), {k: [v.clone()] for k, v in flat.items() if k.startswith("exp")}
    params, grads = split(flat["param"], sizes), split(flat["grad"], sizes)
    state = {k: split(v, sizes) for k, v in flat.items() if k.startswith("exp")}
    kernels.apply_update(name, hyper, params, grads, state, [3, 1], backend="triton", flat=flat)
    ref_views = split(ref_p, sizes)
    reference.update(name, hyper, ref_views, split(flat["grad"], sizes),
                     {k: split(v[0], sizes) for k, v in ref_state.items()}, [3, 1])
    torch.testing.assert_close(flat["param"], ref_p, rtol=1e-5, atol=1e-6)
    assert torch.equal(flat["model"], flat["param"].to(torch.bfloat16))


@needs_triton
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # numpy, for fp16 -> inf
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_cast_rounds_to_nearest_even(dtype):
    """Ties, carries into the exponent, overflow to inf, subnormals, inf and nan: bit-exact with torch."""
    bits = torch.tensor([0x3F808000, 0x3F818000, 0x3F80FFFF, 0x3F808001, 0x3FFF8000, 0x7F7FFFFF, 0x7F7F7FFF,
                         0xBF808000, 0x00000001, 0x00008000, 0x00018000, 0x7F800000, 0xFF800000, 0x7FC00000,
                         0x477FF000, 0x477FEFFF, 0x33800000, 0x33000001, 0x387FE000],
                        dtype=torch.int64).to(torch.int32).view(torch.float32)
    x = torch.cat([bits, torch.randn(5000) * 1e3, torch.randn(5000) * 1e-6])
    master, model = x.clone(), torch.empty(x.numel(), dtype=dtype)
    flat = {"param": master, "grad": torch.zeros_like(master), "model": model}
    kernels.apply_update("sgd", full("sgd", lr=0.0), [master], [flat["grad"]], {}, [1], backend="triton", flat=flat)
    expected = x.to(dtype)
    nan = expected.isnan()
    assert torch.equal(model.isnan(), nan)
    assert torch.equal(model[~nan].view(torch.int16), expected[~nan].view(torch.int16))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_inf_or_nan_flat_detects_overflow(dtype, monkeypatch):
    monkeypatch.setenv("HIFT_TRITON_BLOCK", "256")
    grad = torch.randn(5000).to(dtype)
    assert kernels.has_inf_or_nan_flat(grad, backend="triton") is False
    assert kernels.has_inf_or_nan_flat(grad[:0], backend="triton") is False
    for bad in (float("inf"), float("-inf"), float("nan")):
        g = grad.clone()
        g[4999] = bad  # in the last program's block
        assert kernels.has_inf_or_nan_flat(g, backend="triton") is True
        assert kernels.has_inf_or_nan_flat(g, backend="torch") is True
    # The largest finite value is not an overflow (a strict or dtype-blind bound would say it is).
    top = grad.clone()
    top[0], top[4999] = torch.finfo(dtype).max, -torch.finfo(dtype).max
    assert kernels.has_inf_or_nan_flat(top, backend="triton") is False


@needs_triton
def test_loss_scaled_fp16_grad_matches_reference(monkeypatch):
    """A loss-scaled fp16 grad: overflow found as the reference finds it; once finite, unscaled like the reference."""
    monkeypatch.setenv("HIFT_TRITON_BLOCK", "256")
    gen = torch.Generator().manual_seed(7)
    # 1/loss scale times a clipping coefficient, as the optimizer folds both into one factor (not a power of 2).
    inv_scale = 0.37 / 65536
    # Grads of order 1 scaled by 2**16: the fp16 values span up to fp16's 65504 limit.
    g = (torch.randn(1000, generator=gen) * 2e4).clamp(-65504, 65504).to(torch.float16)
    g[:2] = torch.tensor([65504.0, -65504.0])
    overflowed = (torch.randn(1000, generator=gen) * 6e4).to(torch.float16)  # the cast itself makes infs
    nan_only = g.clone()
    nan_only[-1] = float("nan")
    for grad in (g, overflowed, nan_only, g[:3], g[-1:]):
        assert kernels.has_inf_or_nan_flat(grad, backend="triton") is reference.has_inf_or_nan([grad])
    assert reference.has_inf_or_nan([overflowed]) and not reference.has_inf_or_nan([g])  # both outcomes covered
    # The finite grad: fused AdamW steps against the torch reference. The states are compared too: Adam's step is
    # nearly scale-invariant, so a wrong unscale (never, twice, rounded to fp16) shows in the moments first.
    hyper = full("adamw", lr=1e-2, weight_decay=0.1)
    param = torch.randn(1000, generator=gen)
    flat = {"param": param.clone(), "grad": g, "exp_avg": torch.zeros(1000), "exp_avg_sq": torch.zeros(1000),
            "model": param.to(torch.float16)}
    ref_p, ref_state = param.clone(), {"exp_avg": [torch.zeros(1000)], "exp_avg_sq": [torch.zeros(1000)]}
    for step in (1, 2, 3):
        kernels.apply_update("adamw", hyper, [flat["param"]], [g], {k: [flat[k]] for k in ref_state}, [step],
                             backend="triton", flat=flat, inv_scale=inv_scale)
        reference.update("adamw", hyper, [ref_p], [g], ref_state, [step], inv_scale=inv_scale)
        torch.testing.assert_close(flat["param"], ref_p, rtol=1e-5, atol=1e-6)
        for k, v in ref_state.items():
            torch.testing.assert_close(flat[k], v[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(flat["model"], ref_p.to(torch.float16), **MODEL_TOL[torch.float16])
    assert not torch.equal(flat["param"], param)  # the update really ran


# ---- 3. dispatch -------------------------------------------------------------------------------
def test_resolve_backend(monkeypatch):
    assert kernels.resolve_backend("auto", "cpu") == "torch"
    assert kernels.resolve_backend("torch", "cpu") == "torch"
    assert kernels.resolve_backend("triton", "cpu") == "triton"  # the interpreter is on in this module
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        kernels.resolve_backend("triton", "cpu")
    with pytest.raises(ValueError, match="not one of"):
        kernels.resolve_backend("cuda", "cpu")


@needs_triton
def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    p, g = torch.zeros(4), torch.ones(4)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        kernels.apply_update("sgd", full("sgd"), [p], [g], {}, [1], backend="triton")
    assert torch.equal(p, torch.zeros(4))


def test_torch_backend_copies_into_model_params():
    p, g = torch.randn(10), torch.randn(10)
    model = torch.zeros(10, dtype=torch.bfloat16)
    kernels.apply_update("sgd", full("sgd", lr=0.5), [p], [g], {}, [1], model_params=[model])
    assert torch.equal(model, p.to(torch.bfloat16))


def test_import_does_not_load_triton():
    code = "import sys, hift_ds.kernels; assert 'triton' not in sys.modules, 'triton was imported'"
    subprocess.run([sys.executable, "-c", code], check=True, env={k: v for k, v in os.environ.items()
                                                                   if k != "TRITON_INTERPRET"})


# ---- benchmark script ----------------------------------------------------------------------
@needs_triton
def test_benchmark_cpu_smoke(tmp_path):
    out = tmp_path / "bench.json"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "update_kernels.py"), "--cpu-smoke", "--json", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "adamw" in res.stdout and out.exists()


def test_benchmark_without_gpu_exits_cleanly():
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "update_kernels.py")], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and "needs a CUDA GPU" in res.stdout


@needs_triton
def test_every_kernel_variant_compiles_for_h100():
    """Triton's code generator (which the interpreter skips) accepts every variant, for sm_90."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "_compile_kernels.py")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "compiled 48 variants for sm_90" in proc.stdout
