"""The training benchmarks (benchmarks/compare.py, offload.py, harness.py) run end to end on a tiny model."""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def _load(name: str, path: Path):
    # Loaded by file: benchmarks/ stays off sys.path for every later test.
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


harness = _load("harness", BENCH / "harness.py")  # offload.py does `import harness` (and traces, paired)
traces = _load("traces", BENCH / "traces.py")
hostmem = _load("hostmem", BENCH / "hostmem.py")  # paired.py's imports
pipeline = _load("pipeline", BENCH / "pipeline.py")
paired = _load("paired", BENCH / "paired.py")
offload_bench = _load("bench_offload", BENCH / "offload.py")

QUICK = ["--model", "tiny", "--steps", "2", "--warmup", "0", "--sync-steps", "1", "--batch-size", "2", "--seq-len", "32"]
COMPARE_MODES = ["fpft", "hift", "hift-offload", "hift-offload-triton", "ds-zero2", "badam-50", "torchao-offload"]
CUDA_ONLY = {m for m, s in harness.MODES.items() if s.needs_cuda}


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
        elif r["mode"].startswith("badam") and r["status"] != "ok":
            assert "pip install badam" in r["error"], r
        else:
            assert r["status"] == "ok", r
            assert r["error"] is None
            assert math.isfinite(r["final_loss"]) and all(math.isfinite(x) for x in r["losses"])
            assert len(r["losses"]) == 2 + 1  # the window's 2 steps, then --sync-steps 1
            assert r["step_ms"] > 0 and r["tokens_per_s"] > 0 and len(r["step_ms_all"]) == 2
            assert r["window_ms"] > 0 and r["step_ms_sync"] > 0


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
    assert "step/fpft" in out and "step/hift" in out and "targets, from this run" in out
    modes = offload_bench.MODES
    _check_rows(res["json"]["rows"], modes)
    rows = {r["mode"]: r for r in res["json"]["rows"]}
    checks = res["json"]["targets"]
    step_vs_hift = next(c for c in checks if c["mode"] == "hift-offload" and c["limit"] == 1.05)
    # The verdict is this run's measured ratio against its limit (on CPU the timings say nothing of a GPU).
    assert step_vs_hift["ratio"] == pytest.approx(rows["hift-offload"]["step_ms"] / rows["hift"]["step_ms"])
    assert step_vs_hift["result"] == ("PASS" if step_vs_hift["ratio"] <= 1.05 else "FAIL")
    assert rows["hift"]["losses"] == rows["hift-offload"]["losses"] == rows["hift-offload-noprefetch"]["losses"]
    sizes = rows["hift-offload"]["group_state_bytes"]  # what one step copies each way, per group
    # bf16 weights (2 bytes per parameter), fp32 master + two moments (12 bytes) per parameter, 6 groups
    assert len(sizes) == 6 and sum(sizes) == 6 * rows["hift"]["memory_report"]["model_weights"]
    if not torch.cuda.is_available():
        assert "CUDA" in res["json"]["trace"]["skipped"]


def _row(mode: str, step: float | None, alloc: float | None, status: str = "ok") -> dict:
    args = argparse.Namespace(model="tiny", dtype="bf16", batch_size=1, seq_len=8, steps=1, warmup=0, group_size=1)
    r = harness.failed_row(mode, args, "boom") if status != "ok" else harness.failed_row(mode, args, None, "ok")
    r.update(step_ms=step, peak_alloc_gib=alloc, peak_reserved_gib=alloc, tokens_per_s=8.0, final_loss=1.0)
    return r


