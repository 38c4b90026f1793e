"""Non-finite losses and weights in launch/train.py: never a step on a non-finite loss, never a saved model
with non-finite weights.

- A micro-batch whose loss is inf or nan (on any rank) is skipped before its backward: no gradient, no
  update, no step of the LR schedule or of HiFT's group order. This holds for every precision; with fp16,
  the loss scaler still skips the steps whose gradients overflow, as before.
- After ``limit`` such micro-batches in a row (``--max-nonfinite-batches``, 10 by default: a few bad batches
  are ridden out, a diverged run stops within seconds) the run stops with ``NonFiniteError`` (exit status 1),
  saying whether the weights are still finite.
- Before each checkpoint and before final/ the weights are checked: non-finite weights (from a non-finite
  gradient behind a finite loss) stop the run before anything is written, so ``latest`` and final/ keep
  pointing at the last good model.

Each check is one device-to-host read per micro-batch (the loss) or per save (the weights); every rank
takes the same decision (the flags are reduced across ranks).
"""
from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)
DEFAULT_LIMIT = 10


class NonFiniteError(FloatingPointError):
    """Training produced non-finite values and stopped without saving them (launch/train.py: exit status 1)."""


def _all_ranks_max(value: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value


def nonfinite_parameters(module: nn.Module) -> list[str]:
    """Names of the parameters holding an inf or nan on any rank (the local partition under ZeRO-3)."""
    named = list(module.named_parameters())
    if not named:
        return []
    # One flag per parameter and a single device-to-host read, not one per parameter.
    flags = _all_ranks_max(torch.stack([~torch.isfinite(getattr(p, "ds_tensor", p).detach()).all()
                                        for _, p in named]).float())
    return [name for (name, _), bad in zip(named, flags.tolist()) if bad]


def _listed(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


class NonFiniteGuard:
    """Skips micro-batches whose loss is not finite, and stops the run after ``limit`` of them in a row."""

    def __init__(self, limit: int = DEFAULT_LIMIT):
        if limit < 1:
            raise ValueError(f"--max-nonfinite-batches must be >= 1, got {limit}")
        self.limit, self.in_a_row, self.skipped = limit, 0, 0

    def finite(self, loss: torch.Tensor, step: int, module: nn.Module) -> bool:
        """Whether to train on this micro-batch of optimizer step ``step + 1``; raises NonFiniteError at the limit."""
        bad = _all_ranks_max((~torch.isfinite(loss.detach()).all()).float().reshape(1))
        if not bool(bad.item()):  # the one device-to-host read of the check
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        self.skipped += 1
        log.warning("optimizer step %d: the loss is %s; micro-batch skipped (no backward, no update; %d in a row, "
                    "the run stops at %d)", step + 1, float(loss.detach()), self.in_a_row, self.limit)
        if self.in_a_row >= self.limit:
            names = nonfinite_parameters(module)
            if names:
                raise NonFiniteError(
                    f"the weights hold non-finite values ({_listed(names)}), so every loss is too: stopped at "
                    f"optimizer step {step + 1} without writing a checkpoint or final/ (those on disk are the last "
                    "good ones); --resume from the last checkpoint with a lower --lr or with gradient clipping "
                    "(\"gradient_clipping\" in the DeepSpeed config)")
            raise NonFiniteError(
                f"the loss was not finite for {self.in_a_row} micro-batches in a row at optimizer step {step + 1} "
                "(each was skipped; the weights are still finite): stopped without writing a checkpoint or final/; "
                "check the data and --max-length, lower --lr, or raise --max-nonfinite-batches")
        return False

    @staticmethod
    def check_weights(module: nn.Module, step: int, what: str) -> None:
        """Raise NonFiniteError instead of saving ``what`` from weights that are not finite after step ``step``."""
        names = nonfinite_parameters(module)
        if names:
            raise NonFiniteError(
                f"the weights hold non-finite values after optimizer step {step} ({_listed(names)}) although its "
                f"loss was finite (a non-finite gradient): {what} not written, the checkpoints and final/ on disk "
                "are the last good ones; --resume from the last checkpoint with a lower --lr or with gradient "
                "clipping (\"gradient_clipping\" in the DeepSpeed config)")
