"""The command line of launch/train.py: its options, the DeepSpeed config they override, the embedded job they default
to, and ``run()``, which calls ``loop.main()`` and turns bad input into ``error: ...`` and exit status 2."""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys

from hift_ds.schedule import STRATEGIES

# The checkout that holds hift_ds (an editable install or PYTHONPATH): its ds_configs/ are the defaults.
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DESCRIPTION = "Fine-tune a Hugging Face model with HiFT (or plain DeepSpeed full fine-tuning) on JSONL data."
log = logging.getLogger(__package__)  # the CLI's messages keep the one name "hift_ds.train"
HIFT_ONLY = ("--group-size", "--strategy")  # options of --mode hift alone


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
    p = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=_HelpFormatter)
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
    p.add_argument("--test-data", default=None, help="a second held-out JSONL, scored whenever the eval split is "
                   "(before, along --eval-every-epochs, after): metrics.json's test_before/test_after")
    p.add_argument("--eval-every-epochs", type=_at_least(float, 0), default=0.0,
                   help="learning curve: score the held-out sets every this many epochs (e.g. 0.25) and at the "
                   "end into eval_log.jsonl (step, epoch, seconds of training and of wall time since the start, "
                   "loss and perplexity or accuracy); 0: before and after training only")
    p.add_argument("--check-pretrained", action="store_true",
                   help="stop with an error if the untrained model's held-out loss is not finite or its perplexity "
                   "is at or above half its vocabulary size (a uniform guess): its pretrained weights did not load")
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
    p.add_argument("--strategy", choices=list(STRATEGIES), default=None,
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
    p.add_argument("--save-total-limit", type=_at_least(int, 0), default=0,
                   help="keep at most N checkpoints: after each save the oldest are deleted, never the one 'latest' "
                   "names; 0: keep every one")
    p.add_argument("--max-nonfinite-batches", type=_at_least(int, 1), default=10,
                   help="a micro-batch whose loss is inf or nan is skipped (no backward, no update); after this many "
                   "in a row the run stops (exit status 1) without writing a checkpoint or final/")
    p.add_argument("--log-every", type=_at_least(int, 0), default=10, help="log every N optimizer steps")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in --output-dir (checked against its manifest; a "
                   "damaged one falls back to the newest intact one)")
    p.add_argument("--overwrite-output-dir", action="store_true",
                   help="start over in an --output-dir that holds a previous run: its log, metrics and checkpoints "
                   "are deleted once this run has loaded its model and data; its final/ stays until this run's "
                   "replaces it")
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
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume and args.overwrite_output_dir:
        parser.error("--resume continues the run in --output-dir, --overwrite-output-dir deletes it: pass one")
    hift_only = [flag for flag in HIFT_ONLY if getattr(args, flag[2:].replace("-", "_")) is not None]
    if args.mode != "hift" and hift_only:
        parser.error(f"{' and '.join(hift_only)} set{'s' if len(hift_only) == 1 else ''} HiFT's groups, which --mode "
                     f"{args.mode} does not have; drop {'it' if len(hift_only) == 1 else 'them'}, or use --mode hift")
    if args.output_dir is None:
        args.output_dir = os.path.join("runs", args.mode)  # an fpft run must not overwrite a HiFT one
    return args


def build_config(args: argparse.Namespace, train_size: int, world: int) -> dict:
    """The DeepSpeed config with CLI overrides applied and "auto" step counts filled in."""
    from hift_ds.config import load_ds_config
    from hift_ds.deepspeed.engine import unsynchronize_throughput_timer
    from hift_ds.schedule import deepspeed_warmup_shift

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
        extra = deepspeed_warmup_shift(cfg.get("scheduler")).extra
        if extra and isinstance(sched.get("total_num_steps"), int):
            # The loop starts the schedule one iteration in (loop.build_engine), as hift_ds.initialize
            # does under HiFT: the extra iterations keep the last step's LR above the floor.
            sched["total_num_steps"] += extra
    cfg["_total_steps"] = total
    return cfg


def batches_per_epoch(train_size: int, micro: int, world: int) -> int:
    """Micro-batches one rank's loader yields per epoch: the sampler's share, the last partial batch dropped."""
    # DistributedSampler gives every rank ceil(train_size / world) examples (padding by repetition).
    return math.ceil(train_size / world) // micro


def resolve_job(args: argparse.Namespace) -> tuple[str, str]:
    """(model path, data path): the given ones or the --task embedded job's; sets --lr to the job's for --mode."""
    # Looked up at each call, not imported at the top: a test may reload jobs or patch its table.
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


def run(argv: list[str] | None = None) -> int:
    """The command line (launch/train.py): ``main()``, bad input as ``error: ...`` on stderr and exit status 2, a run
    stopped by non-finite values (nonfinite.py) as ``error: ...`` and exit status 1."""
    from hift_ds.train.loop import main  # which imports this module

    from hift_ds.train.nonfinite import NonFiniteError

    # Any other exception, a TypeError too, is a bug and keeps its traceback.
    try:
        main(argv)
    except ValueError as e:  # bad input: a clear message, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:  # training diverged; nothing non-finite was saved
        print(f"error: {e}", file=sys.stderr)
        return 1
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()  # without it a multi-process run can exit non-zero after finishing
    return 0
