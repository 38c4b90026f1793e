"""GPU tests (``pytest -m gpu``): Triton kernels on CUDA, the offload pipeline's stream ordering, fp16 overflow.

Skipped without CUDA. Run on a GPU machine with ``python -m pytest -m gpu tests/test_gpu.py``.
"""
import os

# Bitwise comparisons below run with deterministic algorithms, which need this before cuBLAS starts.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from conftest import batch, tiny_llama  # noqa: E402
from hift_ds import HiFTOptimizer  # noqa: E402
from hift_ds.optim.pinning import page_round  # noqa: E402
from hift_ds.optim.store import MASTER, GroupStore  # noqa: E402
from test_kernels import CASE_IDS, TRITON_CASES, full, run_flat_steps  # noqa: E402
from test_offload import masters_match_reference, train_against_torch_adamw  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# GPU clock cycles (~20-40 ms on an H100/H200): every copy of the store starts that late, so a compute
# stream that did not wait for a copy would certainly read or overwrite a slot too early.
SLEEP_CYCLES = 50_000_000


@pytest.fixture
def deterministic():
    """Deterministic CUDA algorithms for the bitwise comparisons (atomics would differ run to run)."""
    torch.use_deterministic_algorithms(True, warn_only=True)  # a missing deterministic kernel warns in the log
    yield
    torch.use_deterministic_algorithms(False)


# ---- kernels -------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_dtype", [None, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("name,kw", TRITON_CASES, ids=CASE_IDS)
def test_triton_matches_reference_on_cuda(name, kw, model_dtype):
    """Every optimizer and dtype; fp16 with a loss-scaled gradient (1/1024), several programs per launch."""
    hyper = full(name, **kw)
    inv_scale = 1 / 1024 if model_dtype == torch.float16 else 0.5
    for n in (1, 1023, 2 ** 20 + 7):
        run_flat_steps(name, hyper, n, model_dtype, inv_scale=inv_scale, device="cuda")


# ---- offload pipeline ----------------------------------------------------------------------------
class LateCopies(GroupStore):
    """The store with every copy-in and copy-out delayed on its copy stream."""

    def _copy_in(self, g: int, s: int) -> None:
        if self._h2d is not None:
            with torch.cuda.stream(self._h2d):
                torch.cuda._sleep(SLEEP_CYCLES)
        super()._copy_in(g, s)

    def _start_copy_out(self, s: int) -> None:
        if self._d2h is not None:
            with torch.cuda.stream(self._d2h):
                torch.cuda._sleep(SLEEP_CYCLES)
        super()._start_copy_out(s)


class LateCopiesWithoutWaits(LateCopies):
    """The bug the ordering tests must catch: the compute stream does not wait for the copies."""

    def acquire(self, g: int):
        if g not in self._slot_group:
            self.start_copy_outs()  # as GroupStore.acquire: a deferred copy-in is needed now
        self.prefetch(g)
        s = self.slot_of(g)
        self._filled[s] = self._last_read[s] = None
        return super().acquire(g)


