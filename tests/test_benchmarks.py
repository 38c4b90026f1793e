"""The training benchmarks (benchmarks/compare.py, offload.py, harness.py) run end to end on a tiny model."""
from __future__ import annotations

import argparse
import importlib.util
import io
import json
import math
import os
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def _load(name: str, path: Path):
    # Loaded by file, not by putting benchmarks/ on sys.path, where its kernels.py would shadow
    # the top-level kernels package for every later test.
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


harness = _load("harness", BENCH / "harness.py")  # offload.py does `import harness`
offload_bench = _load("bench_offload", BENCH / "offload.py")

QUICK = ["--model", "tiny", "--steps", "2", "--warmup", "0", "--batch-size", "2", "--seq-len", "32"]
COMPARE_MODES = ["fpft", "hift", "hift-offload", "hift-offload-triton", "ds-zero2", "badam"]
CUDA_ONLY = {"hift-offload-triton", "ds-zero2", "ds-zero2-offload"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Both scripts started at once (each runs its modes one after another), then their results."""
    tmp = tmp_path_factory.mktemp("bench")
    env = dict(os.environ, OMP_NUM_THREADS="1")  # two scripts on two cores: one thread each
    cmds = {"compare": [sys.executable, str(BENCH / "compare.py"), *QUICK, "--modes", ",".join(COMPARE_MODES),
                        "--json", str(tmp / "compare.json")],
            "offload": [sys.executable, str(BENCH / "offload.py"), *QUICK, "--trace", str(tmp / "trace"),
                        "--json", str(tmp / "offload.json")]}
    procs = {k: subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp)
             for k, c in cmds.items()}
    out = {}
    for k, p in procs.items():
        stdout, stderr = p.communicate(timeout=300)
        out[k] = {"rc": p.returncode, "stdout": stdout, "stderr": stderr,
                  "json": json.loads((tmp / f"{k}.json").read_text()) if (tmp / f"{k}.json").exists() else None}
    return out


def _check_rows(rows: list[dict], modes: list[str]) -> None:
    assert [r["mode"] for r in rows] == modes
    for r in rows:
        if r["mode"] in CUDA_ONLY and not torch.cuda.is_available():
            assert r["status"] == "skipped" and "CUDA" in r["error"], r
        elif r["mode"] == "badam" and r["status"] != "ok":
            assert "pip install badam" in r["error"], r
        else:
            assert r["status"] == "ok", r
            assert r["error"] is None
            assert math.isfinite(r["final_loss"]) and all(math.isfinite(x) for x in r["losses"])
            assert r["step_ms"] > 0 and r["tokens_per_s"] > 0 and len(r["step_ms_all"]) == 2


@pytest.mark.slow
def test_compare_runs_every_mode_and_explains_skips(runs):
    res = runs["compare"]
    assert res["rc"] == 0, res["stderr"][-3000:]
    assert "step/fpft" in res["stdout"] and "final loss" in res["stdout"]
    for mode in COMPARE_MODES:
        assert mode in res["stdout"]
    _check_rows(res["json"]["rows"], COMPARE_MODES)
    assert res["json"]["meta"]["options"]["model"] == "tiny"
    rows = {r["mode"]: r for r in res["json"]["rows"]}
    # Same model, seed and data: every mode starts from the same loss.
    assert rows["hift"]["losses"][0] == pytest.approx(rows["fpft"]["losses"][0], abs=0.05)
    # hift and hift-offload do the same arithmetic; only where the state lives differs.
    assert rows["hift"]["losses"] == rows["hift-offload"]["losses"]
    assert rows["hift-offload"]["memory_report"]["state_device"] < rows["hift"]["memory_report"]["state_device"]


@pytest.mark.slow
def test_offload_benchmark_prints_table_targets_and_ratios(runs):
    res = runs["offload"]
    assert res["rc"] == 0, res["stderr"][-3000:]
    out = res["stdout"]
    assert "step/fpft" in out and "step/hift" in out and "targets (issue 4)" in out
    modes = offload_bench.MODES
    _check_rows(res["json"]["rows"], modes)
    checks = res["json"]["targets"]
    assert {c["result"] for c in checks} <= {"PASS", "FAIL", "n/a"}
    step_vs_hift = next(c for c in checks if c["mode"] == "hift-offload" and "1.05" in c["target"])
    assert step_vs_hift["result"] in ("PASS", "FAIL")  # timings exist on CPU too
    if not torch.cuda.is_available():
        assert "skipped" in res["json"]["trace"] and "CUDA" in res["json"]["trace"]["skipped"]


def _row(mode: str, step: float | None, alloc: float | None, status: str = "ok") -> dict:
    args = argparse.Namespace(model="tiny", dtype="bf16", batch_size=1, seq_len=8, steps=1, warmup=0, group_size=1)
    r = harness.failed_row(mode, args, "boom") if status != "ok" else harness.failed_row(mode, args, None, "ok")
    r.update(step_ms=step, peak_alloc_gib=alloc, peak_reserved_gib=alloc, tokens_per_s=8.0, final_loss=1.0)
    return r


def test_targets_pass_fail_from_measured_ratios():
    rows = [_row("fpft", 100.0, 20.0), _row("hift", 60.0, 12.0), _row("hift-offload", 62.0, 8.0)]
    checks = {(c["mode"], c["limit"]): c for c in offload_bench.targets(rows)}
    assert checks[("hift-offload", 0.5)]["result"] == "PASS"  # 8 <= 0.5 * 20
    assert checks[("hift-offload", 1.05)]["result"] == "PASS"  # 62 <= 1.05 * 60
    assert checks[("hift-offload", 0.65)]["result"] == "PASS"  # 62 <= 65
    rows[2]["step_ms"] = 70.0
    checks = {(c["mode"], c["limit"]): c for c in offload_bench.targets(rows)}
    assert checks[("hift-offload", 1.05)]["result"] == "FAIL" and checks[("hift-offload", 0.65)]["result"] == "FAIL"
    assert checks[("hift-offload-triton", 0.5)]["result"] == "n/a"  # did not run


def test_format_table_survives_failed_baseline():
    rows = [_row("fpft", None, None, status="failed"), _row("hift", 50.0, None)]
    table = harness.format_table(rows, baseline=("fpft", "hift"))
    assert "failed: boom" in table and "1.00x" in table  # hift vs itself; no ratio to the failed fpft


def test_overlap_summary_counts_side_stream_copy_under_kernels():
    ev = lambda cat, name, ts, dur, stream: {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur,  # noqa: E731
                                            "args": {"stream": stream}}
    events = [ev("kernel", "gemm", 0, 100, 7), ev("kernel", "gemm", 150, 50, 7),
              ev("gpu_memcpy", "Memcpy HtoD (Pinned -> Device)", 50, 100, 13),  # 50 of 100 us under kernels
              ev("gpu_memcpy", "Memcpy DtoH (Device -> Pinned)", 300, 20, 13),  # none
              ev("gpu_memcpy", "Memcpy DtoH (Device -> Pageable)", 210, 5, 7)]  # compute stream: not "side"
    s = offload_bench.overlap_summary(events)
    assert s["side_memcpy_ms"] == pytest.approx(0.12) and s["side_overlapped_ms"] == pytest.approx(0.05)
    assert s["streams"]["13"]["HtoD_ms"] == pytest.approx(0.1) and s["streams"]["13"]["side_stream"]
    assert not s["streams"]["7"]["side_stream"] and s["compute_streams"] == ["7"]
    assert "overlapped compute" in offload_bench.format_overlap({**s, "path": "x", "steps": 1})


def test_worker_reports_out_of_memory_as_a_row(monkeypatch):
    def oom(args, device):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setitem(harness.MODES, "oom", harness.Mode(oom))
    args = harness.make_parser("t", str(BENCH / "compare.py")).parse_args([*QUICK, "--_worker", "oom"])
    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = harness.worker_main(args)
    line = buf.getvalue().strip().splitlines()[-1]
    row = json.loads(line[len(harness.RESULT_MARK):])
    assert rc == 1 and row["status"] == "failed" and row["error"].startswith("CUDA out of memory")
    assert harness._describe(ModuleNotFoundError("x", name="badam.block_optim"))[1] == \
        "package badam not installed: pip install badam"


quality = _load("bench_quality", BENCH / "quality.py")


def _q(label: str, seed: int, acc: float, loss: float) -> dict:
    return {"label": label, "seed": seed, "lr": 1e-4, "seconds": 10.0,
            "before": {"eval_loss": 1.6, "accuracy": 0.2}, "after": {"eval_loss": loss, "accuracy": acc}}


def test_quality_aggregates_seeds_and_judges_the_means():
    runs = [_q("fpft", 1, 0.98, 0.06), _q("fpft", 2, 0.96, 0.08),
            _q("hift random", 1, 0.97, 0.10), _q("hift random", 2, 0.94, 0.12),
            _q("hift top2down", 1, 0.96, 0.10), {"label": "hift top2down", "seed": 2, "error": "boom"}]
    fpft, rnd, t2d = quality.aggregate(runs)
    assert fpft["after"]["accuracy"] == pytest.approx(0.97)
    assert fpft["after_std"]["accuracy"] == pytest.approx(0.0141421, rel=1e-4)
    assert rnd["after"]["accuracy"] == pytest.approx(0.955)
    assert quality.verdict(rnd, fpft) == "FAIL"  # 1.5 points below the fpft mean
    assert t2d["seeds"] == [1] and t2d["failed_seeds"] == [2]
    assert quality.verdict(t2d, fpft) == "PASS"  # 1 point below: at the limit
    table = quality.format_table([fpft, rnd, t2d])
    assert "0.9550 +-0.021" in table and "FAIL" in table and "untrained" in table


def test_quality_rejects_a_single_seed_flag(monkeypatch):
    def no_training(*a, **k):
        raise AssertionError("bad flags must be rejected before any training starts")
    monkeypatch.setattr(quality, "run_one", no_training)
    with pytest.raises(SystemExit, match="--seeds"):
        quality.main(["--seed", "3"])
    with pytest.raises(SystemExit, match="comma-separated integers"):
        quality.main(["--seeds", "1,x"])
