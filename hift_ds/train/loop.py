"""The run launch/train.py makes: data and model, the engine, resume, the epochs, the final evaluation and save.

``main()`` reads top to bottom, one function per stage. Bad input raises ValueError where it is detected
(wrong config types included); ``cli.run()``, the command line, prints it as ``error: ...`` with exit status 2.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import time
from dataclasses import dataclass
from typing import Any

import torch

from hift_ds import atomic
from hift_ds.train import data as D
from hift_ds.train.checkpoints import restore_rng_state, resume_tag, rng_state, save_checkpoint
from hift_ds.train.cli import build_config, parse_args, resolve_job
from hift_ds.train.curve import LearningCurve
from hift_ds.train.evaluation import evaluate_sets, generate_samples, load_failure
from hift_ds.train.model import load_model, save_final
from hift_ds.train.nonfinite import NonFiniteGuard, nonfinite_parameters
from hift_ds.train.outputs import check_output_dir, clear_previous_run, trim_log

log = logging.getLogger(__package__)  # the CLI's messages keep the one name "hift_ds.train"


@dataclass
class Job:
    """What the run trains on: the task, tokenizer and model, the encoded sets, the prompts sampled before and after."""

    task: str
    model_path: str
    tok: Any
    model: Any
    train_ds: Any
    held_out: dict[str, Any]  # "eval" (and "test" with --test-data): encoded held-out sets, scored in this order
    samples: list[dict]  # held-out instruction records whose greedy generations are printed
    chat: bool  # instruction prompts through the tokenizer's chat template
    zero3: bool  # a ZeRO-3 config: the model is partitioned across the ranks


@dataclass
class Run:
    """The DeepSpeed engine and what drives it: the loaders, the step budget, where the run writes."""

    engine: Any
    optimizer: Any
    sampler: Any
    loader: Any
    eval_loaders: dict[str, Any]  # one per held-out set, as Job.held_out
    task: str  # how they are scored (evaluation.evaluate)
    total_steps: int
    world: int
    ckpt_dir: str
    log_path: str
    badam: Any = None  # --mode badam: BAdam's BlockOptimizer (which block trains)


@dataclass
class Start:
    """Where training starts: step 0, or a checkpoint's step and what the run recorded up to it."""

    step: int = 0
    batches: int = 0  # micro-batches read (a skipped non-finite one included)
    before: dict | None = None  # the untrained model's scores per held-out set
    seconds: tuple[float, float] = (0.0, 0.0)  # seconds spent training and evaluating so far


