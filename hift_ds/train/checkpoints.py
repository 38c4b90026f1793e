"""Resumable training checkpoints for launch/train.py: DeepSpeed checkpoints whose ``latest`` pointer
moves atomically once a checkpoint is complete, and the RNG state a resumed run restores."""
from __future__ import annotations

import glob
import logging
import os

from hift_ds import atomic
from hift_ds.distributed import is_main_process

log = logging.getLogger(__name__)


def save_checkpoint(engine, ckpt_dir: str, step: int, client_state: dict) -> None:
    """DeepSpeed checkpoint of this step; the ``latest`` pointer moves only once it is complete."""
    import torch.distributed as dist

    tag = f"step{step}"
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state=client_state, save_latest=False)
    if dist.is_initialized():
        dist.barrier()
    if is_main_process():
        atomic.write_text(os.path.join(ckpt_dir, "latest"), tag)


def latest_tag(ckpt_dir: str) -> str | None:
    """The checkpoint tag ``latest`` in ``ckpt_dir`` points to (None: no checkpoint yet), checked to exist."""
    latest = os.path.join(ckpt_dir, "latest")
    if not os.path.isfile(latest):
        return None
    with open(latest) as f:
        tag = f.read().strip()
    # DeepSpeed would fail on a missing or emptied tag directory with a bare AssertionError.
    path = os.path.join(ckpt_dir, tag)
    if not tag or not glob.glob(os.path.join(glob.escape(path), "*model_states.pt")):
        found = sorted(d for d in os.listdir(ckpt_dir) if os.path.isdir(os.path.join(ckpt_dir, d)))
        raise ValueError(f"--resume: {latest} points to checkpoint {tag!r}, but {path} "
                         f"{'holds no model states' if os.path.isdir(path) else 'does not exist'}; checkpoints in "
                         f"{ckpt_dir}: {found or 'none'}; write an existing tag into {latest}, or delete it to "
                         "start fresh")
    return tag


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
