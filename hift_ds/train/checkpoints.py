"""Resumable training checkpoints for launch/train.py: DeepSpeed checkpoints with a manifest (``manifest.py``)
written once their files are complete, a ``latest`` pointer that moves atomically after it, the choice of
the checkpoint ``--resume`` loads (the one ``latest`` names if it is intact, else the newest intact one),
``--save-total-limit``'s pruning, and the RNG state a resumed run restores.

A checkpoint folder without a manifest is one whose save did not finish, or one saved before manifests
existed: only the second kind is ever named by ``latest``, and it is resumed from unverified, with a warning.
"""
from __future__ import annotations

import glob
import logging
import os
import re
import shutil

from hift_ds import atomic
from hift_ds.distributed import is_main_process
from hift_ds.train import manifest

log = logging.getLogger(__name__)
LATEST = "latest"
_TAG = re.compile(r"step(\d+)")


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(engine, ckpt_dir: str, step: int, client_state: dict, keep: int = 0) -> None:
    """DeepSpeed checkpoint of this step, then its manifest, then ``latest``; ``keep``: prune to that many (0: all)."""
    tag = f"step{step}"
    folder = os.path.join(ckpt_dir, tag)
    if is_main_process() and os.path.isdir(folder):
        _delete(folder)  # an unfinished or damaged earlier save of this step: its files must not mix with these
    _barrier()
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state=client_state, save_latest=False)
    _barrier()
    if is_main_process():
        manifest.write_manifest(folder)
        atomic.write_text(os.path.join(ckpt_dir, LATEST), tag)
        if keep:
            prune(ckpt_dir, keep)


def _delete(folder: str) -> None:
    # The manifest first: a kill during the deletion leaves a folder that no resume takes for intact.
    path = os.path.join(folder, manifest.MANIFEST)
    if os.path.exists(path):
        os.remove(path)
    shutil.rmtree(folder)


def _step_of(tag: str) -> int | None:
    m = _TAG.fullmatch(tag)
    return int(m.group(1)) if m else None


def finished_tags(ckpt_dir: str) -> list[str]:
    """Tags of the checkpoints in ``ckpt_dir`` whose save finished (they have a manifest), oldest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    tags = [t for t in os.listdir(ckpt_dir) if _step_of(t) is not None
            and manifest.has_manifest(os.path.join(ckpt_dir, t))]
    return sorted(tags, key=_step_of)


def prune(ckpt_dir: str, keep: int) -> None:
    """Delete the oldest finished checkpoints up to the one ``latest`` names, so that ``keep`` of them remain.

    The one ``latest`` names is never deleted, nor any newer one (a save newer than ``latest`` is one a
    resumed run fell back from; the run saves over it when it gets there).
    """
    named, _ = read_latest(ckpt_dir)
    if named is None or _step_of(named) is None:
        return
    older = [t for t in finished_tags(ckpt_dir) if _step_of(t) <= _step_of(named)]
    for tag in older[:-keep] if keep < len(older) else []:
        if tag != named:
            _delete(os.path.join(ckpt_dir, tag))
            log.info("--save-total-limit %d: deleted checkpoint %s", keep, os.path.join(ckpt_dir, tag))


def read_latest(ckpt_dir: str) -> tuple[str | None, str | None]:
    """(tag, problem): the tag ``latest`` names, or None and why it names none (None too: there is no ``latest``)."""
    path = os.path.join(ckpt_dir, LATEST)
    if not os.path.isfile(path):
        return None, None
    with open(path, "rb") as f:
        raw = f.read(4096)
    try:
        tag = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None, f"{path} is not text (damaged)"
    if not tag or not tag.isprintable() or "/" in tag or os.sep in tag or tag in (".", ".."):
        return None, f"{path} holds no checkpoint tag ({raw[:40]!r})"
    return tag, None


def tag_problem(ckpt_dir: str, tag: str) -> str | None:
    """What keeps checkpoint ``tag`` from being resumed, in a few words naming the file; None if it can be."""
    folder = os.path.join(ckpt_dir, tag)
    if not os.path.isdir(folder):
        return f"{folder} does not exist"
    if manifest.has_manifest(folder):
        return manifest.problem(folder)
    if not glob.glob(os.path.join(glob.escape(folder), "*model_states.pt")):
        return f"{folder} holds no model states"
    return None


def choose_checkpoint(ckpt_dir: str) -> str | None:
    """The tag ``--resume`` loads: ``latest``'s if intact, else the newest intact one; None when there is none at all.

    Each damaged checkpoint gets one warning naming the file; a fall-back is said, and ``latest`` is
    pointed at it. With checkpoints present but none intact, a ValueError says what is wrong with each.
    """
    named, latest_problem = read_latest(ckpt_dir)
    problems = [latest_problem] if latest_problem else []
    if latest_problem:
        log.warning("--resume: %s", latest_problem)
    candidates = [t for t in reversed(finished_tags(ckpt_dir)) if t != named]
    for tag in ([named] if named else []) + candidates:
        why = tag_problem(ckpt_dir, tag)
        if why is not None:
            problems.append(f"{tag}: {why}")
            log.warning("--resume: checkpoint %s is damaged: %s", os.path.join(ckpt_dir, tag), why)
            continue
        if tag == named and not manifest.has_manifest(os.path.join(ckpt_dir, tag)):
            log.warning("--resume: checkpoint %s has no manifest (saved before hift-ds verified checkpoints): "
                        "resuming from it unverified", os.path.join(ckpt_dir, tag))
        if tag != named:
            log.warning("--resume: falling back to %s, the newest intact checkpoint (latest now names it)",
                        os.path.join(ckpt_dir, tag))
            atomic.write_text(os.path.join(ckpt_dir, LATEST), tag)
        return tag
    if not problems:
        return None
    found = sorted(t for t in os.listdir(ckpt_dir) if os.path.isdir(os.path.join(ckpt_dir, t)))
    raise ValueError(f"--resume: no intact checkpoint in {ckpt_dir} ({'; '.join(problems)}; checkpoint folders: "
                     f"{found or 'none'}); restore one, or start over: drop --resume and pass --overwrite-output-dir")


def resume_tag(ckpt_dir: str) -> str | None:
    """``choose_checkpoint`` on the main process, its answer (or its error) given to every rank."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return choose_checkpoint(ckpt_dir)
    answer = [None, None]
    if is_main_process():
        try:
            answer = [choose_checkpoint(ckpt_dir), None]
        except ValueError as e:  # every rank raises it, rather than the others waiting here for ever
            answer = [None, str(e)]
    dist.broadcast_object_list(answer, src=0)
    if answer[1] is not None:
        raise ValueError(answer[1])
    return answer[0]


def rng_state() -> dict:
    """The RNG states a resumed run restores: torch's CPU generator and, with CUDA, every GPU's."""
    import torch

    state = {"rng": torch.get_rng_state()}
    if torch.cuda.is_available():  # GPU dropout draws from the CUDA generators, not the CPU one
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Restore what ``rng_state()`` saved; the CUDA part only where both runs have CUDA."""
    import torch

    torch.set_rng_state(state["rng"])
    if torch.cuda.is_available() and "cuda_rng" in state:
        # Only the devices both runs have; a resume on another GPU count is not bit-exact anyway.
        torch.cuda.set_rng_state_all(state["cuda_rng"][:torch.cuda.device_count()])
    elif torch.cuda.is_available():
        log.warning("checkpoint has no CUDA RNG state (saved without CUDA): GPU random streams start fresh")
