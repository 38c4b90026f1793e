#!/usr/bin/env python
"""Fine-tune a Hugging Face model with HiFT (or plain DeepSpeed full fine-tuning) on JSONL data.

Run as ``deepspeed launch/train.py --deepspeed ds_configs/hift.json --model M --data D`` or as
``python launch/train.py ...`` (one process; the distributed environment is set up here).
With no --model/--data it fine-tunes an embedded job (see README): ``--task classification``
(MiniLM on BBC News, the default) or ``--task instruction`` (SmolLM2-135M-Instruct on the
chatterbot corpus).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
log = logging.getLogger("hift_ds.train")


def _at_least(kind: type, low: int, strict: bool = False):
    """An argparse type: a number of ``kind`` that is >= ``low`` (> ``low`` if ``strict``)."""
    # Without it 0 or a negative count is taken and then silently ignored or misread downstream.
    def parse(text: str):
        value = kind(text)
        if not (value > low if strict else value >= low) or not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {low}, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse says "invalid int value: 'x'" for a non-number
    return parse


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends an option's default to its help, unless it is None, a flag's False, or already in the help."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.nargs == 0 or "(default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser (also read by benchmarks/quality.py, which passes options on)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=_HelpFormatter)
    p.add_argument("--deepspeed", default=os.path.join(ROOT, "ds_configs", "hift.json"),
                   help="DeepSpeed JSON config (with a \"hift\" block for --mode hift) (default: this checkout's "
                   "ds_configs/hift.json)")
    p.add_argument("--task", choices=["classification", "instruction"], default=None,
                   help="embedded job used for a missing --model/--data (default: classification)")
    p.add_argument("--model", default=None, help="HF model name or local directory (default: the --task job's)")
    p.add_argument("--data", default=None, help="training JSONL: text/label or instruction/input/output records "
                   "(default: the --task job's)")
    p.add_argument("--eval-data", default=None, help="held-out JSONL (default: --eval-fraction of --data)")
    p.add_argument("--eval-fraction", type=float, default=0.1, help="share of --data held out for evaluation")
    p.add_argument("--mode", choices=["hift", "fpft", "badam"], default="hift",
                   help="HiFT, plain DeepSpeed full fine-tuning, or BAdam (the badam package) as a baseline")
    p.add_argument("--epochs", type=_at_least(float, 0, strict=True), default=1.0, help="passes over the training data")
    p.add_argument("--max-steps", type=_at_least(int, 0), default=0,
                   help="stop after this many optimizer steps (0: epochs decide)")
    p.add_argument("--max-length", type=_at_least(int, 1), default=None,
                   help="tokens per example, truncated/padded; the embedded instruction job uses 64 (default: 128)")
    p.add_argument("--batch-size", type=_at_least(int, 1), default=None,
                   help="micro-batch per rank (overrides the config)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (overrides the config; default for "
                   "an embedded job: its measured best for --mode)")
    p.add_argument("--group-size", type=_at_least(int, 1), default=None,
                   help="units per HiFT group (overrides the config)")
    p.add_argument("--strategy", choices=["bottom2up", "top2down", "random"], default=None,
                   help="HiFT group order (overrides the config)")
    p.add_argument("--prompt-format", choices=["auto", "chat", "plain"], default="auto",
                   help="instruction prompts: the tokenizer's chat template (auto: when it has one) or plain text")
    p.add_argument("--samples", type=_at_least(int, 0), default=3,
                   help="instruction task: greedy generations printed for this many held-out prompts")
    p.add_argument("--badam-switch-every", type=_at_least(int, 0), default=0,
                   help="--mode badam: steps per block (0: BAdam's recommended max(n/(batch*blocks), 50))")
    p.add_argument("--badam-order", choices=["random", "ascending", "descending"], default="random",
                   help="--mode badam: block order")
    p.add_argument("--output-dir", default=None, help="the log, metrics, final model and any checkpoints go here "
                   "(default: runs/<mode>)")
    p.add_argument("--save-every", type=_at_least(int, 0), default=0,
                   help="write a DeepSpeed checkpoint (for --resume) every N optimizer steps and at the end of the "
                   "run; 0: no checkpoints (the final model is saved either way)")
    p.add_argument("--log-every", type=_at_least(int, 0), default=10, help="log every N optimizer steps")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output-dir")
    p.add_argument("--seed", type=int, default=42, help="seed for the data split, order and initialisation")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations in backward instead of keeping them (less memory, one more forward per step)")
    p.add_argument("--profile", action="store_true", help="sample memory during training (hift_ds.profile); "
                   "writes profile.json and profile.png to --output-dir")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options, with the per-mode default output directory filled in."""
    args = build_parser().parse_args(argv)
    if args.output_dir is None:
        args.output_dir = os.path.join("runs", args.mode)  # an fpft run must not overwrite a HiFT one
    return args


