"""Imports run one way (docs/architecture.md, "Layers"): the contracts of pyproject.toml, checked by import-linter.

Each contract is also shown to catch what it forbids: a copy of the package with one wrong-way import breaks it.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
        "sys.exit(lint_imports_command())"]


def lint(cwd: Path) -> subprocess.CompletedProcess:
    """import-linter over the hift_ds found first from ``cwd``, with the repository's contracts."""
    return subprocess.run([*LINT, "--config", str(ROOT / "pyproject.toml"), "--no-cache"], cwd=cwd,
                          capture_output=True, text=True, timeout=300, env={"PYTHONPATH": str(cwd), "PATH": ""})


def test_the_package_keeps_its_layers():
    proc = lint(ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "2 kept, 0 broken" in proc.stdout


@pytest.mark.parametrize("module, line, broken", [
    ("hift_ds/optim/update.py", "from hift_ds.deepspeed import plan", "hift_ds layers"),  # optim reaches up
    ("hift_ds/units.py", "import hift_ds.distributed", "hift_ds layers"),  # the core reaches up
    ("hift_ds/hf/checks.py", "import hift_ds.train.data", "hift_ds layers"),  # siblings must be independent
    ("hift_ds/profile/setups.py", "import benchmarks.harness", "never imports the benchmarks"),
])
def test_a_wrong_way_import_breaks_a_contract(tmp_path, module, line, broken):
    shutil.copytree(ROOT / "hift_ds", tmp_path / "hift_ds", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "harness.py").write_text("")
    path = tmp_path / module
    path.write_text(path.read_text() + f"\n{line}  # noqa\n")
    proc = lint(tmp_path)
    assert proc.returncode != 0, proc.stdout[-3000:]
    assert f"{broken}" in proc.stdout and "BROKEN" in proc.stdout, proc.stdout[-3000:]
