"""The learning curve of a run (--eval-every-epochs) and its clock.

The held-out sets are scored at the steps nearest each fraction of an epoch (``evaluation.curve_steps``)
into ``eval_log.jsonl``: step, epoch, the seconds spent training so far (evaluation excluded) and the
wall seconds since training started (evaluation included), and each set's scores. The clock runs on
across a resume: a checkpoint records both counts.
"""
from __future__ import annotations

import json
import os

from hift_ds.train.evaluation import TrainClock, curve_steps
from hift_ds.train.outputs import EVAL_LOG, trim_log


class LearningCurve:
    """When a run scores its held-out sets along training, where it writes the scores, and the clock that times it."""

    def __init__(self, output_dir: str, total_steps: int, epoch_batches: int, gas: int, every_epochs: float,
                 seconds: tuple[float, float] = (0.0, 0.0), main: bool = True):
        self.epoch_batches, self.gas, self.total_steps, self.main = epoch_batches, gas, total_steps, main
        self.steps = curve_steps(total_steps, epoch_batches / gas, every_epochs)
        self.path = os.path.join(output_dir, EVAL_LOG) if self.steps else None
        self.clock = TrainClock(*seconds)  # (training, evaluation) seconds of a resumed run so far

    def start(self, step: int, scores_before: dict) -> None:
        """A fresh curve from the untrained model's scores, or a resumed run's with the entries past ``step`` dropped."""
        if self.path is None or not self.main:
            return
        trim_log(self.path, step)
        if step == 0:
            self.record(0, scores_before)

    def due(self, step: int) -> bool:
        """Whether the held-out sets are scored after optimizer ``step`` (the last step's scores are the run's own)."""
        return step in self.steps and step < self.total_steps

    def record(self, step: int, scores: dict) -> None:
        """Append the scores after ``step`` (one dict per held-out set) with the clock's seconds."""
        if self.path is None or not self.main:
            return
        train_s, wall_s = self.clock.seconds()
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "epoch": step * self.gas / self.epoch_batches,
                                "train_seconds": train_s, "wall_seconds": wall_s, **scores}) + "\n")

    def checkpoint_state(self) -> dict:
        """What a checkpoint records for the clock to run on after a resume."""
        train_s, _ = self.clock.seconds()
        return {"train_seconds": train_s, "eval_seconds": self.clock.eval_seconds}