def test_targets_pass_fail_from_measured_ratios():
    rows = [_row("fpft", 100.0, 20.0), _row("hift-triton", 50.0, 12.0), _row("hift-offload-triton", 52.0, 8.0)]
    checks = {(c["mode"], c["target"].split(" x ")[-1], c["limit"]): c
              for c in offload_bench.targets(rows, {"side_overlap_fraction": 0.95})}
    assert checks[("hift-offload-triton", "hift-triton", 1.05)]["result"] == "PASS"  # 52 <= 1.05 * 50
    assert checks[("hift-offload-triton", "fpft", 0.55)]["result"] == "PASS"  # 52 <= 55
    assert checks[("hift-offload-triton", "fpft", 0.5)]["result"] == "PASS"  # 8 <= 0.5 * 20 GiB
    overlap = next(c for c in offload_bench.targets(rows, {"side_overlap_fraction": 0.95}) if "overlap" in c["target"])
    assert overlap["result"] == "PASS"
    rows[2]["step_ms"] = 56.0
    checks = {(c["mode"], c["limit"]): c for c in offload_bench.targets(rows, {"side_overlap_fraction": 0.5})}
    assert checks[("hift-offload-triton", 1.05)]["result"] == "FAIL" and checks[("hift-offload-triton", 0.55)][
        "result"] == "FAIL"
    assert checks[("hift-offload-triton", 0.9)]["result"] == "FAIL"  # half the copy time hidden
    assert checks[("hift-offload", 1.05)]["result"] == "n/a"  # did not run
    assert all(c["result"] == "n/a" for c in offload_bench.targets(rows[:1]))


def test_headline_lower_bound_and_table():
    bw = {"h2d_gbps": 40.0, "d2h_gbps": 50.0, "both_gbps_each_way": 30.0}
    two = {"mode": "hift-offload-triton", "status": "ok", "step_ms": 120.0, "group_state_bytes": [2e9, 4e9]}
    # 3 GB each way per step: in 75 ms + out 60 ms one after the other, or 100 ms both at once: 100 bounds
    b = offload_bench.lower_bound(two, 60.0, bw)
    assert b["copy_in_ms"] == pytest.approx(75.0) and b["copy_out_ms"] == pytest.approx(60.0)
    assert b["copy_both_ms"] == pytest.approx(100.0) and b["bound_ms"] == pytest.approx(100.0)
    assert b["step_over_bound"] == pytest.approx(1.2)
    slow_both = offload_bench.lower_bound(two, 60.0, dict(bw, both_gbps_each_way=20.0))  # 150 ms at once
    assert slow_both["bound_ms"] == pytest.approx(135.0)  # one direction after the other is faster
    assert offload_bench.lower_bound(two, 60.0, {"h2d_gbps": 40.0, "d2h_gbps": 50.0})["bound_ms"] == pytest.approx(135)
    assert offload_bench.lower_bound(two, 140.0, bw)["bound_ms"] == 140.0  # compute-bound
    args = argparse.Namespace(model="llama-7b", dtype="bf16", batch_size=1, seq_len=512, steps=3, warmup=2,
                              group_size=1, gradient_checkpointing=False, max_memory_gib=24.0)
    row = harness.failed_row("hift-offload-triton", args, None, "ok")
    row.update(step_ms=120.0, window_ms=121.0, step_ms_sync=130.0, peak_alloc_gib=20.1, peak_reserved_gib=21.0,
               peak_device_gib=21.6, bound=dict(b, compute_from="trace kernel time"), fits_cap=True)
    text = offload_bench.format_headline({"cap_gib": 24.0, "bandwidth": bw, "rows": [
        row, harness.failed_row("hift-triton", args, "CUDA out of memory: x")]})
    assert "bound 100 ms" in text and "both at once 100" in text and "-> 1.20x" in text and "fits" in text
    assert "both at once 30.0 GB/s each way" in text and "failed: CUDA out of memory" in text


