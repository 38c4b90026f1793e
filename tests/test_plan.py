"""Each rule in one place: a mistake gets the same one-line message through every entry point that can express it.

The entry points: ``hift_ds.initialize`` (a DeepSpeed config), ``HiFTOptimizer(...)`` (keyword arguments),
the HiFT trainer (``hift=`` and ``TrainingArguments(deepspeed=...)``, refused at construction) and
``launch/train.py`` (a config file; exit 2 and ``error: <message>``). Each row is one mistake, the message
every entry point must show, and how each entry point that can express it does so. The plan itself
(``hift_ds.deepspeed.plan``) and the shared helpers are tested at the end.
"""
import copy
import json
import os
import subprocess
import sys
from dataclasses import FrozenInstanceError, dataclass

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _engine_worker as EW  # noqa: E402
import _hf_worker as HW  # noqa: E402
from conftest import tiny_llama  # noqa: E402
from tinymodel import make_classifier, sentiment_jsonl  # noqa: E402

import hift_ds  # noqa: E402
from hift_ds.config import check_zero_stage, hift_settings, parse_hift_config  # noqa: E402
from hift_ds.deepspeed.plan import build_plan, check_config  # noqa: E402
from hift_ds.schedule import STRATEGIES, WarmupShift, deepspeed_warmup_shift, trainer_warmup_shift  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures("single_rank_env")


@dataclass
class Row:
    """One mistake: the message every entry point shows, and how each one that can expresses the mistake."""

    message: str  # a substring of every entry point's (one-line) error
    config: dict | None = None  # top-level changes to a valid DeepSpeed config: hift_ds.initialize
    optimizer: dict | None = None  # HiFTOptimizer(model, **optimizer)
    trainer: tuple[dict, dict] | None = None  # (HiFT trainer keyword arguments, TrainingArguments keyword arguments)
    cli: bool = False  # also through launch/train.py with the config written to a file (seconds each: few rows)
    optimizer_exc: type = ValueError  # TypeError where Python's convention is one (an unknown keyword argument)
    exc: type = ValueError


def trainer_ds(**changes) -> dict:
    """ds_configs/trainer/hift.json with top-level keys replaced."""
    with open(os.path.join(ROOT, "ds_configs", "trainer", "hift.json")) as f:
        return {**json.load(f), **changes}


