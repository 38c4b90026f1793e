"""What --output-dir may already hold, and what a run does with it: a previous run is never overwritten silently.

- A fresh run into a directory that holds a previous run (its log, metrics, final/ or checkpoints) stops
  and names ``--resume`` and ``--overwrite-output-dir``.
- ``--overwrite-output-dir`` deletes the previous logs, metrics, profile and checkpoints once the run has
  checked its input and built its engine; the previous final/ stays until this run's replaces it.
- ``--resume`` with no checkpoint yet starts at step 0, like a resume from a checkpoint at step 0: the log of
  a run killed before its first checkpoint is dropped (those steps are trained again). It stops instead when
  the directory holds a finished run (final/, metrics.json) that saved no checkpoint: starting over would
  replace that model.
"""
from __future__ import annotations

import json
import logging
import os
import shutil

from hift_ds import atomic
from hift_ds.distributed import is_main_process
from hift_ds.train.checkpoints import LATEST, finished_tags

log = logging.getLogger(__package__)  # the CLI's messages keep the one name "hift_ds.train"
# What a run writes to --output-dir; all of it but final/ goes with --overwrite-output-dir.
LOG, METRICS, FINAL, CHECKPOINTS = "train_log.jsonl", "metrics.json", "final", "checkpoints"
EVAL_LOG = "eval_log.jsonl"  # the learning curve (--eval-every-epochs)
PROFILE = ("profile.json", "profile.png")


def previous_run(output_dir: str) -> list[str]:
    """The names in ``output_dir`` that a previous run wrote (an empty checkpoints/ does not count)."""
    found = [n for n in (LOG, METRICS, FINAL) if os.path.lexists(os.path.join(output_dir, n))]
    ckpt = os.path.join(output_dir, CHECKPOINTS)
    if os.path.isdir(ckpt) and os.listdir(ckpt):
        found.append(f"{CHECKPOINTS}/")
    return found


def check_output_dir(output_dir: str, resume: bool, overwrite: bool) -> None:
    """Refuse to write over a previous run unless asked (ValueError naming the options); run before anything loads."""
    if is_main_process():
        atomic.recover_dir(os.path.join(output_dir, FINAL))  # a final/ swap that a kill interrupted
    found = previous_run(output_dir)
    if not found or overwrite:
        return
    ckpt = os.path.join(output_dir, CHECKPOINTS)
    if not resume:
        raise ValueError(f"--output-dir {output_dir} holds a previous run ({', '.join(found)}); pass --resume to "
                         "continue it, --overwrite-output-dir to start over (its log, metrics and checkpoints are "
                         "deleted), or another --output-dir")
    has_checkpoint = os.path.lexists(os.path.join(ckpt, LATEST)) or finished_tags(ckpt)
    if not has_checkpoint and ({METRICS, FINAL} & set(found)):
        raise ValueError(f"--resume: nothing to resume in {output_dir}: it holds a finished run "
                         f"({', '.join(found)}) but no checkpoint (it ran without --save-every); pass "
                         "--overwrite-output-dir instead of --resume to train again from the start, or another "
                         "--output-dir")


def clear_previous_run(output_dir: str) -> None:
    """--overwrite-output-dir: delete the previous run's logs, metrics, profile and checkpoints (final/ stays)."""
    if not is_main_process():
        return
    for name in (LOG, EVAL_LOG, METRICS, *PROFILE):
        path = os.path.join(output_dir, name)
        if os.path.isfile(path):
            os.remove(path)
    shutil.rmtree(os.path.join(output_dir, CHECKPOINTS), ignore_errors=True)


def trim_log(path: str, step: int) -> None:
    """A JSONL log of a run resumed at optimizer ``step``: the entries past it dropped (all of them at step 0)."""
    if not os.path.exists(path):
        return
    if step == 0:
        os.remove(path)
        return
    kept, unreadable = [], []
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            try:
                entry_step = json.loads(line)["step"]
            except (ValueError, KeyError, TypeError):  # a kill while the line was written tears the last line
                unreadable.append(n)
                continue
            if entry_step <= step:
                kept.append(line.rstrip(b"\n") + b"\n")
    if unreadable:
        log.warning("%s: dropped %d unreadable line%s (line %s; a run killed while writing leaves its last line "
                    "torn)", path, len(unreadable), "s" if len(unreadable) > 1 else "",
                    ", ".join(map(str, unreadable[:5])))
    atomic.write_bytes(path, b"".join(kept))
