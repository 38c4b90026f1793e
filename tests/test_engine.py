"""``hift_ds.initialize``: the DeepSpeed engine path against the standalone HiFTOptimizer (DESIGN §2).

In-process tests use a single-rank DeepSpeed engine on CPU; checkpoint/resume and two data-parallel
ranks run in subprocesses (tests/_engine_worker.py).
"""
import argparse
import json
import logging
import os
import subprocess
import sys

import pytest
import torch

import hift_ds
from hift_ds import CycleLRScheduler, HiFTOptimizer
from hift_ds.optim.store import MASTER

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _engine_worker as W  # noqa: E402
from conftest import assert_equal_tree, free_port  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "_engine_worker.py")
K = 4  # groups of the 2-layer tiny Llama with group_size 1 (embeddings, 2 blocks, norm + head)
DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
pytestmark = pytest.mark.usefixtures("single_rank_env")


def subprocess_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false", **extra)
    return env


def run_worker(args: list, env: dict, timeout: int = 300) -> None:
    res = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout, cwd=os.path.dirname(HERE))
    assert res.returncode == 0, f"{' '.join(args)} exited {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}"


def assert_same_params(a: dict, b: dict, exact: bool = False) -> None:
    assert a.keys() == b.keys()
    for n in a:
        if exact:
            assert torch.equal(a[n], b[n]), f"{n} differs (max {(a[n].float() - b[n].float()).abs().max():.3g})"
        else:
            torch.testing.assert_close(a[n], b[n], msg=lambda m, n=n: f"{n}: {m}")


def assert_changed(params: dict) -> None:
    """Training moved every parameter away from the seeded initialisation."""
    init = W.params_of(W.tiny_llama())
    unchanged = [n for n in params if torch.equal(params[n].float(), init[n])]
    assert not unchanged, f"not trained: {unchanged}"


def train_standalone(model, opt: HiFTOptimizer, steps: int, micro: int, gas: int, record: list | None = None):
    """The plain loop on the gas-times-larger batch: loss.backward(); opt.step(); opt.zero_grad()."""
    for s in range(steps):
        if record is not None:
            record.append(opt.active_group)
        x = torch.cat([W.tokens(s, i, size=micro) for i in range(gas)])
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()


# ---- 1. the engine matches the standalone optimizer ------------------------------------------------
OPTIMIZERS = {
    "adamw": ({"type": "AdamW", "params": {"lr": 1e-2, "betas": [0.9, 0.99], "eps": 1e-8, "weight_decay": 0.1}},
              dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)),
    "sgd": ({"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01}},
            dict(lr=0.1, momentum=0.9, weight_decay=0.01)),
    "adagrad": ({"type": "Adagrad", "params": {"lr": 0.05, "weight_decay": 0.01}}, dict(lr=0.05, weight_decay=0.01)),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_engine_matches_standalone_optimizer(name):
    ds_block, kw = OPTIMIZERS[name]
    engine, opt, _, sched = hift_ds.initialize(model=W.tiny_llama(), config=W.ds_config(optimizer=ds_block))
    assert isinstance(opt, HiFTOptimizer) and engine.optimizer is opt and opt.name == name
    assert opt.num_groups == K and sched is None
    order = []
    W.train_engine(engine, opt, 0, 2 * K, micro=2, gas=1, record=order)
    assert opt.cycle == 2 and engine.global_steps == 2 * K

    model = W.tiny_llama()
    ref = HiFTOptimizer(model, name, group_size=1, **kw)
    ref_order = []
    train_standalone(model, ref, 2 * K, micro=2, gas=1, record=ref_order)
    assert order == ref_order == [0, 1, 2, 3] * 2
    assert_same_params(W.params_of(engine.module), W.params_of(model))
    assert_changed(W.params_of(engine.module))


def test_config_from_args_path(tmp_path):
    """--deepspeed <path> via args.deepspeed_config: the hift block is read from the file."""
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(W.ds_config(hift={"num_groups": 2, "strategy": "top2down"})))
    args = argparse.Namespace(deepspeed_config=str(path), local_rank=0)
    engine, opt, _, _ = hift_ds.initialize(args=args, model=W.tiny_llama())
    assert args.deepspeed_config == str(path), "the caller's args must not be modified"
    assert opt.num_groups == 2 and opt.active_group == 1
    W.train_engine(engine, opt, 0, 2, micro=2, gas=1)
    assert opt.cycle == 1 and opt.active_group == 1