def build_config(args: argparse.Namespace, train_size: int, world: int) -> dict:
    """The DeepSpeed config with CLI overrides applied and "auto" step counts filled in."""
    from hift_ds.config import load_ds_config
    from hift_ds.deepspeed.engine import unsynchronize_throughput_timer
    from hift_ds.deepspeed.scheduler import warmup_held_at_start

    cfg = load_ds_config(args.deepspeed)
    # Wrong JSON types would surface below as TypeErrors that look like bugs; name the key instead.
    if not isinstance(cfg, dict):
        raise ValueError(f"DeepSpeed config {args.deepspeed!r} must be a JSON object, got {type(cfg).__name__}")
    for where in ("optimizer", "optimizer.params", "scheduler", "scheduler.params", "hift"):
        outer, _, inner = where.partition(".")
        block = cfg.get(outer, {}).get(inner, {}) if inner else cfg.get(outer, {})  # outer was checked just before
        if not isinstance(block, dict):
            raise ValueError(f"{args.deepspeed}: \"{where}\" must be a JSON object, got {type(block).__name__}")
    if args.batch_size is not None:
        cfg["train_micro_batch_size_per_gpu"] = args.batch_size
    cfg.pop("train_batch_size", None)
    micro = cfg.setdefault("train_micro_batch_size_per_gpu", 8)
    gas = cfg.setdefault("gradient_accumulation_steps", 1)
    for key, value in (("train_micro_batch_size_per_gpu", micro), ("gradient_accumulation_steps", gas)):
        if type(value) is not int or value < 1:
            raise ValueError(f"{args.deepspeed}: {key} must be an integer >= 1, got {value!r}")
    total = args.max_steps or max(1, math.floor(args.epochs * batches_per_epoch(train_size, micro, world) / gas))
    if args.lr is not None:
        cfg.setdefault("optimizer", {"type": "AdamW", "params": {}}).setdefault("params", {})["lr"] = args.lr
    sched = cfg.get("scheduler", {}).get("params", {})
    if args.lr is not None and "warmup_max_lr" in sched:
        sched["warmup_max_lr"] = args.lr
    if sched.get("total_num_steps") == "auto":
        sched["total_num_steps"] = total
    if sched.get("warmup_num_steps") == "auto":
        sched["warmup_num_steps"] = max(1, total // 10)
    if args.mode == "hift":
        if "hift" not in cfg:
            raise ValueError(f"{args.deepspeed} has no \"hift\" block; use ds_configs/hift.json or --mode fpft")
        if args.group_size is not None:
            cfg["hift"]["group_size"] = args.group_size
        if args.strategy is not None:
            cfg["hift"]["strategy"] = args.strategy
    else:
        # What hift_ds.initialize does for a HiFT run (no device synchronize per step unless the config asks
        # for timers), so that a baseline is not slowed by a timer the HiFT run does without.
        unsynchronize_throughput_timer(cfg)
        if args.mode == "fpft":
            cfg.pop("hift", None)
            opt = cfg.get("optimizer", {})
            if opt.get("type", "").lower() in ("adam", "adamw"):
                opt.setdefault("params", {})["torch_adam"] = True  # plain torch AdamW: the same maths as HiFT's
        if warmup_held_at_start(cfg.get("scheduler")) and isinstance(sched.get("total_num_steps"), int):
            # main() starts the schedule at iteration 1, as hift_ds.initialize does under HiFT:
            # one more iteration keeps the last step's LR above the floor.
            sched["total_num_steps"] += 2 if cfg["scheduler"].get("type") == "WarmupCosineLR" else 1
    cfg["_total_steps"] = total
    return cfg


def batches_per_epoch(train_size: int, micro: int, world: int) -> int:
    """Micro-batches one rank's loader yields per epoch: the sampler's share, the last partial batch dropped."""
    # DistributedSampler gives every rank ceil(train_size / world) examples (padding by repetition).
    return math.ceil(train_size / world) // micro


def load_model(path: str, task: str, num_labels: int, zero3_config: dict | None = None):
    """Tokenizer and model from a HF name or directory, with clear errors for missing weights.

    With a ZeRO-3 ``zero3_config`` the model is built inside ``deepspeed.zero.Init`` and its weights
    loaded partition by partition (transformers does both while an ``HfDeepSpeedConfig`` is alive),
    so no rank ever holds the whole model.
    """
    import transformers

    if os.path.isdir(path) and not any(f.endswith((".safetensors", ".bin", ".pt")) for f in os.listdir(path)):
        raise ValueError(f"model directory {path!r} has no weights (*.safetensors or *.bin); point --model at a "
                         "saved model (save_pretrained output) or a hub name")
    if zero3_config is not None:
        from transformers.integrations import HfDeepSpeedConfig
        zero3 = HfDeepSpeedConfig(zero3_config)  # noqa: F841 (transformers holds it by weak reference)
    try:
        tok = transformers.AutoTokenizer.from_pretrained(path)
        if task == "classification":
            model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
        else:
            model = transformers.AutoModelForCausalLM.from_pretrained(path)
    except OSError as e:
        raise ValueError(f"cannot load model {path!r}: {e}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    return tok, model


def resolve_job(args: argparse.Namespace) -> tuple[str, str]:
    """(model path, data path): the given ones or the --task embedded job's; sets --lr to the job's for --mode."""
    from hift_ds.train.jobs import EMBEDDED_JOBS

    job = EMBEDDED_JOBS[args.task or "classification"]
    model_path, data_path = args.model or job.model(), args.data or job.data()
    if args.model is None and args.data is None:
        for key, value in job.options.items():
            if getattr(args, key) is None:
                setattr(args, key, value)
        if args.lr is None and args.mode in job.lr:
            args.lr = job.lr[args.mode]
            log.info("peak LR %g: the embedded %s job's measured best for --mode %s (--lr overrides it)", args.lr,
                     args.task or "classification", args.mode)
    if args.max_length is None:
        args.max_length = 128
    return model_path, data_path


def _mark(prof, phase: str | None) -> None:
    if prof is not None:
        prof.mark(phase)


def main(argv: list[str] | None = None) -> dict:
    """Train, evaluate before and after, save the final model; returns the metrics."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from hift_ds.deepspeed.engine import single_process_env

    single_process_env()
    import torch
    import deepspeed
    from torch.utils.data import DataLoader, DistributedSampler
    from tqdm import tqdm

    import hift_ds
    from hift_ds import atomic
    from hift_ds.train import data as D
    from hift_ds.train.checkpoints import latest_tag, restore_rng_state, rng_state, save_checkpoint
    from hift_ds.config import load_ds_config
    from hift_ds.train.evaluation import evaluate, generate_samples
    from hift_ds.deepspeed.scheduler import warmup_held_at_start
    from hift_ds.distributed.zero3 import gathered_state_dict

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    torch.manual_seed(args.seed)
    if args.resume and args.mode == "badam":
        raise ValueError("--resume is not supported with --mode badam: BAdam's optimizer does not save its block "
                         "position or its fp32 copy, so a resumed run would not continue the same training")
    model_path, data_path = resolve_job(args)
    records = D.read_jsonl(data_path)
    task = D.detect_task(records, data_path)
    if args.task is not None and args.data is not None and task != args.task:
        raise ValueError(f"--task {args.task}, but {data_path} holds {task} records; drop --task or pass "
                         f"{args.task} data")
    if args.eval_data:
        train_recs, eval_recs = records, D.read_jsonl(args.eval_data)
        D.detect_task(eval_recs, args.eval_data)
    else:
        train_recs, eval_recs = D.split(records, args.eval_fraction, args.seed)
    labels = D.label_set(train_recs) if task == D.CLASSIFICATION else []
    ds_file = load_ds_config(args.deepspeed)
    zero3 = isinstance(ds_file, dict) and (ds_file.get("zero_optimization") or {}).get("stage") == 3
    tok, model = load_model(model_path, task, len(labels), zero3_config=ds_file if zero3 else None)
    if args.gradient_checkpointing:
        from hift_ds.profile.presets import enable_gradient_checkpointing
        enable_gradient_checkpointing(model)
    D.check_max_length(args.max_length, tok, model.config)
    if task == D.CLASSIFICATION:
        train_ds = D.encode_classification(train_recs, tok, labels, args.max_length, data_path)
        eval_ds = D.encode_classification(eval_recs, tok, labels, args.max_length, args.eval_data or data_path)
    else:
        train_ds = D.encode_instruction(train_recs, tok, args.max_length, data_path, args.prompt_format)
        eval_ds = D.encode_instruction(eval_recs, tok, args.max_length, args.eval_data or data_path,
                                       args.prompt_format)

    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = build_config(args, len(train_ds), world)
    total_steps = cfg.pop("_total_steps")
    client = None
    if args.mode == "badam":  # BAdam is a client optimizer of a plain DeepSpeed engine
        from hift_ds.train.badam import build_badam
        client, cfg = build_badam(model, cfg, args.badam_order, args.badam_switch_every, len(train_ds), world)
    init = hift_ds.initialize if args.mode == "hift" else deepspeed.initialize
    engine, optimizer, _, scheduler = init(model=model, model_parameters=[p for p in model.parameters()
                                                                          if p.requires_grad],
                                           optimizer=client, config=cfg)
    if args.mode != "hift" and warmup_held_at_start(cfg.get("scheduler")):
        # DeepSpeed's warm-up schedules train steps 1 and 2 at warmup_min_lr (iterations -1 and 0,
        # often LR 0); HiFT's engine starts them at iteration 1, and so do the other modes, so
        # that every mode trains every step of the same budget.
        scheduler.step(1)
    rank = engine.global_rank
    micro, gas = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()
    sampler = DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    # Its own generator: the loader must not draw from the global RNG that dropout uses, or a
    # resumed run (whose iterator starts at another point) would diverge from the uninterrupted one.
    loader = DataLoader(train_ds, batch_size=micro, sampler=sampler, drop_last=True,
                        generator=torch.Generator().manual_seed(args.seed))
    eval_loader = DataLoader(eval_ds, batch_size=micro)
    ckpt_dir = os.path.join(args.output_dir, "checkpoints")  # created by the first checkpoint, if any
    os.makedirs(args.output_dir, exist_ok=True)
    log_path = os.path.join(args.output_dir, "train_log.jsonl")

    step, before = 0, None
    tag = latest_tag(ckpt_dir) if args.resume else None
    if tag is not None:
        load_path, client = engine.load_checkpoint(ckpt_dir, tag=tag)
        if load_path is None:  # DeepSpeed returns (None, None) instead of raising
            raise ValueError(f"--resume: DeepSpeed could not load checkpoint {os.path.join(ckpt_dir, tag)}")
        step, before = client["step"], client["before"]
        restore_rng_state(client)
        log.info("resumed from %s at optimizer step %d", os.path.join(ckpt_dir, tag), step)
    elif args.resume:
        log.warning("--resume: no checkpoint in %s (no 'latest' file), starting fresh", ckpt_dir)
    if before is None:
        before = evaluate(engine.module, eval_loader, task)
    chat = task == D.INSTRUCTION and D.uses_chat_template(tok, args.prompt_format)
    sample_recs = eval_recs[:args.samples] if task == D.INSTRUCTION else []
    samples_before = generate_samples(engine.module, tok, sample_recs, chat, synced_gpus=zero3 and world > 1) \
        if sample_recs and step == 0 else []
    if rank == 0 and step == 0 and os.path.exists(log_path):
        os.remove(log_path)
    if rank == 0 and step > 0 and os.path.exists(log_path):  # drop entries past the checkpoint
        kept = [l for l in open(log_path) if json.loads(l)["step"] <= step]
        atomic.write_text(log_path, "".join(kept))

    epoch_batches = len(loader)
    if epoch_batches < gas:
        raise ValueError(f"{len(train_ds)} training examples make {epoch_batches} micro-batches per epoch, fewer "
                         f"than gradient_accumulation_steps={gas}; lower --batch-size or add data")
    bar = tqdm(total=total_steps, initial=step, disable=args.no_progress or rank != 0, dynamic_ncols=True,
               desc=args.mode)
    prof = None
    if args.profile:
        from hift_ds.profile import MemoryProfiler
        prof = MemoryProfiler(interval_ms=10, optimizer=optimizer if hasattr(optimizer, "memory_report") else None)
        prof.start()
    engine.train()
    tokens, t0, micro_done = 0, time.time(), step * gas
    while step < total_steps:
        epoch, skip = divmod(micro_done, epoch_batches)
        sampler.set_epoch(epoch)
        for i, batch in enumerate(loader):
            if i < skip:
                continue
            batch = {k: v.to(engine.device) for k, v in batch.items()}
            _mark(prof, "forward")
            loss = engine(**batch).loss
            _mark(prof, "backward")
            engine.backward(loss)
            _mark(prof, "step")
            if engine.is_gradient_accumulation_boundary():  # this step updates, then moves group and LR on
                lr, group = optimizer.param_groups[0]["lr"], getattr(optimizer, "active_group", None)
            engine.step()
            _mark(prof, None)
            micro_done += 1
            tokens += int(batch["attention_mask"].sum()) * world
            if micro_done % gas:
                continue
            step += 1
            loss_val = float(loss.detach())
            entry = {"step": step, "loss": loss_val, "lr": lr, "group": group}
            if rank == 0:
                with open(log_path, "a") as f:
                    f.write(json.dumps(entry) + "\n")
            bar.set_postfix(loss=f"{loss_val:.4f}", lr=f"{lr:.2e}", group=group,
                            tok_s=f"{tokens / max(1e-9, time.time() - t0):.0f}")
            bar.update(1)
            if args.log_every and step % args.log_every == 0 and rank == 0:
                log.info("step %d loss %.4f lr %.3e group %s", step, loss_val, lr, group)
            if args.save_every and (step % args.save_every == 0 or step == total_steps):
                save_checkpoint(engine, ckpt_dir, step, {"step": step, "before": before, **rng_state()})
            if step >= total_steps:
                break
    bar.close()
    if prof is not None:
        prof.stop()
        if rank == 0:
            with open(os.path.join(args.output_dir, "profile.json"), "w") as f:
                json.dump(prof.summary(), f, indent=2)
            prof.plot(os.path.join(args.output_dir, "profile.png"), title=f"{args.mode} training")
    after = evaluate(engine.module, eval_loader, task)
    samples = generate_samples(engine.module, tok, sample_recs, chat, synced_gpus=zero3 and world > 1) \
        if sample_recs else []
    for i, sample in enumerate(samples):
        sample["before"] = samples_before[i]["generated"] if samples_before else None
    # ZeRO-3: every rank holds 1/N of the weights; gather them module by module (all ranks take part).
    state = gathered_state_dict(engine.module) if zero3 else None
    if rank == 0:
        final = os.path.join(args.output_dir, "final")
        # replace=True deletes the old final/ before the rename: a kill between the two leaves none.
        atomic.write_dir(final, lambda tmp: (engine.module.save_pretrained(tmp, state_dict=state),
                                             tok.save_pretrained(tmp)), replace=True)
        result = {"mode": args.mode, "lr": args.lr, "steps": step, "before": before, "after": after,
                  "samples": samples}
        atomic.write_text(os.path.join(args.output_dir, "metrics.json"), json.dumps(result, indent=2))
        rows = [(k, before[k], after[k]) for k in after]
        print(f"\n{'metric':<12}{'before':>10}{'after':>10}")
        for k, b, a in rows:
            print(f"{k:<12}{b:>10.4f}{a:>10.4f}")
        for sample in samples:
            print(f"\nprompt:    {sample['prompt']}\nreference: {sample['reference']}")
            if sample["before"] is not None:
                print(f"before:    {sample['before']}")
            print(f"after:     {sample['generated']}")
        dtype = str(next(engine.module.parameters()).dtype).replace("torch.", "")
        print(f"final model ({dtype}): {final}")
    return {"before": before, "after": after, "samples": samples}


if __name__ == "__main__":
    # Bad input is raised as ValueError where it is detected (wrong config types included); any
    # other exception, a TypeError too, is a bug and keeps its traceback.
    try:
        main()
    except ValueError as e:  # bad input: a clear message, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()  # without it a multi-process run can exit non-zero after finishing
