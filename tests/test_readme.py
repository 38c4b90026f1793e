"""The README matches the code: set-up commands, config files and train.py flags it mentions."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md")).read()


def test_setup_block_is_the_two_commands_ci_runs():
    block = README.split("<!-- setup:begin -->")[1].split("<!-- setup:end -->")[0]
    cmds = [line for line in block.splitlines() if line and not line.startswith("```")]
    assert len(cmds) == 2 and cmds[0].startswith("pip install") and "pytest" in cmds[1]
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert "setup:begin" in ci and "README.md" in ci  # CI reads these lines, it does not copy them


def test_every_config_named_in_the_readme_exists():
    names = set(re.findall(r"(?:ds_configs/)?\b((?:hift|fpft)[a-z0-9_]*\.json)", README))
    assert names, "README names no config"
    missing = [n for n in names if not os.path.isfile(os.path.join(ROOT, "ds_configs", n))]
    assert not missing


def test_every_train_flag_in_the_readme_is_an_option():
    sys.path.insert(0, os.path.join(ROOT, "launch"))
    import train
    help_text = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "train.py"), "--help"],
                               capture_output=True, text=True).stdout
    section = README.split("## Quick start")[1].split("\n## ")[0]  # the train.py section
    flags = set(re.findall(r"(--[a-z][a-z-]+)", section))
    parser_flags = set(re.findall(r"(--[a-z][a-z-]+)", help_text))
    assert flags and flags <= parser_flags, flags - parser_flags
    assert train.parse_args([]).mode == "hift"


def _python_block(after: str) -> str:
    return README.split(after)[1].split("```python\n")[1].split("```")[0]


def test_readme_python_examples_run(monkeypatch):
    """Both usage snippets run as written on a tiny model (DeepSpeed on CPU, one process)."""
    import torch

    from conftest import batch, tiny_llama
    from hift_ds.engine import single_process_env

    single_process_env()
    monkeypatch.chdir(ROOT)  # the snippet opens ds_configs/hift.json
    x = batch(0)
    loader = [{"input_ids": x, "labels": x}] * 3
    ns = {"model": tiny_llama(), "loader": loader, "num_steps": 3}
    exec(_python_block("### With DeepSpeed"), ns)
    assert ns["optimizer"].schedule.steps_done == 3
    ns = {"model": tiny_llama(), "loader": loader, "num_cycles": 2, "torch": torch}
    exec(_python_block("### Plain PyTorch"), ns)
    assert ns["opt"].schedule.steps_done == 3 and ns["opt"].cycle == 0