LAMB = {"type": "Lamb", "params": {"lr": 1e-3}}
ROWS = {
    "group_size_0": Row("group_size: must be >= 1, got 0", config={"hift": {"group_size": 0}},
                        optimizer=dict(group_size=0), trainer=(dict(hift={"group_size": 0}), {}),
                        cli=True),
    "num_groups_0": Row("num_groups: must be >= 1, got 0", config={"hift": {"num_groups": 0}},
                        optimizer=dict(num_groups=0), trainer=(dict(hift={"num_groups": 0}), {})),
    "group_size_and_num_groups": Row("set either group_size (2) or num_groups (2), not both",
                                     config={"hift": {"group_size": 2, "num_groups": 2}},
                                     optimizer=dict(group_size=2, num_groups=2),
                                     trainer=(dict(hift={"group_size": 2, "num_groups": 2}), {})),
    "unknown_strategy": Row("unknown HiFT strategy 'sideways'; use one of bottom2up, top2down, random, "
                            "shuffled",
                            config={"hift": {"strategy": "sideways"}}, optimizer=dict(strategy="sideways"),
                            trainer=(dict(hift={"strategy": "sideways"}), {})),
    "offload_device": Row("offload.device: Input should be 'auto', 'cpu' or 'none' (got 'disk')",
                          config={"hift": {"offload": {"device": "disk"}}}, optimizer=dict(offload="disk"),
                          trainer=(dict(hift={"offload": {"device": "disk"}}), {})),
    "offload_slots": Row("offload.slots: Input should be 1, 2 or 3 (got 4)", config={"hift": {"offload": {"slots": 4}}},
                         optimizer=dict(offload_slots=4),
                         trainer=(dict(hift={"offload": {"slots": 4}}), {})),
    "offload_chunk_mib": Row("offload.chunk_mib: must be >= 1 (MiB), got 0",
                             config={"hift": {"offload": {"chunk_mib": 0}}}, optimizer=dict(offload_chunk_mib=0),
                             trainer=(dict(hift={"offload": {"chunk_mib": 0}}), {})),
    "kernel": Row("kernel: Input should be 'auto', 'triton' or 'torch' (got 'cuda')",
                  config={"hift": {"kernel": "cuda"}}, optimizer=dict(kernel="cuda"),
                  trainer=(dict(hift={"kernel": "cuda"}), {})),
    "unknown_hift_key": Row("unknown key 'colour' (valid keys: group_size, num_groups, strategy",
                            config={"hift": {"colour": "red"}}, trainer=(dict(hift={"colour": "red"}), {})),
    "unknown_optimizer": Row("unknown optimizer 'Lamb'; use one of", config={"optimizer": LAMB},
                             optimizer=dict(optimizer="Lamb"), trainer=({}, dict(deepspeed=trainer_ds(optimizer=LAMB))),
                             cli=True),
    "unknown_optimizer_option": Row(
        "unknown adamw option(s) ['momentum']; valid options: ['amsgrad', 'betas', 'eps', 'lr', 'maximize', "
        "'weight_decay']", config={"optimizer": {"type": "AdamW", "params": {"momentum": 0.9}}},
        optimizer=dict(momentum=0.9), optimizer_exc=TypeError,
        trainer=({}, dict(deepspeed=trainer_ds(optimizer={"type": "AdamW", "params": {"momentum": 0.9}})))),
    # The Trainer fills optimizer.params.lr from learning_rate and refuses a config that disagrees itself.
    "bad_optimizer_value": Row("adamw lr must be a finite number >= 0, got 'fast'",
                               config={"optimizer": {"type": "AdamW", "params": {"lr": "fast"}}},
                               optimizer=dict(lr="fast")),
    "zero_stage_4": Row("stage=4 is not one of 0, 1, 2, 3", config={"zero_optimization": {"stage": 4}},
                        trainer=({}, dict(deepspeed=trainer_ds(zero_optimization={"stage": 4}))), cli=True),
    "offload_optimizer": Row('zero_optimization.offload_optimizer does not apply to HiFT; remove it and set "hift": '
                             '{"offload": {"device": "cpu"}}',
                             config={"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}},
                             trainer=({}, dict(deepspeed=trainer_ds(zero_optimization={
                                 "stage": 2, "offload_optimizer": {"device": "cpu"}})))),
    "offload_param": Row('zero_optimization.offload_param does not apply to HiFT; remove it and set "hift": '
                         '{"offload": {"device": "cpu"}}',
                         config={"zero_optimization": {"stage": 1, "offload_param": {"device": "cpu"}}},
                         trainer=({}, dict(deepspeed=trainer_ds(zero_optimization={
                             "stage": 1, "offload_param": {"device": "cpu"}})))),
    # The Trainer refuses bf16=True with fp16=True itself, and a config that disagrees with its arguments.
    "bf16_and_fp16": Row("both bf16 and fp16 are enabled in the config; enable one",
                         config={"bf16": {"enabled": True}, "fp16": {"enabled": True}}),
    "negative_clipping": Row("must be >= 0 (0 disables clipping), got -1", config={"gradient_clipping": -1},
                             optimizer=dict(max_grad_norm=-1),
                             trainer=({}, dict(deepspeed=trainer_ds(), max_grad_norm=-1.0))),
    "unknown_scheduler": Row("scheduler type 'CosineForever' is not one of DeepSpeed's",
                             config={"scheduler": {"type": "CosineForever", "params": {}}},
                             trainer=({}, dict(deepspeed=trainer_ds(scheduler={"type": "CosineForever"})))),
}


def raised(call) -> BaseException:
    """The exception ``call()`` raises (an AssertionError if it raises none)."""
    try:
        call()
    except Exception as e:  # noqa: BLE001 - the type is checked by the caller
        return e
    raise AssertionError("no error was raised")


def assert_says(error: BaseException, exc: type, message: str) -> None:
    """``error`` is an ``exc`` whose one-line text contains ``message``."""
    assert isinstance(error, exc), f"{type(error).__name__} instead of {exc.__name__}: {error}"
    assert message in str(error), f"{message!r} not in {str(error)!r}"
    assert "\n" not in str(error), str(error)


def config_of(row: Row) -> dict:
    """A valid DeepSpeed config (AdamW, group_size 1) with the row's changes."""
    cfg = EW.ds_config()
    for key, value in copy.deepcopy(row.config).items():
        cfg[key] = value
    return cfg


def cases(entry: str) -> list:
    out = []
    for name, row in sorted(ROWS.items()):
        if getattr(row, entry) in (None, False):
            continue
        out.append(pytest.param(name, id=name))
    return out


@pytest.mark.parametrize("name", cases("config"))
def test_initialize(name):
    row = ROWS[name]
    assert_says(raised(lambda: hift_ds.initialize(model=tiny_llama(), config=config_of(row))), row.exc, row.message)


@pytest.mark.parametrize("name", cases("config"))
def test_plan_alone(name):
    """The same message from the plan, before any process group, model or engine exists."""
    row = ROWS[name]
    assert_says(raised(lambda: build_plan(config_of(row))), row.exc, row.message)


@pytest.mark.parametrize("name", cases("optimizer"))
def test_hift_optimizer(name):
    row = ROWS[name]
    kwargs = dict(row.optimizer)
    optimizer = kwargs.pop("optimizer", "adamw")
    assert_says(raised(lambda: hift_ds.HiFTOptimizer(tiny_llama(), optimizer, **kwargs)), row.optimizer_exc,
                row.message)


@pytest.mark.parametrize("name", cases("trainer"))
def test_hift_trainer(name, tmp_path):
    import transformers

    from hift_ds.hf import HiFTTrainer

    trainer_kwargs, args_kwargs = copy.deepcopy(ROWS[name].trainer)
    with HW.isolated_accelerate():
        args = transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], **args_kwargs)
        error = raised(lambda: HiFTTrainer(model=tiny_llama(), args=args, train_dataset=HW.CountingData(),
                                           **trainer_kwargs))
    assert_says(error, ROWS[name].exc, ROWS[name].message)


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    d = tmp_path_factory.mktemp("job")
    return {"model": make_classifier(str(d / "model")), "data": sentiment_jsonl(str(d / "data.jsonl"), n=32),
            "dir": d}


