"""The memory profiler: CLI outputs (JSON fields, PNG, breakdown adds up), sampler shutdown, no-GPU path."""
import json
import logging
import os
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import batch, tiny_llama

from hift_ds import HiFTOptimizer
from hift_ds.profile import MemoryProfiler

ROOT = Path(__file__).resolve().parents[1]
MODE_FIELDS = ("mode", "status", "reason", "device", "params", "peak_device_used", "peak_allocated", "peak_reserved",
               "peak_rss", "pinned_host", "pinned_source", "breakdown", "step_time_median_s", "step_times_s",
               "losses", "phases", "timeline", "spans")
PARTS = ("weights", "gradients", "optimizer_state", "activations")


def _sampler_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "hift-memory-profiler"]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """One CLI run shared by the CLI tests (two worker processes, ~20 s on 2 CPU cores)."""
    out = tmp_path_factory.mktemp("profile")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    # The README's quick check, as CI runs it from the root of a fresh clone, writing to a temporary --out.
    readme = (ROOT / "README.md").read_text()
    line = readme.split("<!-- profile-quick:begin -->")[1].split("<!-- profile-quick:end -->")[0].split("\n")[2]
    argv = shlex.split(line)
    assert argv[:3] == ["python", "-m", "hift_ds.profile"] and argv[-2] == "--out", line
    proc = subprocess.run([sys.executable, *argv[1:-1], str(out)], capture_output=True, text=True, env=env,
                          timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, proc.stdout + proc.stderr


def test_cli_json_fields(cli_run):
    out, _ = cli_run
    doc = json.loads((out / "profile.json").read_text())
    for key in ("version", "date", "command", "config", "gpu", "note", "modes"):
        assert key in doc, key
    assert doc["config"]["model"] == "tiny" and doc["config"]["steps"] == 2
    assert [m["mode"] for m in doc["modes"]] == ["fpft", "hift"]
    for row in doc["modes"]:
        assert set(MODE_FIELDS) <= set(row), set(MODE_FIELDS) - set(row)
        assert row["status"] == "ok", row["reason"]
        assert len(row["step_times_s"]) == 2 and row["step_time_median_s"] > 0
        assert set(row["phases"]) == {"forward", "backward", "step"}
        assert row["phases"]["forward"]["count"] == 2
        assert len(row["timeline"]["t"]) == len(row["timeline"]["rss"]) > 0
        assert row["peak_rss"] > 0 and row["params"] > 0
    if not torch.cuda.is_available():
        assert doc["gpu"] is False and "host memory only" in doc["note"]
        assert all(m["peak_allocated"] is None and m["peak_device_used"] is None for m in doc["modes"])


def test_cli_breakdown_parts_are_measured(cli_run):
    """Each part is measured on its own (none is a remainder), so they need not add up; they must fit the peak."""
    out, _ = cli_run
    rows = {r["mode"]: r for r in json.loads((out / "profile.json").read_text())["modes"]}
    for row in rows.values():
        b = row["breakdown"]
        assert b["basis"] == ("peak_allocated" if row["gpu"] else "peak_rss")
        assert b["total"] == row[b["basis"]]
        assert all(b[k] > 0 for k in PARTS), b
        assert sum(b[k] for k in PARTS) <= b["total"] and b["other"] == b["total"] - sum(b[k] for k in PARTS)
    # fpft holds fp32 weights and AdamW state for all of them; HiFT bf16 weights, and on CPU its whole store
    # (fp32 masters + two moments: 12 bytes per parameter) is host memory.
    n = rows["fpft"]["params"]
    assert rows["fpft"]["breakdown"]["weights"] == 4 * n and rows["hift"]["breakdown"]["weights"] == 2 * n
    assert 8 * n <= rows["fpft"]["breakdown"]["optimizer_state"] <= 8 * n + 4096  # + AdamW's step counters
    if not torch.cuda.is_available():
        assert rows["hift"]["breakdown"]["optimizer_state"] == 12 * n


def test_cli_png_and_output(cli_run):
    import matplotlib.image

    out, text = cli_run
    img = matplotlib.image.imread(out / "profile.png")
    assert img.ndim == 3 and img.shape[0] > 400 and img.shape[1] > 400
    if not torch.cuda.is_available():
        # The no-GPU message: one line, printed once by the CLI.
        assert sum("profiling host memory only" in ln for ln in text.splitlines()) == 1, text
        assert "Traceback" not in text
    for mode in ("fpft", "hift"):
        assert any(ln.startswith(mode + " ") for ln in text.splitlines()), text


def test_cli_failed_mode_row_says_why(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "hift_ds.profile", "--model", str(tmp_path / "no-such-model"),
                           "--modes", "hift", "--steps", "1", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)
    assert proc.returncode == 1, proc.stdout + proc.stderr  # nothing was measured
    row = json.loads((tmp_path / "profile.json").read_text())["modes"][0]
    assert row["status"] == "failed" and "no-such-model" in row["reason"]
    assert "hift" in proc.stdout and "failed: " in proc.stdout and "Traceback" not in proc.stdout + proc.stderr
    assert "Traceback" in (tmp_path / "hift.log").read_text()  # the full story is in the mode's log
    assert (tmp_path / "profile.png").stat().st_size > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU path")
def test_cli_skips_zero2_offload_without_cuda(tmp_path, capsys):
    from hift_ds.profile import main

    assert main(["--modes", "ds-zero2-offload", "--out", str(tmp_path)]) == 1
    row = json.loads((tmp_path / "profile.json").read_text())["modes"][0]
    assert row["status"] == "skipped" and "needs CUDA" in row["reason"]
    assert "skipped: needs CUDA" in capsys.readouterr().out


def test_cli_rejects_unknown_mode(capsys):
    from hift_ds.profile import main

    with pytest.raises(SystemExit) as exc:
        main(["--modes", "fpft,bogus"])
    assert exc.value.code == 2
    assert "bogus" in capsys.readouterr().err


def test_help_documents_every_option():
    from hift_ds.profile import build_parser

    parser = build_parser()
    text = parser.format_help()
    for action in parser._actions:
        assert action.help, action.option_strings
        for opt in action.option_strings:
            assert opt in text


def test_sampler_stops_when_body_raises():
    prof = MemoryProfiler(interval_ms=1)
    with pytest.raises(RuntimeError, match="boom"):
        with prof:
            assert prof.running and _sampler_threads()
            with prof.phase("forward"):
                time.sleep(0.03)
                raise RuntimeError("boom")
    assert not prof.running
    assert not _sampler_threads()
    summ = prof.summary()
    assert summ["samples"] >= 3 and "forward" in summ["phases"]
    assert prof.spans()[-1][2] is not None  # the phase the exception left open is closed


def test_profiler_phases_and_plot(tmp_path):
    model = tiny_llama()
    opt = HiFTOptimizer(model, lr=1e-3)
    with MemoryProfiler(interval_ms=2) as prof:
        prof.attach(opt)
        for s in range(2):
            ids = batch(s)
            with prof.phase("forward"):
                loss = model(input_ids=ids, labels=ids).loss
            prof.mark("backward")
            loss.backward()
            prof.mark("step")
            opt.step()
            opt.zero_grad()
            prof.mark(None)
    summ = prof.summary()
    assert summ["phases"]["forward"]["count"] == 2 and summ["phases"]["step"]["count"] == 2
    assert summ["peak"]["rss"] > 0 and summ["pinned_source"] == "optimizer.memory_report"
    assert summ["gpu"] == torch.cuda.is_available()
    for ph in summ["phases"].values():
        assert ph["peak"]["rss"] <= summ["peak"]["rss"]
    prof.plot(tmp_path / "t.png")
    import matplotlib.image
    assert matplotlib.image.imread(tmp_path / "t.png").ndim == 3
    with pytest.raises(RuntimeError, match="running"):
        prof.mark("late")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU path")
def test_nvml_failure_logs_one_line(monkeypatch, caplog):
    import pynvml

    def fail():
        raise pynvml.NVMLError_LibraryNotFound()
    monkeypatch.setattr(pynvml, "nvmlInit", fail)
    with caplog.at_level(logging.DEBUG, logger="hift_ds.profile"):
        with MemoryProfiler(interval_ms=5) as prof:
            time.sleep(0.02)
    records = [r for r in caplog.records if r.name.startswith("hift_ds.profile")]
    assert len(records) == 1, [r.getMessage() for r in records]
    msg = records[0].getMessage()
    assert "\n" not in msg and records[0].exc_info is None
    assert "NVML Shared Library Not Found" in msg and "host memory only" in msg
    summ = prof.summary()
    assert summ["gpu"] is False and summ["note"] == msg and summ["peak"]["device_used"] is None
    assert summ["peak"]["rss"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU path")
def test_missing_pynvml_logs_one_line(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    with caplog.at_level(logging.DEBUG, logger="hift_ds.profile"):
        with MemoryProfiler(interval_ms=5) as prof:
            pass
    records = [r for r in caplog.records if r.name.startswith("hift_ds.profile")]
    assert len(records) == 1 and "pynvml is not installed" in records[0].getMessage()
    assert not prof.running
