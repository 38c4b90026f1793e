"""Held-out metrics and sample generations for launch/train.py and the quality benchmarks."""
from __future__ import annotations

import contextlib
import math
import time

import torch
from torch import nn

from hift_ds.train.data import prompt_ids


def evaluate(model: nn.Module, loader, task: str) -> dict:
    """Held-out loss; for classification accuracy, for instruction tuning perplexity (per output token)."""
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    total_loss, n_batches, correct, seen, tokens = 0.0, 0, 0, 0, 0
    with torch.no_grad():
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            out = model(**batch)
            if task == "classification":
                total_loss += float(out.loss)
                n_batches += 1
                correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
                seen += len(batch["labels"])
            else:
                # The model's loss is the mean over this batch's output tokens: weight it by their
                # count, so the figure is the mean NLL per held-out token and exp() of it the perplexity.
                n = int((batch["labels"][:, 1:] != -100).sum())
                total_loss += float(out.loss) * n
                tokens += n
    model.train(was_training)
    if task == "classification":
        return {"eval_loss": total_loss / max(1, n_batches), "accuracy": correct / max(1, seen)}
    loss = total_loss / max(1, tokens)
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def evaluate_sets(model: nn.Module, loaders: dict, task: str) -> dict[str, dict]:
    """``evaluate`` on each named held-out loader ({"eval": ..., "test": ...}), in order."""
    return {name: evaluate(model, loader, task) for name, loader in loaders.items()}


def curve_steps(total_steps: int, steps_per_epoch: float, every_epochs: float) -> list[int]:
    """Optimizer steps after which a learning curve is evaluated: the step nearest each multiple of
    ``every_epochs`` epochs, and the last step (always), in order, each once; none for ``every_epochs`` 0."""
    if every_epochs <= 0:
        return []
    steps, j = {total_steps}, 1
    while (step := int(math.floor(j * every_epochs * steps_per_epoch + 0.5))) < total_steps:
        if step > 0:  # a fraction too small for one step: step 0 is the untrained model, evaluated anyway
            steps.add(step)
        j += 1
    return sorted(steps)


# A causal LM that guesses uniformly over its vocabulary scores perplexity = vocabulary size; a
# pretrained one scores far below. Half the vocabulary is still a hopeless score for any trained LM.
UNIFORM_SHARE = 0.5


def load_failure(scores: dict, vocab_size: int | None) -> str | None:
    """Why held-out scores of a *pretrained* causal LM say its weights did not load, or None if they look trained.

    ``scores``: one ``evaluate`` result. A non-finite loss fails; so does a perplexity at or above
    half of ``vocab_size`` (random or zeroed weights score about the vocabulary size, or far above).
    """
    loss = scores.get("eval_loss")
    if loss is None or not math.isfinite(loss):
        return f"its held-out loss is {loss} (not finite)"
    ppl = scores.get("perplexity")
    if ppl is not None and vocab_size and ppl >= UNIFORM_SHARE * vocab_size:
        return (f"its held-out perplexity is {ppl:.6g}, at or above {UNIFORM_SHARE:g} x its vocabulary size "
                f"{vocab_size} (a uniform guess scores {vocab_size})")
    return None


class TrainClock:
    """Seconds since training started: all of them (wall) and those not spent evaluating (training).

    Built with the seconds of a resumed run so far; counts from ``start()``."""

    def __init__(self, train_seconds: float = 0.0, eval_seconds: float = 0.0):
        self._offset, self.eval_seconds, self._t0 = train_seconds + eval_seconds, eval_seconds, None

    def start(self) -> None:
        """Start counting (the seconds before stay those given at construction)."""
        self._t0 = time.time()

    def seconds(self) -> tuple[float, float]:
        """(training seconds, wall seconds) so far; 0 before start()."""
        wall = self._offset + (time.time() - self._t0 if self._t0 is not None else 0.0)
        return max(0.0, wall - self.eval_seconds), wall

    @contextlib.contextmanager
    def paused(self):
        """Time spent inside counts as evaluation, not training."""
        t = time.time()
        try:
            yield
        finally:
            self.eval_seconds += time.time() - t


def generate_samples(model, tokenizer, records: list[dict], chat: bool, max_new_tokens: int = 48,
                     synced_gpus: bool = False) -> list[dict]:
    """Greedy completions of the records' prompts (prompt, reference output, model output).

    ``synced_gpus``: every rank runs a forward until all ranks are done, as a ZeRO-3-partitioned model
    needs (each forward gathers the weights from every rank: a rank that stopped early hangs the rest)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for r in records:
            ids = torch.tensor([prompt_ids(r, tokenizer, chat)], device=device)
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id, synced_gpus=synced_gpus)
            text = tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip()
            out.append({"prompt": r["instruction"], "reference": r["output"], "generated": text})
    model.train(was_training)
    return out
