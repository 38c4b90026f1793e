"""Shared fixtures: CPU-only environment and tiny models."""
import os
import socket

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    # Before transformers loads: it imports triton (via torch._dynamo), and triton reads this
    # variable when its language helpers are first defined. Kernels then run on CPU tensors.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import transformers  # noqa: E402

transformers.logging.set_verbosity_error()


def tiny_llama(layers: int = 3, seed: int = 0, dtype=torch.float32) -> transformers.LlamaForCausalLM:
    """A seeded LlamaForCausalLM small enough for CPU tests (layers + 2 units)."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                                   num_key_value_heads=2, intermediate_size=64, vocab_size=100,
                                   max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).to(dtype)


def batch(step: int, size: int = 2, seq: int = 8) -> torch.Tensor:
    """Deterministic token ids for a given step index."""
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, 100, (size, seq), generator=g)


@pytest.fixture
def llama():
    """A tiny 3-layer Llama (5 units)."""
    return tiny_llama()


@pytest.fixture(autouse=True)
def _restore_functional_linear():
    """DeepSpeed's zero.Init replaces torch.nn.functional.linear for the whole process (memory_efficient_linear):
    put it back after each test, so a ZeRO-3 test cannot change the numerics of the tests after it."""
    linear = torch.nn.functional.linear
    yield
    torch.nn.functional.linear = linear


def free_port() -> int:
    """A TCP port free on this machine now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_launch(script: str, world: int, out: str, ckpt: str, phase: str, timeout: int = 400) -> None:
    """Run tests/<script> on ``world`` gloo ranks with the arguments OUT CKPT PHASE; it must succeed."""
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
                           "--master_port", str(free_port()), os.path.join(os.path.dirname(__file__), script),
                           out, ckpt, phase], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def torchrun_worker(script: str, world: int, out: str, ckpt: str, phase: str, timeout: int = 400) -> dict:
    """Run tests/<script> on ``world`` gloo ranks (args OUT CKPT PHASE); rank 0's OUT/<phase>_w<world>.pt."""
    torchrun_launch(script, world, out, ckpt, phase, timeout)
    return torch.load(os.path.join(out, f"{phase}_w{world}.pt"), weights_only=False)


@pytest.fixture(scope="module")
def single_rank_env():
    """What DeepSpeed needs to run in this process without a launcher (else it tries MPI)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DS_ACCELERATOR", "cpu")
        for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1").items():
            mp.setenv(k, v)
        if not torch.distributed.is_initialized():
            mp.setenv("MASTER_PORT", str(free_port()))
        yield


def assert_equal_tree(a, b, where="") -> None:
    """Bit-for-bit equality of nested dicts/lists of tensors and plain values."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            assert_equal_tree(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.fixture
def store_allocations(monkeypatch) -> list:
    """Every buffer a GroupStore allocates from now on, as (numel, device) entries in the returned list."""
    from hift_ds.optim.store import GroupStore

    made, alloc = [], GroupStore._alloc

    def counting(self, n, device, fill):
        made.append((n, device))
        return alloc(self, n, device, fill)
    monkeypatch.setattr(GroupStore, "_alloc", counting)
    return made


def buckets_started(optimizer) -> int:
    """Buckets of the active group the ZeRO-2 reducer has started so far (before the step: during backward)."""
    return sum(optimizer.sharding.reducer.launched)