def test_headline_prints_each_row_as_measured(monkeypatch, capsys):
    """A headline cut short by a time limit keeps the rows it printed; the bound uses the resident compute."""
    from hift_ds.profile import setups
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(setups, "run_isolated", lambda *a, **kw: {"status": "ok", "row": {
        "h2d_gbps": 40.0, "d2h_gbps": 50.0, "both_gbps_each_way": 30.0}})
    step = {"hift-triton": 70.0, "hift-offload-triton": 120.0, "hift-offload-triton-1slot": 150.0}

    def fake_rows(modes, args, **kw):
        r = dict(harness._base_row(modes[0], args, "a GPU"), status="ok", error=None)
        r.update(step_ms=step[modes[0]], window_ms=1.0, step_ms_sync=1.0, peak_alloc_gib=20.0,
                 peak_reserved_gib=25.0 if modes[0] != "hift-triton" else 90.0, peak_device_gib=None,
                 group_state_bytes=[3e9])
        return [r]

    monkeypatch.setattr(offload_bench.harness, "run_modes_in_subprocesses", fake_rows)
    args = offload_bench.harness.make_parser("x", "x", model="llama-1b", batch_size=4, seq_len=512).parse_args([])
    args = harness.with_overrides(args, headline_cap_gib=24.0, headline_batches="1", headline_steps=3, trace=None)
    result = offload_bench.headline(args)
    out = capsys.readouterr().out
    assert [r["mode"] for r in result["rows"]] == ["hift-triton", "hift-offload-triton", "hift-offload-triton-1slot"]
    assert out.count("1x512") == 3 and "bound 100 ms (compute 70 from hift-triton (resident)" in out
    assert "-> 1.50x" in out and "DOES NOT FIT" in out  # 150 / 100; 25 GiB reserved under a 24 GiB cap


def test_steady_window_times_each_step_and_keeps_losses_on_the_device():
    from hift_ds.profile import setups
    from hift_ds.profile.presets import random_batch

    built = setups.build("hift-offload", setups.Options(model="tiny", batch_size=2, seq_len=16), torch.device("cpu"))
    batches = [random_batch(1000, 2, 16, i) for i in range(3)]
    per_step, wall, losses = harness.steady_window(built, batches, torch.device("cpu"))
    assert len(per_step) == 3 == len(losses) and all(t > 0 for t in per_step)
    assert sum(per_step) <= wall * 1.01 and all(isinstance(x, float) and math.isfinite(x) for x in losses)


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
    assert s["kernel_busy_ms"] == pytest.approx(0.15) and s["gpu_window_ms"] == pytest.approx(0.32)
    assert s["host_blocking_calls"] == {}
    blocked = offload_bench.overlap_summary(events + [ev("cuda_runtime", "cudaStreamSynchronize", 0, 2000, 0),
                                                      ev("cuda_runtime", "cudaLaunchKernel", 0, 5, 0)])
    assert blocked["host_blocking_calls"] == {"cudaStreamSynchronize": {"count": 1, "ms": 2.0}}
    text = offload_bench.format_overlap({**blocked, "path": "x", "steps": 1})
    assert "overlapped compute" in text and "kernels busy 0.1 of 0.3 ms" in text
    assert "cudaStreamSynchronize 1x 2.0 ms" in text


# ---- one-process paired timing (benchmarks/paired.py) -------------------------------------------
def test_block_order_is_abba_so_a_linear_drift_falls_on_every_setup_alike():
    assert paired.block_order(["A", "B"], 2) == ["A", "B", "B", "A"]
    assert paired.block_order(["A", "B"], 3) == ["A", "B", "B", "A", "A", "B"]
    assert paired.block_order(["A", "B"], 1) == ["A", "B"]
    assert paired.block_order(["A", "B", "C"], 2) == ["A", "B", "C", "C", "B", "A"]
    for names, blocks in ((["A", "B"], 2), (["A", "B"], 4), (["A", "B", "C"], 2), (["A", "B", "C"], 6)):
        order = paired.block_order(names, blocks)
        assert all(order.count(n) == blocks for n in names)
        # Even rounds: every set-up's blocks sit at the same mean position, so a drift linear in time
        # (clocks, heat) adds the same to each; a plain A B A B order would not.
        means = {n: statistics.fmean(i for i, m in enumerate(order) if m == n) for n in names}
        assert len(set(means.values())) == 1, (order, means)
    plain = ["A", "B", "A", "B"]
    assert statistics.fmean([0, 2]) != statistics.fmean([1, 3]) and paired.block_order(["A", "B"], 2) != plain


