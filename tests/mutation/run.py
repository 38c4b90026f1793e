"""Mutation testing of one core module with mutmut: ``python tests/mutation/run.py MODULE``.

mutmut copies the package into ``mutants/`` and runs the tests against one mutant at a time. The
package is staged under ``.mutation/MODULE/`` first (mutmut names a mutant by its file path, which is
the import path), so each module has its own stage and two runs never share state.

Not part of CI. Needs ``pip install -e ".[mutation]"``. Runs one worker at ``nice -n 10``; the score
and the surviving mutants are printed at the end and written to ``.mutation/MODULE/summary.txt``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CLASS = "\u01c1"  # mutmut's separator in method names: hift_ds.optim.optimizer.xǁHiFTOptimizerǁstep__mutmut_3


def _methods(module: str, cls: str, names: list[str]) -> list[str]:
    return [f"{module}.x{CLASS}{cls}{CLASS}{n}__mutmut_*" for n in names]


OPTIMIZER_TESTS = ["tests/test_optimizer.py", "tests/test_optimizer_state.py", "tests/test_precision.py",
                   "tests/test_offload.py",
                   "-k", "not cuda and not engine and not (equivalent and (2- or 3- or top2down)) "
                         "and not (fused_flat and (sgd or adagrad))"]
# Per module: the file (staged path), the focused test selection, and which functions count
# (None: every function mutmut can mutate; it skips decorated ones such as properties).
MODULES = {
    "units": ("hift_ds/units.py", ["tests/test_units.py"], None),
    "schedule": ("hift_ds/schedule.py", ["tests/test_schedule.py"], None),
    "precision": ("hift_ds/precision.py", ["tests/test_precision.py", "-k", "loss_scaler or cast_parameters"], None),
    "reference": ("hift_ds/kernels/reference.py",
                  ["tests/test_kernels.py", "-k", "test_reference or torch_backend or state_kinds"], None),
    # The step, activation and state_dict; not the constructor or the memory report. The step's body is mutated
    # in place (no undecorated copy needed: step() opens torch.no_grad() itself).
    "optimizer": ("hift_ds/optim/optimizer.py", OPTIMIZER_TESTS,
                  _methods("hift_ds.optim.optimizer", "HiFTOptimizer", [
                      "step", "_update", "_activate", "zero_grad", "backward", "reduce_in_next_backward",
                      "sync_masters_from_model", "state_dict", "load_state_dict", "group_param_names", "group_units"])),
    # What the optimizer delegates: the update, the stage-0 layout, the flat buffers, the checkpoint.
    "update": ("hift_ds/optim/update.py", OPTIMIZER_TESTS, None),
    "sharding": ("hift_ds/optim/sharding.py", OPTIMIZER_TESTS, None),
    "grads": ("hift_ds/optim/grads.py", OPTIMIZER_TESTS, None),
    "state": ("hift_ds/optim/state.py", ["tests/test_optimizer_state.py", "tests/test_optimizer.py"], None),
    # The store on its own (CUDA path on a simulated device, tests/fake_cuda.py), then through the optimizer.
    "offload": ("hift_ds/optim/store.py", ["tests/test_offload_store.py", "tests/test_offload.py"], None),
}


def stage(module: str) -> Path:
    """A fresh copy of the package and the tests, with a mutmut config."""
    path, tests, _ = MODULES[module]
    where = ROOT / ".mutation" / module
    shutil.rmtree(where, ignore_errors=True)
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "hift_ds", where / "hift_ds", ignore=skip)
    shutil.copytree(ROOT / "tests", where / "tests", ignore=skip)
    (where / "pyproject.toml").write_text(f"""[tool.pytest.ini_options]
testpaths = ["tests"]
markers = ["gpu: needs a CUDA device", "slow: multi-process or end-to-end runs"]

[tool.mutmut]
source_paths = ["hift_ds"]
only_mutate = [{json.dumps(path)}]
pytest_add_cli_args = ["-p", "no:cacheprovider", "-W", "ignore"]
pytest_add_cli_args_test_selection = {json.dumps(tests)}
use_git_change_detection = false
""")
    return where


def refresh_tests(module: str, where: Path) -> list[str]:
    """Copy the current tests into an existing stage; the survivors' names, to be run again."""
    import filecmp

    path = MODULES[module][0]
    source = ROOT / path
    if not filecmp.cmp(source, where / path, shallow=False):
        sys.exit(f"{source} changed since the last full run: its mutants are stale; run without --survivors")
    shutil.rmtree(where / "tests")
    shutil.copytree(ROOT / "tests", where / "tests", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.rmtree(where / "mutants" / "tests", ignore_errors=True)  # mutmut copies tests there; take the new ones
    codes = json.loads((where / "mutants" / f"{path}.meta").read_text())["exit_code_by_key"]
    return [k for k, c in codes.items() if c == 0]


def summarise(module: str, where: Path) -> str:
    """Score and the surviving mutants of the functions that count for ``module``."""
    import fnmatch

    path, _, patterns = MODULES[module]
    codes = json.loads((where / "mutants" / f"{path}.meta").read_text())["exit_code_by_key"]
    if patterns:
        codes = {k: v for k, v in codes.items() if any(fnmatch.fnmatch(k, p) for p in patterns)}
    status = Counter("killed" if c in (1, 3) else "survived" if c == 0 else "no tests" if c in (5, 33)
                     else "timeout" if c in (24, -24, 36, 152, 255) else f"other ({c})" for c in codes.values())
    killed = status["killed"] + status["timeout"]  # a mutant that hangs the tests is detected too
    lines = [f"{module} ({path}): {killed}/{len(codes)} killed = {100 * killed / max(len(codes), 1):.1f}% "
             f"({', '.join(f'{n} {s}' for s, n in sorted(status.items()))}), {time.strftime('%Y-%m-%d')}"]
    lines += [f"  survived: {k}" for k, c in sorted(codes.items()) if c == 0]
    lines += [f"  no tests: {k}" for k, c in sorted(codes.items()) if c in (5, 33)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("module", choices=sorted(MODULES))
    parser.add_argument("--summary-only", action="store_true", help="re-print the last run's summary")
    parser.add_argument("--show", action="store_true", help="with the summary, each surviving mutant's diff")
    parser.add_argument("--survivors", action="store_true",
                        help="after changing tests only: copy the tests in again and re-check the last run's survivors")
    args = parser.parse_args()
    where = ROOT / ".mutation" / args.module
    if not args.summary_only:
        if args.survivors:
            patterns = refresh_tests(args.module, where)
        else:
            where = stage(args.module)
            patterns = MODULES[args.module][2] or []
        # One worker, low priority, one thread per process: the machine is shared.
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        cmd = ["nice", "-n", "10", sys.executable, "-m", "mutmut", "run", "--max-children", "1", *patterns]
        with open(where / "mutmut.log", "w") as log:
            code = subprocess.run(cmd, cwd=where, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
        if code != 0:
            sys.exit(f"mutmut exited {code}; see {where / 'mutmut.log'}")
    text = summarise(args.module, where)
    (where / "summary.txt").write_text(text + "\n")
    print(text)
    if args.show:
        for name in (line.split(": ", 1)[1] for line in text.splitlines() if line.startswith("  survived: ")):
            diff = subprocess.run([sys.executable, "-m", "mutmut", "show", name], cwd=where, capture_output=True,
                                  text=True).stdout
            print(f"\n{name}\n" + "\n".join(line for line in diff.splitlines() if line[:2] in ("- ", "+ ")))


if __name__ == "__main__":
    main()