def wide_llama() -> transformers.LlamaForCausalLM:
    """Little compute per byte: 16.8 M parameters per block for a batch of 16 tokens (bf16, on CUDA)."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=1024, num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=8,
                                   intermediate_size=4096, vocab_size=1000, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).to(device="cuda", dtype=torch.bfloat16)


def _train(model, steps: int, chunk: int | None = None, **kw) -> HiFTOptimizer:
    opt = HiFTOptimizer(model, "adamw", lr=1e-2, **kw)
    if chunk is not None:
        opt.store.chunk = chunk  # elements per copy (before the first copy home)
    for s in range(steps):
        x = batch(s).cuda()
        opt.backward(model(input_ids=x, labels=x).loss)
        opt.step()
        opt.zero_grad()
    return opt


@pytest.mark.parametrize("chunk", [None, 1000])
@pytest.mark.parametrize("slots", [1, 2, 3])
@pytest.mark.parametrize("kernel", ["torch", "triton"])
@pytest.mark.parametrize("strategy", ["bottom2up", "random"])
def test_cuda_offload_with_prefetch_is_bitwise_resident(strategy, kernel, slots, chunk, deterministic):
    """Whole groups (one chunk each) or chunks of 1000 elements (about 40 per group, the last one short)."""
    a, b = tiny_llama(dtype=torch.bfloat16).cuda(), tiny_llama(dtype=torch.bfloat16).cuda()
    _train(a, 15, strategy=strategy, kernel=kernel, offload="none")
    opt = _train(b, 15, chunk, strategy=strategy, kernel=kernel, offload="cpu", prefetch=True, offload_slots=slots)
    assert opt.store.pinned and len(opt.store.slots) == slots
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("slots", [1, 2])
def test_cuda_chunked_copies_of_wide_groups_are_bitwise_resident(slots, deterministic):
    """Groups of 200 MB (16.8 M parameters x 12 bytes) in 1 MiB chunks, Triton update: about 190 chunks each way
    per step, the copy-in chasing the copy home through one slot."""
    a, b = wide_llama(), wide_llama()
    _train(a, 8, kernel="triton", offload="none")
    opt = _train(b, 8, kernel="triton", offload="cpu", offload_slots=slots, offload_chunk_mib=1)
    assert opt.store.chunk == 2 ** 18 and max(opt.store._block) // opt.store.chunk > 100
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n


def _status_kib(key: str) -> int | None:
    """A /proc/self/status figure in KiB (VmLck, VmPin), or None where there is none."""
    try:
        with open("/proc/self/status") as f:
            return next((int(line.split()[1]) for line in f if line.startswith(key + ":")), None)
    except OSError:
        return None


def test_cuda_pinned_bytes_are_exactly_the_state_and_unpinned_with_the_store():
    """The store pins its state at its exact size (whole pages), none of it through torch's pinned allocator
    (which would round each block up to a power of two), and unpins it when it goes; a view kept from it stays
    valid, pageable memory."""
    import gc

    torch.cuda.synchronize()
    keys = ("allocated_bytes.current", "num_host_alloc")  # torch's pinned allocator (2.11 has both)
    host = lambda: {k: v for k, v in torch.cuda.host_memory_stats().items() if k in keys}  # noqa: E731
    host_before = host()
    locked_before = {k: _status_kib(k) for k in ("VmLck", "VmPin")}
    model = wide_llama()
    opt = HiFTOptimizer(model, "adamw", lr=1e-2, offload="cpu")
    state = 4 * sum(opt.store._block)
    report = opt.memory_report()
    print(f"state {state} B, pinned {opt.store.pinned_bytes} B, report {report['state_host_pinned']} B, torch pinned "
          f"allocator {host_before} -> {host()}, "
          f"/proc/self/status before {locked_before} after {({k: _status_kib(k) for k in locked_before})}")
    assert opt.store.pinned_bytes == page_round(state) == report["state_host_pinned"] <= 1.02 * state
    assert all(t.is_pinned() for bufs in opt.store.home for t in bufs.values())
    assert host() == host_before
    kept = opt.store.home[1][MASTER]
    values = kept.clone()
    opt.store = None  # the store goes (whatever else keeps the optimizer)
    gc.collect()
    assert not kept.is_pinned() and torch.equal(kept, values)


@pytest.mark.parametrize("model", ["tiny", "wide"])
@pytest.mark.parametrize("slots", [1, 2, 3])
@pytest.mark.parametrize("prefetch", [False, True])
@pytest.mark.parametrize("strategy,num_groups", [("bottom2up", None), ("random", 2)])
def test_cuda_offload_ordering_against_torch_adamw(model, slots, prefetch, strategy, num_groups):
    """Late copies (and, for "wide", little compute per byte): the waits alone keep the result right.

    The reference is torch.optim.AdamW on fp32 copies fed the same gradients: no store, no HiFT kernel.
    "random" with two groups acquires a group twice in a row across a cycle boundary."""
    kw = dict(num_groups=num_groups) if num_groups else {}
    m = wide_llama() if model == "wide" else tiny_llama(dtype=torch.bfloat16).cuda()
    opt, order, ref = train_against_torch_adamw(m, 12, "cuda", store_class=LateCopies if model == "tiny" else None,
                                                chunk=1000 if model == "tiny" else None,
                                                offload="cpu", offload_slots=slots, prefetch=prefetch,
                                                strategy=strategy, seed=1, **kw)
    if num_groups:
        assert any(x == y for x, y in zip(order, order[1:])), order
    assert masters_match_reference(opt, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("slots", [1, 2])
def test_cuda_ordering_test_catches_missing_waits(slots):
    """Negative control: the same test with the compute stream's waits removed must see wrong masters."""
    opt, _, ref = train_against_torch_adamw(tiny_llama(dtype=torch.bfloat16).cuda(), 12, "cuda",
                                            store_class=LateCopiesWithoutWaits, offload="cpu", offload_slots=slots)
    assert not masters_match_reference(opt, ref, rtol=1e-4, atol=1e-5)


# ---- fp16 overflow -------------------------------------------------------------------------------
@pytest.mark.parametrize("kernel", ["torch", "triton"])
def test_cuda_fp16_overflow_skip_equals_a_clean_run_at_the_lowered_scale(kernel, deterministic):
    """The skipped step changes nothing (weights, step counts, group); the retry equals a run at the new scale."""
    overflow_at = 3

    def run(inject: bool):
        model = tiny_llama(dtype=torch.float16).cuda()
        opt = HiFTOptimizer(model, "adamw", lr=1e-3, offload="cpu", kernel=kernel)
        s, injected = 0, False
        while s < 2 * opt.num_groups:
            x = batch(s).cuda()
            if s == overflow_at and not inject:
                opt.scaler.scale = 2.0 ** 15  # the clean run: the lowered scale from the same step on
            opt.backward(model(input_ids=x, labels=x).loss)
            if s == overflow_at and inject and not injected:
                next(p for p in model.parameters() if p.grad is not None).grad.view(-1)[0] = float("inf")
                before = [p.detach().clone() for p in model.parameters()]
                steps, group = list(opt.group_steps), opt.active_group
                opt.step()
                assert opt.overflow and opt.skipped_steps == 1 and opt.loss_scale == 2.0 ** 15
                assert opt.active_group == group and opt.group_steps == steps
                assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
                opt.zero_grad()
                injected = True
                continue  # retry the same batch on the same group
            opt.step()
            opt.zero_grad()
            s += 1
        return model, opt

    a, opt_a = run(True)
    b, opt_b = run(False)
    assert opt_a.group_steps == opt_b.group_steps and opt_a.loss_scale == opt_b.loss_scale == 2.0 ** 15
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