def main(argv: list[str] | None = None) -> dict:
    """Train, evaluate before and after, save the final model; returns the metrics."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from hift_ds.deepspeed.engine import single_process_env

    single_process_env()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    torch.manual_seed(args.seed)
    if args.resume and args.mode == "badam":
        raise ValueError("--resume is not supported with --mode badam: BAdam's optimizer does not save its block "
                         "position or its fp32 copy, so a resumed run would not continue the same training")
    job = prepare_data(args)
    run = build_engine(args, job)
    start = resume(args, run)
    before = start.before or score_untrained(args, run, job)
    samples_before = _generate(run, job) if start.step == 0 else []
    if run.engine.global_rank == 0:
        trim_log(run.log_path, start.step)
    curve = LearningCurve(args.output_dir, run.total_steps, len(run.loader), run.engine.gradient_accumulation_steps(),
                          args.eval_every_epochs, start.seconds, main=run.engine.global_rank == 0)
    curve.start(start.step, before)
    step = train_epochs(args, run, start, before, curve)
    return finish(args, run, job, step, before, samples_before, curve)


def prepare_data(args: argparse.Namespace) -> Job:
    """Read and check the data and the config, load the model (partitioned under ZeRO-3), encode both sets for it."""
    model_path, data_path = resolve_job(args)
    task, train_recs, eval_recs = read_records(args, data_path)
    test_recs = read_held_out(args.test_data, "--test-data", task, data_path) if args.test_data else None
    labels = D.label_set(train_recs, data_path) if task == D.CLASSIFICATION else []
    ds_file = check_config(args, len(train_recs))
    zero3 = isinstance(ds_file, dict) and (ds_file.get("zero_optimization") or {}).get("stage") == 3
    # The last check before the model loads (the slow part): the input is fine, now where the run writes.
    check_output_dir(args.output_dir, args.resume, args.overwrite_output_dir)
    tok, model = load_model(model_path, task, len(labels), zero3_config=ds_file if zero3 else None)
    bad = nonfinite_parameters(model)
    if bad:
        raise ValueError(f"--model {model_path} holds non-finite weights ({', '.join(bad[:3])}"
                         f"{' ...' if len(bad) > 3 else ''}); training cannot start from them: pass a model whose "
                         "weights are finite")
    if args.gradient_checkpointing:
        from hift_ds.activations import enable_gradient_checkpointing
        enable_gradient_checkpointing(model)
    D.check_max_length(args.max_length, tok, model.config)

    def encode(recs: list[dict], path: str):
        if task == D.CLASSIFICATION:
            return D.encode_classification(recs, tok, labels, args.max_length, path)
        return D.encode_instruction(recs, tok, args.max_length, path, args.prompt_format)
    held_out = {"eval": encode(eval_recs, args.eval_data or data_path)}
    if test_recs is not None:
        held_out["test"] = encode(test_recs, args.test_data)
    instruction = task == D.INSTRUCTION
    return Job(task, model_path, tok, model, encode(train_recs, data_path), held_out,
               samples=eval_recs[:args.samples] if instruction else [],
               chat=instruction and D.uses_chat_template(tok, args.prompt_format), zero3=zero3)


def read_records(args: argparse.Namespace, data_path: str) -> tuple[str, list[dict], list[dict]]:
    """(task, training records, held-out records): read and checked, unusable classification records skipped."""
    records = D.read_jsonl(data_path)
    task = D.detect_task(records, data_path)
    if args.task is not None and args.data is not None and task != args.task:
        raise ValueError(f"--task {args.task}, but {data_path} holds {task} records; drop --task or pass "
                         f"{args.task} data")
    if task == D.CLASSIFICATION:
        records = D.usable_classification(records, data_path)
    if not args.eval_data:
        return (task, *D.split(records, args.eval_fraction, args.seed))
    return task, records, read_held_out(args.eval_data, "--eval-data", task, data_path)


def read_held_out(path: str, flag: str, task: str, data_path: str) -> list[dict]:
    """The records of a held-out file (--eval-data, --test-data), checked to be of --data's task."""
    records = D.read_jsonl(path)
    held_task = D.detect_task(records, path)
    if held_task != task:
        raise ValueError(f"{flag} {path} holds {held_task} records, --data {data_path} {task} records; pass "
                         "held-out records of the same task")
    return D.usable_classification(records, path) if task == D.CLASSIFICATION else records


def check_config(args: argparse.Namespace, train_size: int) -> dict:
    """The DeepSpeed config file as read, after checking it as hift_ds.initialize will, before any model is loaded.

    (At ZeRO-3 the model is built partitioned, under the config's settings: a setting HiFT refuses must
    be refused before that, not fail inside it.)
    """
    from hift_ds.config import load_ds_config

    cfg = build_config(args, train_size, int(os.environ.get("WORLD_SIZE", "1")))  # wrong JSON types named
    if args.mode == "hift":
        from hift_ds.deepspeed.plan import build_plan
        build_plan({k: v for k, v in cfg.items() if k != "_total_steps"})
    return load_ds_config(args.deepspeed)


