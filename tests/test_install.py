"""A fresh install works from wherever a run starts: nothing in the checkout hides an installed package.

Python puts a folder of the checkout first on ``sys.path`` in ordinary use: the repo root for
``python -m ...``, ``python -c ...``, a user's script saved there or ``PYTHONPATH=<checkout>``; a
script's own folder for ``python benchmarks/x.py`` or ``python launch/train.py``. A module of the
same name as an installed package in such a folder wins over the package. Hugging Face's
``kernels`` package, which transformers imports whenever a model module loads, was hidden that way
by the project's own ``kernels/`` (and by ``benchmarks/kernels.py``), and no model could be built.
The profiler run from the root is checked in test_profile.py (``cli_run``); the benchmark scripts'
quick runs in test_benchmarks.py.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Every folder a run of this checkout may put first on sys.path.
RUN_FOLDERS = [ROOT, ROOT / "benchmarks", ROOT / "launch", ROOT / "examples", ROOT / "tests", ROOT / ".ci",
               ROOT / "tests" / "mutation"]
# Never a top-level module here, installed today or not: transformers imports it when it is installed.
RESERVED = {"kernels"}


def _top_level_modules(folder: Path) -> set[str]:
    """Names ``import NAME`` would find in ``folder``: modules, packages, and folders holding Python files."""
    names = set()
    for entry in folder.iterdir():
        if entry.suffix == ".py":
            names.add(entry.stem)
        elif entry.is_dir() and (entry / "__init__.py").exists():
            names.add(entry.name)
        elif entry.is_dir() and entry.name in RESERVED and any(entry.rglob("*.py")):
            names.add(entry.name)  # a namespace package still answers find_spec, and then fails to import
    return names


def test_no_module_of_the_checkout_hides_an_installed_or_standard_package():
    installed = set(importlib.metadata.packages_distributions()) - {"hift_ds"}
    protected = installed | set(sys.stdlib_module_names) | RESERVED
    clashes = {str(folder.relative_to(ROOT)): sorted(_top_level_modules(folder) & protected)
               for folder in RUN_FOLDERS if folder.is_dir()}
    assert not any(clashes.values()), f"modules that hide a package of the same name: {clashes}"


def test_the_update_kernels_are_inside_the_package():
    import hift_ds.kernels

    assert Path(hift_ds.kernels.__file__).resolve().parent == ROOT / "hift_ds" / "kernels"
    assert not (ROOT / "kernels").exists(), "a top-level kernels/ folder hides Hugging Face's kernels package"


PROBE = """
import importlib.util, json, sys
from transformers import LlamaConfig, LlamaForCausalLM
import hift_ds.kernels
LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=2))
spec = importlib.util.find_spec("kernels")
print(json.dumps({"kernels": spec.origin if spec else None, "hift_kernels": hift_ds.kernels.__file__,
                  "path0": sys.path[0]}))
"""


def test_models_build_and_kernels_resolve_from_the_repo_root():
    """``python -c`` from the root, with and without PYTHONPATH=<checkout>: the root is first on sys.path."""
    for extra in ({}, {"PYTHONPATH": str(ROOT)}):
        env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, **extra}
        proc = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        found = json.loads(proc.stdout.strip().splitlines()[-1])
        assert found["path0"] in ("", str(ROOT))  # the root really was first
        assert Path(found["hift_kernels"]).resolve().parent == ROOT / "hift_ds" / "kernels"
        if found["kernels"] is not None:  # Hugging Face's package, where transformers needs it
            assert ROOT not in Path(found["kernels"]).resolve().parents, found


def test_set_ups_run_in_a_fresh_process_see_hugging_faces_kernels(tmp_path):
    """The profiler and the benchmarks run each set-up in a child process with the checkout on PYTHONPATH."""
    from hift_ds.profile import setups

    (tmp_path / "probe.py").write_text("import importlib.util\n"
                      "def where(payload):\n"
                      "    spec = importlib.util.find_spec('kernels')\n"
                      "    import hift_ds.kernels\n"
                      "    return {'kernels': spec.origin if spec else None, 'hift_kernels': hift_ds.kernels.__file__}\n")
    result = setups.run_isolated("probe:where", {}, timeout=120, path=[str(tmp_path)])
    assert result["status"] == "ok", result
    found = result["row"]
    assert Path(found["hift_kernels"]).resolve().parent == ROOT / "hift_ds" / "kernels"
    if found["kernels"] is not None:
        assert ROOT not in Path(found["kernels"]).resolve().parents, found