@pytest.mark.parametrize("clip", [None, 0.0, 0.5], ids=["absent", "off", "0.5"])
def test_gradient_clipping_is_done_by_hift_only(clip):
    """HiFT clips by the active group's norm; DeepSpeed (whose default is 1.0) must not clip too."""
    from deepspeed.runtime.constants import GRADIENT_CLIPPING_DEFAULT

    cfg = W.ds_config(optimizer=OPTIMIZERS["sgd"][0])
    if clip is None:
        del cfg["gradient_clipping"]
    else:
        cfg["gradient_clipping"] = clip
    engine, opt, _, _ = hift_ds.initialize(model=W.tiny_llama(), config=cfg)
    expected = GRADIENT_CLIPPING_DEFAULT if clip is None else clip
    assert engine.gradient_clipping() == 0.0 and opt.max_grad_norm == expected
    W.train_engine(engine, opt, 0, K, micro=2, gas=1)

    def standalone(max_norm):
        model = W.tiny_llama()
        train_standalone(model, HiFTOptimizer(model, "sgd", max_grad_norm=max_norm, **OPTIMIZERS["sgd"][1]), K, 2, 1)
        return W.params_of(model)
    assert_same_params(W.params_of(engine.module), standalone(expected))
    if expected:  # the clip bites at this size, so the comparison above can tell clipping apart
        with pytest.raises(AssertionError):
            assert_same_params(W.params_of(engine.module), standalone(0.0))


# ---- 2. gradient accumulation ---------------------------------------------------------------------
def test_gradient_accumulation_keeps_group_and_matches_large_batch():
    gas, micro, steps = 4, 2, 2 * K
    engine, opt, _, _ = hift_ds.initialize(model=W.tiny_llama(), config=W.ds_config(micro=micro, gas=gas))
    order = []
    for s in range(steps):
        group = opt.active_group
        order.append(group)
        for i in range(gas):
            # Same group, same step, for every micro-batch of this optimizer step.
            assert opt.active_group == group and opt.schedule.steps_done == s, (s, i)
            assert engine.is_gradient_accumulation_boundary() == (i == gas - 1)
            x = W.tokens(s, i, size=micro)
            engine.backward(engine(input_ids=x, labels=x).loss)
            engine.step()
        assert opt.schedule.steps_done == s + 1
    assert order == [0, 1, 2, 3] * 2 and opt.cycle == 2 and engine.global_steps == steps

    model = W.tiny_llama()
    ref = HiFTOptimizer(model, "adamw", **OPTIMIZERS["adamw"][1])
    train_standalone(model, ref, steps, micro=micro, gas=gas)  # micro 8, no accumulation
    assert_same_params(W.params_of(engine.module), W.params_of(model))