def build_engine(args: argparse.Namespace, job: Job) -> Run:
    """The DeepSpeed engine of --mode (HiFT's, plain, or plain with BAdam as its optimizer) and the data loaders."""
    import deepspeed
    from torch.utils.data import DataLoader, DistributedSampler

    import hift_ds
    from hift_ds.schedule import deepspeed_warmup_shift

    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = build_config(args, len(job.train_ds), world)
    total_steps = cfg.pop("_total_steps")
    client = None
    if args.mode == "badam":  # BAdam is a client optimizer of a plain DeepSpeed engine
        from hift_ds.train.badam import build_badam
        client, cfg = build_badam(job.model, cfg, args.badam_order, args.badam_switch_every, len(job.train_ds), world)
    init = hift_ds.initialize if args.mode == "hift" else deepspeed.initialize
    engine, optimizer, _, scheduler = init(model=job.model, optimizer=client, config=cfg,
                                           model_parameters=[p for p in job.model.parameters() if p.requires_grad])
    steps_in = deepspeed_warmup_shift(cfg.get("scheduler")).steps_in
    if args.mode != "hift" and steps_in:
        # DeepSpeed's warm-up schedules train steps 1 and 2 at warmup_min_lr (iterations -1 and 0,
        # often LR 0); HiFT's engine starts them at iteration 1, and so do the other modes, so
        # that every mode trains every step of the same budget.
        scheduler.step(steps_in)
    micro = engine.train_micro_batch_size_per_gpu()
    sampler = DistributedSampler(job.train_ds, num_replicas=world, rank=engine.global_rank, shuffle=True,
                                 seed=args.seed)
    # Its own generator: the loader must not draw from the global RNG that dropout uses, or a
    # resumed run (whose iterator starts at another point) would diverge from the uninterrupted one.
    loader = DataLoader(job.train_ds, batch_size=micro, sampler=sampler, drop_last=True,
                        generator=torch.Generator().manual_seed(args.seed))
    gas = engine.gradient_accumulation_steps()
    if len(loader) < gas:
        raise ValueError(f"{len(job.train_ds)} training examples make {len(loader)} micro-batches per epoch, fewer "
                         f"than gradient_accumulation_steps={gas}; lower --batch-size or add data")
    eval_loaders = {name: DataLoader(ds, batch_size=micro) for name, ds in job.held_out.items()}
    if args.overwrite_output_dir:
        clear_previous_run(args.output_dir)
    os.makedirs(args.output_dir, exist_ok=True)
    return Run(engine, optimizer, sampler, loader, eval_loaders, job.task, total_steps, world,
               ckpt_dir=os.path.join(args.output_dir, "checkpoints"),  # created by the first checkpoint, if any
               log_path=os.path.join(args.output_dir, "train_log.jsonl"), badam=client)


def resume(args: argparse.Namespace, run: Run) -> Start:
    """Where training starts: the checkpoint --resume chooses, else step 0."""
    tag = resume_tag(run.ckpt_dir) if args.resume else None  # verified against its manifest, or a fall-back
    if tag is None:
        if args.resume:
            log.warning("--resume: no checkpoint in %s yet: starting at step 0", run.ckpt_dir)
        return Start()
    folder = os.path.join(run.ckpt_dir, tag)
    try:
        load_path, client = run.engine.load_checkpoint(run.ckpt_dir, tag=tag)
    except (RuntimeError, EOFError, OSError, KeyError, AssertionError, pickle.UnpicklingError) as e:
        # An unverified (pre-manifest) checkpoint that is damaged, or one of another model or config. The
        # engine may hold part of it now: stop rather than train on that.
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise ValueError(f"--resume: cannot load checkpoint {folder} ({type(e).__name__}: {first}); resume with "
                         "the --model and config that saved it, or start over: drop --resume and pass "
                         "--overwrite-output-dir") from None
    if load_path is None:  # DeepSpeed returns (None, None) instead of raising
        raise ValueError(f"--resume: DeepSpeed could not load checkpoint {folder}")
    restore_rng_state(client)
    log.info("resumed from %s at optimizer step %d", folder, client["step"])
    # Skipped micro-batches (a non-finite loss) were read but not trained: the data position is its own count.
    gas = run.engine.gradient_accumulation_steps()
    # A checkpoint saved before --test-data and learning curves holds the eval split's scores alone.
    return Start(client["step"], client.get("batches", client["step"] * gas),
                 client.get("held_out_before") or {"eval": client["before"]},
                 (client.get("train_seconds", 0.0), client.get("eval_seconds", 0.0)))