def _block(groups: list[int], step_ms: list[float]) -> dict:
    return {"groups": groups, "step_ms": step_ms, "cycle_ms": sum(step_ms)}


def test_paired_differences_pair_by_group_and_the_cycle_ratio_by_block():
    base = [_block([0, 1, 2], [10.0, 20.0, 30.0]), _block([0, 1, 2], [12.0, 22.0, 32.0])]
    # The other set-up trains the groups in another order (random strategy): pairs follow the group, not the position.
    other = [_block([2, 0, 1], [33.0, 10.0, 25.0]), _block([1, 2, 0], [27.0, 35.0, 14.0])]
    assert paired.mean_by_group(base) == {0: 11.0, 1: 21.0, 2: 31.0}
    diff = paired.paired_differences(base, other)
    assert diff == pytest.approx({0: 1.0, 1: 5.0, 2: 3.0})
    assert paired.paired_differences(base, [_block([1], [25.0])]) == pytest.approx({1: 4.0})  # groups in both only
    r = paired.cycle_ratio([60.0, 66.0], [68.0, 76.0])
    assert r["ratio"] == pytest.approx(144 / 126) and r["per_block"] == pytest.approx([68 / 60, 76 / 66])
    assert r["min"] == pytest.approx(68 / 60) and r["max"] == pytest.approx(76 / 66)


def test_copy_times_and_the_two_lower_bounds():
    bw = {"h2d_gbps": 50.0, "d2h_gbps": 55.0, "h2d_both_gbps": 40.0, "d2h_both_gbps": 50.0}
    # 2 GB home and 4 GB in: at once 4e9 / 40 GB/s = 100 ms (the slower direction); one after the other
    # 2e9 / 55 + 4e9 / 50 = 36.4 + 80 ms.
    assert paired.copy_ms(2e9, 4e9, bw, concurrent=True) == pytest.approx(100.0)
    assert paired.copy_ms(2e9, 4e9, bw, concurrent=False) == pytest.approx(2e3 / 55 + 80.0)
    assert paired.copy_ms(5e9, 1e9, bw, concurrent=True) == pytest.approx(100.0)  # the copy-out bounds here
    sizes = [1e9, 2e9, 3e9]  # bytes per group
    # Step s: the group before it goes home (step 0: the last group, of the previous cycle), its own comes in.
    copies = paired.step_copies([0, 1, 2], sizes, bw, concurrent=True)
    assert copies == pytest.approx([max(3e9 / 50e6, 1e9 / 40e6), max(1e9 / 50e6, 2e9 / 40e6),
                                    max(2e9 / 50e6, 3e9 / 40e6)])
    assert paired.step_copies([2, 0, 1], sizes, bw, True)[0] == pytest.approx(max(2e9 / 50e6, 3e9 / 40e6))
    lb = paired.lower_bounds([50.0, 30.0, 100.0], [60.0, 40.0, 20.0])
    assert lb["one_step_lead_ms"] == pytest.approx(60 + 40 + 100)  # every step hides only its own copies
    assert lb["long_lead_ms"] == pytest.approx(180.0)  # max(sum compute 180, sum copy 120)
    assert lb["steps_copy_bound"] == 2 and lb["one_step_lead_ms"] >= lb["long_lead_ms"]
    assert paired.lower_bounds([10.0, 10.0], [30.0, 30.0])["long_lead_ms"] == 60.0  # copy-bound overall


def test_counters_and_the_trace_check():
    before = {"num_alloc_retries": 1, "num_device_free": 5, "other": 9}
    after = {"num_alloc_retries": 1, "num_device_free": 8, "other": 20}
    assert paired.counter_delta(before, after, ("num_alloc_retries", "num_device_free", "missing")) == {
        "num_alloc_retries": 0, "num_device_free": 3}
    assert paired.counter_delta(None, None, paired.MEMORY_KEYS) is None  # no CUDA: no figures, not zeros
    ok = paired.trace_ratio({1: 10.5, 2: 21.0, 9: 99.0}, {1: 10.0, 2: 20.0, 3: 30.0})
    assert ok["ratio"] == pytest.approx(31.5 / 30) and ok["groups"] == [1, 2] and ok["within"]
    assert not paired.trace_ratio({1: 11.5}, {1: 10.0})["within"]  # 15% stretched
    assert paired.trace_ratio({1: 9.05}, {1: 10.0})["within"]
    assert paired.trace_ratio({5: 1.0}, {1: 1.0})["ratio"] is None