# ---- 3. delayed learning rate ---------------------------------------------------------------------
def test_lr_schedule_in_steps_advances_once_per_cycle(caplog):
    caplog.set_level(logging.INFO, logger="hift_ds.deepspeed.scheduler")
    sched_params = {"warmup_min_lr": 1e-4, "warmup_max_lr": 1e-2, "warmup_num_steps": 8, "total_num_steps": 40,
                    "warmup_type": "linear"}
    cfg = W.ds_config(scheduler={"type": "WarmupDecayLR", "params": sched_params})
    engine, opt, _, sched = hift_ds.initialize(model=W.tiny_llama(), config=cfg)
    assert isinstance(sched, CycleLRScheduler) and engine.lr_scheduler is sched
    lrs = []
    for s in range(40):
        step_lrs = {pg["lr"] for pg in opt.param_groups}
        assert len(step_lrs) == 1, f"step {s}: groups have different LRs {step_lrs}"
        lrs.append(step_lrs.pop())
        x = W.tokens(s)
        engine.backward(engine(input_ids=x, labels=x).loss)
        engine.step()
    assert opt.cycle == 10

    # Constant inside a cycle, changes only at cycle boundaries.
    for s in range(1, 40):
        if s % K:
            assert lrs[s] == lrs[s - 1], f"LR changed inside a cycle at step {s}: {lrs}"
    assert len(set(lrs)) > 3

    # Plain DeepSpeed WarmupDecayLR in cycles (8 / 4 = 2 warm-up, 40 / 4 = 10 cycles), stepped once per
    # cycle, cycle c at iteration c + 1: DeepSpeed holds warmup_min_lr at iterations -1 and 0, which
    # would cost HiFT two whole cycles; one cycle more in total keeps the last cycle above zero.
    from deepspeed.runtime.lr_schedules import WarmupDecayLR

    dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    ref = WarmupDecayLR(dummy, **{**sched_params, "warmup_num_steps": 2, "total_num_steps": 11})
    per_cycle = []
    for c in range(10):
        ref.step(c + 1)
        per_cycle.append(dummy.param_groups[0]["lr"])
    assert lrs == pytest.approx([per_cycle[s // K] for s in range(40)], rel=1e-12, abs=0)
    assert lrs[0] > sched_params["warmup_min_lr"] and lrs[K] == pytest.approx(sched_params["warmup_max_lr"])
    assert min(lrs) > 0  # no cycle trains for nothing, first or last
    ref.step(11)
    assert sched.get_last_lr()[0] == pytest.approx(dummy.param_groups[0]["lr"], rel=1e-12, abs=0)

    logs = [r.getMessage() for r in caplog.records if r.name == "hift_ds.deepspeed.scheduler" and "converted to cycles"
            in r.getMessage()]
    assert len(logs) == 1, logs
    assert "warmup_num_steps: 8 steps / 4 per cycle, rounded up = 2 cycles" in logs[0]
    assert "total_num_steps: 40 steps / 4 per cycle, rounded up = 10 cycles, + 1" in logs[0]
    assert logs[0].endswith("= 11 cycles")


def test_lr_per_cycle_with_gradient_accumulation_is_the_schedule_in_cycles():
    """gas=3: the LR is read at every micro-batch; it changes only between cycles, to the values computed by hand."""
    gas, peak = 3, 1e-2
    # 8 and 24 optimizer steps are 2 and 6 cycles of K = 4; HiFT adds one cycle to the total and runs cycle c at
    # iteration c + 1. Linear warm-up: lr = peak * it / 2 below iteration 2, then peak * (7 - it) / (7 - 2).
    sched = {"type": "WarmupDecayLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": peak, "warmup_num_steps": 8,
                                                  "total_num_steps": 24, "warmup_type": "linear"}}
    expected = [peak * 1 / 2, peak, peak * 4 / 5, peak * 3 / 5]
    engine, opt, _, _ = hift_ds.initialize(model=W.tiny_llama(), config=W.ds_config(gas=gas, scheduler=sched))
    for step in range(len(expected) * K):
        for micro in range(gas):
            lrs = [pg["lr"] for pg in opt.param_groups] + engine.get_lr()
            assert lrs == pytest.approx([expected[step // K]] * len(lrs), rel=1e-12), (step, micro, lrs)
            assert opt.schedule.steps_done == step
            x = W.tokens(step, micro)
            engine.backward(engine(input_ids=x, labels=x).loss)
            engine.step()
    assert opt.cycle == len(expected) and engine.global_steps == len(expected) * K


def test_warmup_cosine_last_cycle_is_above_its_floor():
    params = {"warmup_min_ratio": 0.0, "warmup_num_steps": 8, "total_num_steps": 40, "cos_min_ratio": 0.0}
    engine, opt, _, _ = hift_ds.initialize(model=W.tiny_llama(),
                                           config=W.ds_config(scheduler={"type": "WarmupCosineLR", "params": params}))
    lrs = []
    W.train_engine(engine, opt, 0, 40, micro=2, gas=1, lrs=lrs)
    assert min(lrs) > 0, lrs  # neither the first cycle (warm-up start) nor the last (cosine end) is wasted
    assert max(lrs) == pytest.approx(1e-2)


def test_load_without_optimizer_states_restarts_the_cycle_count(tmp_path):
    cfg = W.ds_config(scheduler={"type": "WarmupLR", "params": {"warmup_num_steps": 40, "warmup_max_lr": 1e-2}})
    engine, opt, _, _ = hift_ds.initialize(model=W.tiny_llama(), config=cfg)
    W.train_engine(engine, opt, 0, 3 * K, micro=2, gas=1)
    engine.save_checkpoint(str(tmp_path), tag="t")
    engine, opt, _, sched = hift_ds.initialize(model=W.tiny_llama(), config=cfg)
    engine.load_checkpoint(str(tmp_path), tag="t", load_optimizer_states=False)
    assert sched.scheduler.last_batch_iteration == 4 and opt.cycle == 0  # scheduler restored, optimizer not
    lrs = []
    W.train_engine(engine, opt, 0, 2 * K, micro=2, gas=1, lrs=lrs)
    assert lrs[K] > lrs[0]  # the LR moves on after the first cycle, not after three


def test_client_lr_scheduler_callable_advances_once_per_cycle():
    engine, opt, _, sched = hift_ds.initialize(
        model=W.tiny_llama(), config=W.ds_config(),
        lr_scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5))
    assert isinstance(sched, CycleLRScheduler)
    lrs = []
    W.train_engine(engine, opt, 0, 3 * K, micro=2, gas=1, lrs=lrs)
    assert lrs == pytest.approx([1e-2] * K + [5e-3] * K + [2.5e-3] * K)


# ---- 5. checkpoint mid-cycle, resume in a new process ---------------------------------------------
@pytest.fixture(scope="module")
def ckpt_runs(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("engine_ckpt"))
    env = subprocess_env(MASTER_PORT=str(free_port()))
    run_worker([sys.executable, WORKER, "ckpt-ab", out], env)   # A (uninterrupted) and B (save mid-cycle), exits
    env["MASTER_PORT"] = str(free_port())
    run_worker([sys.executable, WORKER, "ckpt-c", out], env)    # C: a new process loads B's checkpoint
    runs = {}
    for v in W.VARIANTS:
        runs[v] = {r: torch.load(os.path.join(out, f"{r}-{v}.pt"), weights_only=False) for r in "ABC"}
        with open(os.path.join(out, f"C-{v}.json")) as f:
            runs[v]["resumed_at"] = json.load(f)["resumed_at"]
    return runs


@pytest.mark.parametrize("variant", sorted(W.VARIANTS))
def test_checkpoint_mid_cycle_resume_in_new_process_is_exact(ckpt_runs, variant):
    r = ckpt_runs[variant]
    a, b, c = r["A"], r["B"], r["C"]
    assert r["resumed_at"] == W.STOP_AT and W.STOP_AT % K != 0
    # random strategy: the resumed run continues the same permutation mid-cycle and the next ones.
    assert a["order"][:W.STOP_AT] == b["order"]
    assert c["order"] == a["order"][W.STOP_AT:]
    cycles = [a["order"][i:i + K] for i in range(0, W.TOTAL_STEPS, K)]
    assert all(sorted(cyc) == list(range(K)) for cyc in cycles) and len({tuple(c_) for c_ in cycles}) > 1
    assert c["lrs"] == a["lrs"][W.STOP_AT:] and len(set(a["lrs"])) > 1
    assert c["steps_done"] == a["steps_done"] == W.TOTAL_STEPS and c["global_steps"] == a["global_steps"]
    dtype = torch.bfloat16 if variant == "bf16" else torch.float32
    assert all(p.dtype == dtype for p in c["params"].values())
    assert_same_params(c["params"], a["params"], exact=True)
    # Every group's state (fp32 masters with bf16), step counts and schedule position, bit-for-bit.
    assert (MASTER in a["optimizer"]["state"][0]) == (variant == "bf16")
    assert_equal_tree(c["optimizer"], a["optimizer"], "optimizer")


# ---- 6./7. two data-parallel ranks ----------------------------------------------------------------
@pytest.fixture(scope="module")
def dist_run(tmp_path_factory):
    """One torchrun of 2 ranks; ZeRO stages 0, 1, 2 in turn, each rank on its half of every batch."""
    out = str(tmp_path_factory.mktemp("engine_dist"))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    run_worker(torchrun + [WORKER, "dist", out], subprocess_env())

    def load(stage, rank):
        err = os.path.join(out, f"dist-z{stage}-rank{rank}.err")
        if os.path.exists(err):
            pytest.fail(f"ZeRO-{stage} rank {rank} failed: {open(err).read()}")
        return torch.load(os.path.join(out, f"dist-z{stage}-rank{rank}.pt"), weights_only=False)
    return load


@pytest.fixture(scope="module")
def one_process_reference():
    """One process, ZeRO-0, trained on the concatenation of the two ranks' halves."""
    engine, opt, _, _ = hift_ds.initialize(model=W.tiny_llama(), config=W.dist_config(world=1))
    order = []
    W.train_engine(engine, opt, 0, W.DIST_STEPS, micro=2 * W.DIST_MICRO, gas=1, record=order)
    return {"params": W.params_of(engine.module), "order": order, "optimizer": opt.state_dict()}


@pytest.mark.parametrize("stage", W.DIST_STAGES)
def test_two_ranks_match_one_process_on_the_whole_batch(dist_run, one_process_reference, stage):
    r0, r1 = dist_run(stage, 0), dist_run(stage, 1)
    assert_same_params(r0["params"], r1["params"], exact=True)
    # At ZeRO-1/2 each rank holds a shard; state_dict() gathers whole groups, the same on every rank.
    assert_equal_tree(r0["optimizer"], r1["optimizer"], "optimizer")
    assert r0["order"] == one_process_reference["order"]
    assert_same_params(r0["params"], one_process_reference["params"])
    ref = one_process_reference["optimizer"]
    assert r0["optimizer"]["hift"]["steps"] == ref["hift"]["steps"]
    for g, (mine, theirs) in enumerate(zip(r0["optimizer"]["state"], ref["state"])):
        assert mine.keys() == theirs.keys()
        for k in mine:
            torch.testing.assert_close(mine[k], theirs[k], msg=lambda m, g=g, k=k: f"group {g} {k}: {m}")
    assert_changed(r0["params"])


@pytest.mark.parametrize("stage", W.DIST_STAGES)
def test_random_order_identical_on_both_ranks(dist_run, stage):
    r0, r1 = dist_run(stage, 0), dist_run(stage, 1)
    assert r0["order"] == r1["order"]
    cycles = [r0["order"][i:i + K] for i in range(0, W.DIST_STEPS, K)]
    assert all(sorted(c) == list(range(K)) for c in cycles)
    assert cycles != [list(range(K))] * len(cycles), "random strategy produced the bottom2up order"