@pytest.mark.parametrize("name", cases("cli"))
def test_launch_train(name, job):
    """launch/train.py: exit 2 and one ``error: <message>`` line, no traceback."""
    row = ROWS[name]
    with open(os.path.join(ROOT, "ds_configs", "hift_fp32.json")) as f:
        cfg = json.load(f)
    cfg.update(copy.deepcopy(row.config))
    path = job["dir"] / f"{name}.json"
    path.write_text(json.dumps(cfg))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([ROOT, *filter(None, [env.get("PYTHONPATH")])]))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "train.py"), "--model", job["model"],
                           "--data", job["data"], "--deepspeed", str(path), "--output-dir", str(job["dir"] / name),
                           "--max-steps", "1", "--batch-size", "8", "--max-length", "16", "--no-progress"],
                          env=env, capture_output=True, text=True, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(errors) == 1 and row.message in errors[0], proc.stderr[-3000:]


# ---- the plan ---------------------------------------------------------------------------------------------------
def test_plan_of_a_zero2_fp16_config():
    cfg = EW.ds_config(fp16={"enabled": True, "initial_scale_power": 8}, gradient_clipping=0.5,
                       zero_optimization={"stage": 2, "reduce_bucket_size": 5e5, "overlap_comm": False},
                       scheduler={"type": "WarmupLR", "params": {"warmup_num_steps": 4}},
                       hift={"num_groups": 2, "strategy": "top2down"})
    plan = build_plan(cfg)
    assert plan.precision.dtype == torch.float16 and plan.precision.make_loss_scaler().scale == 2.0 ** 8
    assert plan.max_grad_norm == 0.5
    assert (plan.optimizer.name, plan.optimizer.kwargs()) == ("adamw", {"lr": 1e-2, "betas": [0.9, 0.99], "eps": 1e-8,
                                                                        "weight_decay": 0.1})
    assert (plan.zero.stage, plan.zero.reduce_bucket_size, plan.zero.overlap_comm) == (2, 500000, False)
    assert plan.zero.sharding_kwargs() == {"reduce_bucket_size": 500000, "overlap_comm": False}
    assert plan.hift.grouping() == (None, 2) and plan.hift.strategy == "top2down"
    assert plan.scheduler_block() == cfg["scheduler"] and plan.partition is None
    ds = plan.deepspeed_config()
    assert not {"hift", "optimizer", "scheduler", "bf16", "fp16"} & set(ds)
    assert ds["gradient_clipping"] == 0.0 and ds["zero_optimization"]["stage"] == 0
    assert ds["train_micro_batch_size_per_gpu"] == 2
    ds["train_micro_batch_size_per_gpu"] = 99  # a copy: the plan does not change
    assert plan.deepspeed["train_micro_batch_size_per_gpu"] == 2
    with pytest.raises(FrozenInstanceError):
        plan.max_grad_norm = 1.0
    with pytest.raises(TypeError):
        plan.deepspeed["gradient_clipping"] = 1.0
    assert cfg["zero_optimization"]["stage"] == 2 and "hift" in cfg  # the caller's config is left as it was