def test_pipeline_model_of_the_store():
    """Three groups of 2 GB (40 ms each way at 50 GB/s). One slot, whole groups: copy home, then copy in, 80 ms a
    step; in chunks of 200 MB the copy-in trails the copy home by one chunk (4 ms). Two slots: the copies of the
    short group 1 (30 ms) hide in group 0's step with a two-step lead, not with a one-step lead."""
    cycle = lambda compute, *a: pipeline.pipeline_cycle([0, 1, 2], compute, [2e9] * 3, BW_50, *a)["cycle_ms"]  # noqa
    assert cycle([10.0] * 3, 1) == pytest.approx(3 * 80.0)
    assert cycle([10.0] * 3, 1, 2e8) == pytest.approx(3 * 44.0)
    assert cycle([10.0] * 3, 2) == pytest.approx(3 * 40.0)  # copy-bound: 40 ms a step, both directions at once
    assert cycle([50.0, 30.0, 100.0], 2, None, 1) == pytest.approx(50 + 40 + 100)  # the one-step-lead bound
    assert cycle([50.0, 30.0, 100.0], 2) == pytest.approx(180.0)  # the longer lead: sum compute
    assert pipeline.pipeline_cycle([0, 1, 2], [10.0] * 3, [1e6] * 3, BW_50, 1)["cycle_ms"] == pytest.approx(30.0)
    with pytest.raises(ValueError, match="lookahead must be 1..slots"):
        cycle([10.0] * 3, 2, None, 3)


BW_50 = {"h2d_gbps": 50.0, "d2h_gbps": 50.0, "h2d_both_gbps": 50.0, "d2h_both_gbps": 50.0}


def test_summary_pairs_every_setup_and_bounds_the_offloaded_one_by_the_resident_steps():
    names = ["res", "off"]
    blocks = {"res": [_block([0, 1, 2], [50.0, 30.0, 100.0]), _block([0, 1, 2], [50.0, 30.0, 100.0])],
              "off": [_block([0, 1, 2], [62.0, 41.0, 101.0]), _block([0, 1, 2], [58.0, 39.0, 99.0])]}
    info = {"res": {"offload": False}, "off": {"offload": True, "slots": 2, "group_bytes": [2e9, 2e9, 2e9]}}
    bw = {"h2d_gbps": 50.0, "d2h_gbps": 50.0, "h2d_both_gbps": 50.0, "d2h_both_gbps": 50.0}  # 40 ms a group
    s = paired.summarize(names, blocks, info, bw)
    pair, = s["pairs"]
    assert pair["base"] == "res" and pair["offload_vs_resident"] and pair["ratio"] == pytest.approx(200 / 180)
    assert pair["group_diff_ms"] == pytest.approx({0: 10.0, 1: 10.0, 2: 0.0}) and pair["groups_slower"] == 2
    b = s["bounds"]["off"]
    assert b["compute_s_ms"] == pytest.approx([50.0, 30.0, 100.0]) and b["copy_s_ms"] == pytest.approx([40.0] * 3)
    assert b["one_step_lead_ms"] == pytest.approx(50 + 40 + 100) and b["long_lead_ms"] == pytest.approx(180.0)
    assert b["over_one_step_lead"] == pytest.approx(200 / 190) and b["over_long_lead"] == pytest.approx(200 / 180)
    one_slot = paired.summarize(names, blocks, dict(info, off=dict(info["off"], slots=1)), bw)["bounds"]["off"]
    assert one_slot["copy_s_ms"] == pytest.approx([80.0] * 3)  # one slot, whole groups: copy-out, then copy-in
    chunked = dict(info["off"], slots=1, chunk_bytes=2 ** 27)
    one_slot = paired.summarize(names, blocks, dict(info, off=chunked), bw)["bounds"]["off"]
    assert one_slot["copy_s_ms"] == pytest.approx([40.0] * 3)  # in chunks: the copy-in chases the copy-out
    text = paired.format_report(s, paired.CPU_CLOCK)
    assert "off / res: cycle 1.111x (blocks 1.089-1.133, median 1.111)" in text  # 204 / 180 and 196 / 180
    # Two slots with a two-step lead (the store's default) move group 1's copies into group 0's longer step.
    assert b["pipeline_ms"] == pytest.approx(180.0) and "pipeline modelled 180.0 ms" in text
    assert "1 of 3 steps copy-bound" in text and "host wall clock" in text  # group 1: 30 ms compute, 40 copy
    targets = paired.format_targets(s)
    assert "FAIL  cycle off <= 1.05 x res: 1.111x" in targets and "FAIL  cycle off <= 1.1 x max" in targets
    # Two resident set-ups (or an offloaded base) are compared, but are no target; no resident: no bounds.
    both = paired.summarize(["a", "b"], {"a": blocks["res"], "b": blocks["res"]}, {"a": {}, "b": {}}, bw)
    assert not both["pairs"][0]["offload_vs_resident"] and "x a" not in paired.format_targets(both)
    assert paired.summarize(["off"], {"off": blocks["off"]}, {"off": info["off"]}, bw)["bounds"] == {}


