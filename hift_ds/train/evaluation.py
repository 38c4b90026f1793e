"""Held-out metrics and sample generations for launch/train.py and the quality benchmarks."""
from __future__ import annotations

import math

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