def score_untrained(args: argparse.Namespace, run: Run, job: Job) -> dict:
    """The untrained model's scores on each held-out set; --check-pretrained: ValueError if they say it did not load."""
    scores = evaluate_sets(run.engine.module, run.eval_loaders, run.task)
    if args.check_pretrained:
        for name, result in scores.items():
            why = load_failure(result, getattr(job.model.config, "vocab_size", None))
            if why:
                raise ValueError(f"--check-pretrained: the untrained model {job.model_path} scores as if its weights "
                                 f"did not load: on the {name} split {why}; check the model folder and how it was "
                                 "saved, and that no other process is writing it")
    return scores


def train_epochs(args: argparse.Namespace, run: Run, start: Start, before: dict, curve: LearningCurve) -> int:
    """Train from ``start`` to the budget, logging, scoring the learning curve, checkpointing and profiling; the last
    step. A micro-batch with a non-finite loss is skipped (nonfinite.py)."""
    from tqdm import tqdm

    from hift_ds.train.badam import active_block

    engine, optimizer, world, rank = run.engine, run.optimizer, run.world, run.engine.global_rank
    gas, epoch_batches, step, batches = engine.gradient_accumulation_steps(), len(run.loader), start.step, start.batches
    bar = tqdm(total=run.total_steps, initial=step, disable=args.no_progress or rank != 0, dynamic_ncols=True,
               desc=args.mode)
    prof = _start_profiler(optimizer) if args.profile else None
    mark = prof.mark if prof is not None else lambda phase: None
    guard = NonFiniteGuard(args.max_nonfinite_batches)
    engine.train()
    tokens, t0, trained = 0, time.time(), step * gas
    curve.clock.start()
    while step < run.total_steps:
        epoch, skip = divmod(batches, epoch_batches)  # a resumed run skips what its epoch already read
        run.sampler.set_epoch(epoch)
        for i, batch in enumerate(run.loader):
            if i < skip:
                continue
            batches += 1
            batch = {k: v.to(engine.device) for k, v in batch.items()}
            mark("forward")
            loss = engine(**batch).loss
            if not guard.finite(loss, step, engine.module):  # skipped before its backward: no update
                mark(None)
                continue
            mark("backward")
            engine.backward(loss)
            mark("step")
            if engine.is_gradient_accumulation_boundary():  # this step updates, then moves group and LR on
                lr = optimizer.param_groups[0]["lr"]
                group = active_block(run.badam) if run.badam is not None else getattr(optimizer, "active_group", None)
            engine.step()
            mark(None)
            trained += 1
            tokens += int(batch["attention_mask"].sum()) * world
            if trained % gas:
                continue
            step += 1
            loss_val = float(loss.detach())
            if rank == 0:
                with open(run.log_path, "a") as f:
                    f.write(json.dumps({"step": step, "loss": loss_val, "lr": lr, "group": group}) + "\n")
            bar.set_postfix(loss=f"{loss_val:.4f}", lr=f"{lr:.2e}", group=group,
                            tok_s=f"{tokens / max(1e-9, time.time() - t0):.0f}")
            bar.update(1)
            if args.log_every and step % args.log_every == 0 and rank == 0:
                log.info("step %d loss %.4f lr %.3e group %s", step, loss_val, lr, group)
            if curve.due(step):
                with curve.clock.paused():
                    scores = evaluate_sets(engine.module, run.eval_loaders, run.task)
                curve.record(step, scores)
            if args.save_every and (step % args.save_every == 0 or step == run.total_steps):
                guard.check_weights(engine.module, step, f"checkpoint step{step}")
                state = {"step": step, "batches": batches, "before": before["eval"], "held_out_before": before,
                         **curve.checkpoint_state(), **rng_state()}
                save_checkpoint(engine, run.ckpt_dir, step, state, keep=args.save_total_limit)
            if step >= run.total_steps:
                break
    bar.close()
    if prof is not None:
        prof.stop()
        if rank == 0:
            _write_profile(prof, args.output_dir, args.mode)
    return step