def test_plan_of_stage3_keeps_the_config_zero_init_reads():
    cfg = EW.ds_config(bfloat16={"enabled": True}, zero_optimization={"stage": 3})
    plan = build_plan(cfg)
    assert plan.precision.dtype == torch.bfloat16 and plan.zero.stage == 3 and plan.zero.sharding_kwargs() == {}
    partition = plan.partition_config()
    assert partition["zero_optimization"]["stage"] == 3 and partition["bfloat16"] == {"enabled": True}
    assert "hift" not in partition and "bfloat16" not in plan.deepspeed_config()


def test_defaults_of_a_minimal_config():
    from deepspeed.runtime.constants import GRADIENT_CLIPPING_DEFAULT

    plan = build_plan({"hift": {}})
    assert plan.precision.dtype == torch.float32 and plan.precision.make_loss_scaler() is None
    assert plan.max_grad_norm == GRADIENT_CLIPPING_DEFAULT and plan.zero.stage == 0
    assert (plan.optimizer.name, plan.optimizer.kwargs()) == ("adamw", {})
    assert build_plan({"hift": {}, "gradient_clipping": None}).max_grad_norm == 0.0
    assert build_plan({"hift": {}, "optimizer": {"type": "Adam", "params": {"adam_w_mode": False}}}).optimizer.name \
        == "adam"


def test_trainer_check_leaves_auto_values_to_be_filled():
    """What the Trainer fills at train time ("auto") passes the construction check; the rest is checked."""
    cfg = trainer_ds(zero_optimization={"stage": 2, "reduce_bucket_size": "auto"},
                     scheduler={"type": "WarmupDecayLR", "params": {"warmup_num_steps": "auto",
                                                                    "total_num_steps": "auto"}},
                     optimizer={"type": "AdamW", "params": {"lr": "auto"}})
    check_config(cfg)  # the "hift" block's own "auto" values (offload, kernel) are settings, checked as such
    with pytest.raises(ValueError, match="reduce_bucket_size must be a number"):
        build_plan(cfg)


