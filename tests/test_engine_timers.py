"""No device synchronize between steps on the DeepSpeed path (issue 25).

DeepSpeed's throughput timer is on and synchronized by default: the engine synchronizes the device at
every forward start and after every step(), which makes the next group's prefetch finish before the
next forward is launched. hift_ds.initialize (and so launch/train.py and the Trainer integration) turns
the synchronize off unless the config asks for timers; launch/train.py does the same for its fpft/badam
baselines. Each engine here runs 4 steps: DeepSpeed's timer synchronizes only from its third step on.
"""
import glob
import json
import os

import pytest

import hift_ds
from hift_ds.deepspeed import engine as engine_module

from conftest import batch, tiny_llama

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from hift_ds import train  # noqa: E402

SHIPPED = sorted(glob.glob(os.path.join(ROOT, "ds_configs", "*.json")))
TRAINER = sorted(glob.glob(os.path.join(ROOT, "ds_configs", "trainer", "*.json")))
STEPS = 4
pytestmark = pytest.mark.usefixtures("single_rank_env")


@pytest.fixture
def syncs(monkeypatch) -> list:
    """Every device synchronize DeepSpeed asks its accelerator for (its timers go through it)."""
    from deepspeed.accelerator import get_accelerator

    calls = []
    acc = get_accelerator()
    original = acc.synchronize
    monkeypatch.setattr(acc, "synchronize", lambda *a, **k: (calls.append(1), original(*a, **k))[1])
    return calls


def shipped_engine(path: str, **extra):
    """The engine launch/train.py builds from a shipped config (HiFT through hift_ds.initialize, fpft through
    deepspeed.initialize), with ``extra`` top-level keys added to the config."""
    import deepspeed

    mode = "hift" if "hift" in json.load(open(path)) else "fpft"
    cfg = train.build_config(train.parse_args(["--deepspeed", path, "--mode", mode, "--batch-size", "2"]), 8, 1)
    cfg.pop("_total_steps")
    cfg.update(extra)
    model = tiny_llama()
    init = hift_ds.initialize if mode == "hift" else deepspeed.initialize
    engine, *_ = init(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=cfg)
    return engine


def trainer_engine(path: str):
    """The engine hift_ds.initialize builds from a shipped Trainer config, its "auto" values filled in as the
    Trainer fills them (and the optimizer block hf_deepspeed adds)."""
    from hift_ds.hf.deepspeed import add_optimizer_block

    cfg = json.load(open(path))
    cfg.update(train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=1, train_batch_size=2,
               gradient_clipping=1.0, bf16={"enabled": True})
    assert "auto" not in json.dumps({k: v for k, v in cfg.items() if k != "hift"})  # the hift block's kernel stays
    add_optimizer_block(cfg, type("Args", (), dict(learning_rate=1e-3, adam_beta1=0.9, adam_beta2=0.999,
                                                   adam_epsilon=1e-8, weight_decay=0.0)))
    engine, *_ = hift_ds.initialize(model=tiny_llama(), config=cfg)
    return engine


def train_steps(engine, steps: int = STEPS) -> None:
    for s in range(steps):
        x = batch(s).to(engine.device)
        engine.backward(engine(input_ids=x, labels=x).loss)
        engine.step()


def assert_no_synchronizing_timer(engine) -> None:
    # The throughput timer still reports samples/s (host clock), without synchronizing.
    assert engine.tput_timer.config.enabled and not engine.tput_timer.config.synchronized
    # No per-step wall-clock breakdown or flops profile (their timers record and read events).
    assert not engine.wall_clock_breakdown() and not engine.flops_profiler_enabled()
    timers = engine.engine_timers
    assert not (timers.forward_timers or timers.backward_timers or timers.step_timers or timers.active_timers())


@pytest.mark.parametrize("path", SHIPPED + TRAINER, ids=lambda p: os.path.relpath(p, os.path.join(ROOT, "ds_configs")))
def test_every_shipped_config_builds_an_engine_that_never_synchronizes(path, syncs):
    engine = trainer_engine(path) if path in TRAINER else shipped_engine(path)
    assert_no_synchronizing_timer(engine)
    train_steps(engine)
    assert engine.global_steps == STEPS and syncs == []


@pytest.mark.parametrize("extra", [{"timers": {"throughput": {"enabled": True, "synchronized": True}}},
                                   {"timers": {"throughput": {}}},  # a timers block of DeepSpeed's defaults
                                   {"wall_clock_breakdown": True}], ids=["synchronized", "defaults", "breakdown"])
def test_a_config_that_asks_for_timers_keeps_deepspeeds(extra, syncs, caplog, monkeypatch):
    monkeypatch.setattr(engine_module, "_timer_note_logged", False)
    with caplog.at_level("INFO", logger="hift_ds.deepspeed.engine"):
        engine = shipped_engine(os.path.join(ROOT, "ds_configs", "hift.json"), **extra)
    assert engine.tput_timer.config.enabled and engine.tput_timer.config.synchronized
    assert engine.wall_clock_breakdown() == bool(extra.get("wall_clock_breakdown"))
    assert "unsynchronized" not in caplog.text
    train_steps(engine)
    # The negative control of the test above: DeepSpeed's timer synchronizes at steps 3 and 4 (start and stop).
    assert len(syncs) >= 2 * (STEPS - 2)


def test_the_change_is_logged_once_with_the_way_back(caplog, monkeypatch):
    monkeypatch.setattr(engine_module, "_timer_note_logged", False)
    with caplog.at_level("INFO", logger="hift_ds.deepspeed.engine"):
        for _ in range(2):
            engine = shipped_engine(os.path.join(ROOT, "ds_configs", "hift.json"))
    assert not engine.tput_timer.config.synchronized
    notes = [r.getMessage() for r in caplog.records if "throughput timer" in r.getMessage()]
    assert len(notes) == 1 and '"timers": {"throughput": {"enabled": true, "synchronized": true}}' in notes[0], notes


def test_unsynchronize_leaves_the_users_timers_and_copies_nothing_shared():
    cfg = {"train_micro_batch_size_per_gpu": 1}
    assert engine_module.unsynchronize_throughput_timer(cfg)
    assert cfg["timers"] == {"throughput": {"enabled": True, "synchronized": False}}
    cfg["timers"]["throughput"]["synchronized"] = True  # the module's default must not change with it
    assert engine_module.UNSYNCHRONIZED_TIMERS["throughput"]["synchronized"] is False
    for kept in ({"timers": {}}, {"wall_clock_breakdown": True}):
        before = json.dumps(kept)
        assert not engine_module.unsynchronize_throughput_timer(kept) and json.dumps(kept) == before


def test_the_benchmarks_deepspeed_setups_time_both_timers():
    """benchmarks/offload.py --paired compares the engine path with DeepSpeed's synchronized timer and without."""
    from hift_ds.profile import setups

    o = setups.Options(model="tiny", batch_size=2, seq_len=16)
    names = ("ds-hift", "ds-hift-offload-synctimer", "ds-hift-offload")
    built = {n: setups.build(n, o, setups.device()) for n in names}
    assert [b.engine.tput_timer.config.synchronized for b in built.values()] == [False, True, False]
    assert [b.optimizer.store.offloaded for b in built.values()] == [False, True, True]
    assert all(b.optimizer.max_grad_norm == 1.0 for b in built.values())  # the shipped config's clipping
    for b in built.values():
        assert b.train_step(batch(0, seq=16)).isfinite()
