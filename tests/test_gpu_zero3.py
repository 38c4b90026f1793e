"""GPU check of ZeRO-3 + HiFT on one CUDA device (``pytest -m gpu tests/test_gpu_zero3.py``, well under a minute).

``hift_ds.initialize`` on one rank with NCCL (its single-process path, no launcher), bf16, a small LLaMA
built inside ``deepspeed.zero.Init`` on the GPU, the fused Triton update writing DeepSpeed's partitions,
the pinned offload store: after two cycles (random order, accumulation) it must follow stage 0.
The run is a fresh process (tests/_gpu_zero3_worker.py), so no earlier test's CPU process group or
DeepSpeed accelerator is in the way. Skipped without CUDA; ``HIFT_GPU_CHECK_DEVICE=cpu`` runs the same
worker on the CPU with gloo (a rehearsal: the torch update instead of Triton, the store without streams).
"""
import os
import subprocess
import sys

import pytest
import torch

from test_zero3 import relative

HERE = os.path.dirname(os.path.abspath(__file__))
DEVICE = os.environ.get("HIFT_GPU_CHECK_DEVICE") or ("cuda" if torch.cuda.is_available() else None)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    DEVICE is None, reason="needs a CUDA GPU (HIFT_GPU_CHECK_DEVICE=cpu rehearses it on the CPU)")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("gpu_zero3")
    env = {**os.environ, "DS_ACCELERATOR": DEVICE, "PYTHONPATH": os.pathsep.join(
        [os.path.dirname(HERE), *filter(None, [os.environ.get("PYTHONPATH")])])}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)  # the engine's own single-process path sets them
    proc = subprocess.run([sys.executable, os.path.join(HERE, "_gpu_zero3_worker.py"), str(out)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return torch.load(out / "gpu_zero3.pt", weights_only=False)


def test_stage3_on_one_device_follows_stage0(runs):
    ref, got, init = runs[0], runs[3], runs["initial"]
    print("stage 0:", ref["facts"], "\nstage 3:", got["facts"])  # for the device log
    assert got["facts"]["steps_done"] == ref["facts"]["steps_done"] == 12
    # The same bf16 weights and batch: the first loss agrees to the rounding of a bf16 forward.
    assert got["losses"][0] == pytest.approx(ref["losses"][0], rel=1e-2)
    assert got["weights"].keys() == ref["weights"].keys() == init.keys()
    moved = max(float((ref["weights"][k].float() - init[k].float()).abs().max()) for k in init)
    assert moved > 1e-3, "stage 0 did not train: the comparison would prove nothing"
    losses = ref["losses"]
    assert sum(losses[-4:]) < sum(losses[:4]) - 0.4, losses  # it learns to count
    # One rank, no active clipping: the same sums in the same order. Bit-exact on the CPU; on a GPU the only
    # candidate difference is DeepSpeed's linear against torch's (matmul kernels), a last bit in bf16.
    # A wrong partition, a lost gradient or a stale gather moves the trajectory by tens of percent.
    dev = relative(got["weights"], ref["weights"], init)
    print(f"stage 3 vs stage 0: weights {dev:.2e} of how far training moved")
    assert dev < 0.05
    for g, (a, b) in enumerate(zip(ref["state"], got["state"])):
        assert a.keys() == b.keys()
        for kind in a:
            assert float((b[kind] - a[kind]).norm() / a[kind].norm()) < 0.05, (g, kind)
    assert max(abs(x - y) for x, y in zip(got["losses"], ref["losses"])) < 0.05 * max(ref["losses"])


def test_stage3_ran_on_the_device_paths(runs):
    facts = runs[3]["facts"]
    assert facts["partition_devices"] == [facts["device"]]
    assert facts["released"] and 0 < facts["persistent"] < facts["params"]  # matrices gathered only when used
    assert facts["memory"]["state_host_pinned" if DEVICE == "cuda" else "state_host_pageable"] > 0
    if DEVICE == "cuda":
        assert facts["device"].startswith("cuda") and "nccl" in facts["dist_backend"]
        assert facts["kernel"] == "triton" == runs[0]["facts"]["kernel"]
    else:
        assert facts["device"] == "cpu" and facts["dist_backend"] == "gloo" and facts["kernel"] == "torch"