def test_hift_settings_are_the_hift_block():
    kwargs = dict(num_groups=3, strategy="random", seed=4, offload="cpu", pin_memory=False, prefetch=False,
                  offload_slots=3, offload_chunk_mib=64, kernel="torch")
    block = {"num_groups": 3, "strategy": "random", "seed": 4, "kernel": "torch",
             "offload": {"device": "cpu", "pin_memory": False, "prefetch": False, "slots": 3, "chunk_mib": 64}}
    assert hift_settings(**kwargs) == parse_hift_config(block)
    assert hift_settings(**kwargs).optimizer_kwargs() == {**kwargs, "units": None}
    assert hift_settings().grouping() == (1, None) and hift_settings(group_size=3).grouping() == (3, None)
    for bad in (dict(group_size=0), dict(strategy="x"), dict(offload_slots=4), dict(offload_chunk_mib=0)):
        name = next(iter(bad))
        block = {"offload": {"slots": 4}} if name == "offload_slots" else \
            {"offload": {"chunk_mib": 0}} if name == "offload_chunk_mib" else bad
        with pytest.raises(ValueError) as from_kwargs:
            hift_settings(**bad)
        with pytest.raises(ValueError) as from_block:
            parse_hift_config(block)
        assert str(from_kwargs.value) == str(from_block.value)


def test_every_strategy_passes_every_entry_point():
    """Each strategy ("shuffled" included) is taken by the "hift" block, HiFTOptimizer, the engine and the CLI."""
    from hift_ds.train import parse_args

    assert STRATEGIES == ("bottom2up", "top2down", "random", "shuffled")
    for strategy in STRATEGIES:
        assert build_plan({"hift": {"strategy": strategy}}).hift.strategy == strategy
        assert hift_settings(strategy=strategy).optimizer_kwargs()["strategy"] == strategy
        assert hift_ds.HiFTOptimizer(tiny_llama(), "sgd", lr=0.1, strategy=strategy).schedule.strategy == strategy
        assert parse_args(["--strategy", strategy]).strategy == strategy
    cfg = EW.ds_config(hift={"strategy": "shuffled", "group_size": 2, "seed": 3})
    _, optimizer, _, _ = hift_ds.initialize(model=tiny_llama(), config=cfg)
    assert optimizer.schedule.strategy == "shuffled" and optimizer.num_groups == 3  # tiny_llama: 5 units
    grouped = [u for g in range(3) for u in optimizer.group_units(g)]
    assert sorted(grouped) == sorted(u.name for u in optimizer.units) and grouped != [u.name for u in optimizer.units]


def test_zero_stage_rule():
    assert [check_zero_stage(s) for s in (0, 1, 2, 3)] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match=r"^zero_stage='2' is not one of 0, 1, 2, 3$"):
        check_zero_stage("2", "zero_stage")


def test_warmup_shift_is_written_once():
    """Which schedules start one iteration in, and by how much their total grows (hift_ds.schedule)."""
    assert deepspeed_warmup_shift({"type": "WarmupDecayLR", "params": {}}) == WarmupShift(1, 1)
    assert deepspeed_warmup_shift({"type": "WarmupCosineLR"}) == WarmupShift(1, 2)
    assert deepspeed_warmup_shift({"type": "WarmupLR", "params": {"last_batch_iteration": 3}}) == WarmupShift(0, 0)
    assert deepspeed_warmup_shift({"type": "OneCycle"}) == deepspeed_warmup_shift(None) == WarmupShift(0, 0)
    assert trainer_warmup_shift(3) == WarmupShift(1, 1) and trainer_warmup_shift(0) == WarmupShift(0, 0)