def test_block_timing_on_cuda_reads_events_recorded_before_each_step(monkeypatch):
    """run_block's CUDA branch on a stand-in device: one event before each step and one after the last, on the
    current stream; one synchronize, after the last step; allocator counters over the block."""
    clock = {"t": 0.0, "syncs": 0, "stats": {"num_alloc_retries": 2, "num_device_free": 7}}

    class Event:
        def __init__(self, enable_timing=False):
            assert enable_timing

        def record(self):
            self.t = clock["t"]

        def elapsed_time(self, other):
            return other.t - self.t

    class Optimizer:
        active_group = 0

    def train_step(ids):
        clock["t"] += 10.0 * (opt.active_group + 1)  # group g's step takes 10 (g + 1) ms on the stream
        assert clock["syncs"] == 1  # only the one before the block so far
        opt.active_group = (opt.active_group + 1) % 3
        clock["stats"] = dict(clock["stats"], num_device_free=clock["stats"]["num_device_free"] + 1)
        return torch.ones(())

    opt = Optimizer()
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda dev=None: clock.__setitem__("syncs", clock["syncs"] + 1))
    monkeypatch.setattr(torch.cuda, "memory_stats", lambda dev=None: clock["stats"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda dev=None: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda dev=None: 3 * 2 ** 30)
    monkeypatch.setattr(paired, "_host_stats", lambda dev: None)
    built = types.SimpleNamespace(optimizer=opt, train_step=train_step)
    rec = paired.run_block(built, [None] * 4, torch.device("cuda"))
    assert rec["groups"] == [0, 1, 2, 0] and rec["step_ms"] == [10.0, 20.0, 30.0, 10.0] and rec["cycle_ms"] == 70.0
    assert clock["syncs"] == 2 and rec["memory"] == {"num_alloc_retries": 0, "num_device_free": 4}
    assert rec["peak_alloc_gib"] == 3.0 and rec["losses_finite"]


def test_paired_run_rehearses_the_protocol_on_cpu(tmp_path, capsys):
    """offload.py --paired end to end (tiny model, CPU, host clock, labelled so): warm-up, ABBA blocks of whole
    cycles, the report, the traced run and the JSON with the command."""
    out = tmp_path / "paired.json"
    rc = offload_bench.main(["--model", "tiny", "--batch-size", "2", "--seq-len", "16", "--paired", "hift,hift-offload",
                             "--blocks", "2", "--probe-gib", "0.001", "--trace", str(tmp_path / "trace"),
                             "--trace-steps", "2", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    res = json.loads(out.read_text())["paired"]
    assert res["clock"] == paired.CPU_CLOCK and "host wall clock (CPU run" in text
    assert [b["position"] for n in ("hift", "hift-offload") for b in res["blocks"][n]] == [0, 3, 1, 2]  # A B B A
    k = res["info"]["hift"]["num_groups"]
    for n in ("hift", "hift-offload"):
        for b in res["blocks"][n]:
            assert b["groups"] == list(range(k)) and len(b["step_ms"]) == k and all(t > 0 for t in b["step_ms"])
            assert b["losses_finite"] and b["memory"] is None  # no CUDA here: no allocator figures
    assert res["info"]["hift-offload"]["offload"] and not res["info"]["hift"]["offload"]
    assert "--paired hift,hift-offload" in res["command"] == res["info"]["hift"]["command"]
    assert "hift-offload" in res["summary"]["bounds"] and res["trace"]["setup"] == "hift-offload"
    assert res["trace"]["vs_untraced"]["groups"] == [1, 2] and list((tmp_path / "trace").glob("hift-offload-*.json.gz"))
    assert "block 4/4 hift" in text and "traced run of hift-offload" in text and "targets" in text


def test_isolated_run_reports_out_of_memory_skips_and_crashes_as_rows(tmp_path):
    from hift_ds.profile import setups

    mod = tmp_path / "targets.py"
    mod.write_text("import os, torch\nfrom hift_ds.profile import setups\n"
                   "def oom(p): raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB')\n"
                   "def skip(p): raise setups.Skip('needs CUDA (no GPU here)')\n"
                   "def crash(p): os._exit(3)\n"
                   "def ok(p): return {'twice': 2 * p['x']}\n")
    run = lambda fn, **kw: setups.run_isolated(f"targets:{fn}", {"x": 21}, 120, path=[str(tmp_path)], **kw)  # noqa: E731
    assert run("ok") == {"status": "ok", "row": {"twice": 42}}
    assert run("oom") == {"status": "failed", "error": "CUDA out of memory: CUDA out of memory. Tried to allocate "
                                                       "2.00 GiB"}
    assert run("skip") == {"status": "skipped", "error": "needs CUDA (no GPU here)"}
    crashed = run("crash", log=tmp_path / "crash.log")
    assert crashed["status"] == "failed" and crashed["error"].startswith("exit status 3")


def test_import_failure_says_not_installed_only_when_it_is_not():
    from hift_ds.profile import setups

    missing = ModuleNotFoundError("No module named 'hift_no_such_pkg'", name="hift_no_such_pkg.block_optim")
    assert setups.describe_failure(missing) == \
        ("failed", "package hift_no_such_pkg not installed: pip install hift_no_such_pkg")
    # An installed package that fails to import (a name it lacks, or another module of the same name
    # earlier on sys.path) keeps the original message: "not installed" would send the user the wrong way.
    shadowed = ImportError("cannot import name 'CUDAProperties' from 'kernels' (/repo/kernels/__init__.py)",
                           name="torch")
    assert setups.describe_failure(shadowed) == \
        ("failed", "ImportError: cannot import name 'CUDAProperties' from 'kernels' (/repo/kernels/__init__.py)")


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


quality_llm = _load("bench_quality_llm", BENCH / "quality_llm.py")


def test_quality_llm_split_is_fixed_and_disjoint(tmp_path, monkeypatch):
    import hift_ds.train.jobs
    src = tmp_path / "all.jsonl"
    src.write_text("".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) + "\n" for i in range(30)))
    monkeypatch.setattr(hift_ds.train.jobs, "instruction_data", lambda: str(src))
    paths = quality_llm.write_split(str(tmp_path / "a"), test_size=6, val_size=4)
    again = quality_llm.write_split(str(tmp_path / "b"), test_size=6, val_size=4)
    parts = {k: [json.loads(line)["instruction"] for line in open(v)] for k, v in paths.items()}
    assert {k: len(v) for k, v in parts.items()} == {"test": 6, "val": 4, "train": 20}
    assert len(set().union(*parts.values())) == 30  # disjoint, nothing lost
    assert all(open(paths[k]).read() == open(again[k]).read() for k in paths)  # the same split every time
    assert quality_llm.parse_lrs(["fpft=1e-4,3e-4", "hift=1e-3"]) == {"fpft": [1e-4, 3e-4], "hift": [1e-3]}
    with pytest.raises(SystemExit, match="--lrs entries"):
        quality_llm.parse_lrs(["fpft=fast"])


def test_quality_llm_scores_in_the_runs_and_stops_on_a_model_that_did_not_load(tmp_path, monkeypatch):
    """No model is loaded (or scored) in quality_llm.py's threads: each run scores itself; an untrained score at
    the uniform guess (perplexity = vocabulary size, as the race once printed) stops the study."""
    import hift_ds.train.jobs
    src = tmp_path / "all.jsonl"
    src.write_text("".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) + "\n" for i in range(30)))
    monkeypatch.setattr(hift_ds.train.jobs, "instruction_data", lambda: str(src))
    score = lambda ppl: {"eval_loss": math.log(ppl), "perplexity": ppl}  # noqa: E731
    calls = []

    def fake_run(label, mode, strategy, seed, lr, out, train_args, before=38.7):
        calls.append(train_args)
        os.makedirs(out, exist_ok=True)
        return {"label": label, "seed": seed, "lr": lr, "seconds": 1.0, "vocab_size": 49152, "before": score(40.0),
                "after": score(9.0 + lr * 1e3), "test_before": score(before), "test_after": score(9.5 + seed)}
    monkeypatch.setattr(quality_llm, "train_run", fake_run)
    argv = ["--out", str(tmp_path / "q"), "--seeds", "1,2", "--only", "fpft", "--lrs", "fpft=1e-4,3e-4",
            "--test-size", "6", "--val-size", "4"]
    (row,) = quality_llm.main(argv)
    assert all(a[a.index("--eval-data") + 1].endswith("val.jsonl") and a[a.index("--test-data") + 1].endswith(
        "test.jsonl") and "--check-pretrained" in a for a in calls)
    assert row["lr"] == 1e-4 and row["after"]["perplexity"] == pytest.approx(11.0)  # the test split, seeds 1, 2
    assert row["before"]["perplexity"] == pytest.approx(38.7)
    monkeypatch.setattr(quality_llm, "train_run", lambda *a: fake_run(*a, before=49152.0))
    with pytest.raises(SystemExit, match="did not load: its held-out perplexity is 49152, at or above 0.5 x its "
                                         "vocabulary size 49152"):
        quality_llm.main([*argv[:1], str(tmp_path / "q2"), *argv[2:]])
    refused = {"label": "fpft", "seed": 1, "lr": 1e-4, "error": "error: --check-pretrained: the untrained model "
               "m scores as if its weights did not load: ..."}
    monkeypatch.setattr(quality_llm, "train_run", lambda *a: refused)
    with pytest.raises(SystemExit, match="fpft lr 0.0001 seed 1: error: --check-pretrained"):
        quality_llm.main([*argv[:1], str(tmp_path / "q3"), *argv[2:]])


def test_a_benchmark_run_starts_over_and_gets_hifts_options_only_under_hift():
    """quality.run_args, shared by quality.py, quality_llm.py and llm_study.py: launch/train.py refuses a fresh run into
    a used --output-dir and HiFT's --group-size/--strategy under another --mode."""
    shared = ["--group-size", "2", "--strategy=random", "--epochs", "1"]
    start = ["--output-dir", "o", "--overwrite-output-dir"]
    assert quality.run_args("hift", "o", shared) == ["--mode", "hift", *start, *shared]
    assert quality.run_args("fpft", "o", shared) == ["--mode", "fpft", *start, "--epochs", "1"]
    assert quality.run_args("badam", "o", shared) == ["--mode", "badam", *start, "--epochs", "1"]