def _start_profiler(optimizer):
    """--profile: the memory profiler of ``python -m hift_ds.profile``, sampling every 10 ms from now on."""
    from hift_ds.profile import MemoryProfiler

    prof = MemoryProfiler(interval_ms=10, optimizer=optimizer if hasattr(optimizer, "memory_report") else None)
    prof.start()
    return prof


def _write_profile(prof, output_dir: str, mode: str) -> None:
    atomic.write_text(os.path.join(output_dir, "profile.json"), json.dumps(prof.summary(), indent=2))
    prof.plot(os.path.join(output_dir, "profile.png"), title=f"{mode} training")


def finish(args: argparse.Namespace, run: Run, job: Job, step: int, before: dict, samples_before: list,
           curve: LearningCurve) -> dict:
    """Evaluate after training, save final/ and metrics.json, print the comparison; returns the metrics.

    ``before``: the untrained model's scores per held-out set; metrics.json's ``before``/``after`` are the eval
    split's, ``test_before``/``test_after`` the --test-data set's."""
    from hift_ds.distributed.zero3 import gathered_state_dict

    NonFiniteGuard.check_weights(run.engine.module, step, "final/")  # a good final/ is never replaced by these
    with curve.clock.paused():
        scores = evaluate_sets(run.engine.module, run.eval_loaders, run.task)
    curve.record(step, scores)
    train_seconds, _ = curve.clock.seconds()
    samples = _generate(run, job)
    for i, sample in enumerate(samples):
        sample["before"] = samples_before[i]["generated"] if samples_before else None
    # ZeRO-3: every rank holds 1/N of the weights; gather them module by module (all ranks take part).
    state = gathered_state_dict(run.engine.module) if job.zero3 else None
    test = {"test_before": before.get("test"), "test_after": scores["test"]} if "test" in scores else {}
    if run.engine.global_rank == 0:
        final = os.path.join(args.output_dir, "final")
        save_final(run.engine.module, job.tok, final, state_dict=state)
        result = {"mode": args.mode, "lr": args.lr, "steps": step, "before": before["eval"], "after": scores["eval"],
                  "samples": samples, "steps_per_epoch": len(run.loader) / run.engine.gradient_accumulation_steps(),
                  "train_seconds": train_seconds, "eval_seconds": curve.clock.eval_seconds,
                  "vocab_size": getattr(job.model.config, "vocab_size", None), **test}
        if run.badam is not None:
            result["badam_switch_every"] = run.badam.switch_block_every
        atomic.write_text(os.path.join(args.output_dir, "metrics.json"), json.dumps(result, indent=2))
        _print_report(before, scores, samples)
        dtype = str(next(run.engine.module.parameters()).dtype).replace("torch.", "")
        print(f"final model ({dtype}): {final}")
    return {"before": before["eval"], "after": scores["eval"], "samples": samples, **test}


def _generate(run: Run, job: Job) -> list[dict]:
    """Greedy generations for the sample prompts (none for classification)."""
    if not job.samples:
        return []
    return generate_samples(run.engine.module, job.tok, job.samples, job.chat, synced_gpus=job.zero3 and run.world > 1)


def _print_report(before: dict, after: dict, samples: list[dict]) -> None:
    """The metrics of each held-out set before and after training (the test set's prefixed), then the samples."""
    width = 12 if len(after) == 1 else 17
    print(f"\n{'metric':<{width}}{'before':>10}{'after':>10}")
    for name, scores in after.items():
        for k, a in scores.items():
            b = (before.get(name) or {}).get(k, float("nan"))
            print(f"{k if name == 'eval' else f'{name} {k}':<{width}}{b:>10.4f}{a:>10.4f}")
    for sample in samples:
        print(f"\nprompt:    {sample['prompt']}\nreference: {sample['reference']}")
        if sample["before"] is not None:
            print(f"before:    {sample['before']}")
        print(f"after:     {sample['generated']}")
