"""JSONL data for launch/train.py: classification (text/label) and instruction (instruction/input/output)."""
from __future__ import annotations

import gzip
import json
import logging
import os
import random
import zlib
from dataclasses import dataclass

import torch

CLASSIFICATION, INSTRUCTION = "classification", "instruction"
log = logging.getLogger(__name__)


def read_jsonl(path: str) -> list[dict]:
    """Records of a JSONL file, gzip-compressed or not (told by its first bytes); errors name the file and the line."""
    if os.path.isdir(path):
        raise ValueError(f"data path {path!r} is a directory; pass the .jsonl file in it (or a .jsonl.gz)")
    if not os.path.isfile(path):
        raise ValueError(f"data file {path!r} does not exist; pass --data <path to a .jsonl file>")
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    records, lineno = [], 0
    try:
        with (gzip.open(path, "rt", encoding="utf-8") if gzipped else open(path, encoding="utf-8")) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: malformed JSON line ({e.msg}); each line must be one JSON "
                                     "object") from None
                if not isinstance(rec, dict):
                    raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
                records.append(rec)
    except UnicodeDecodeError:
        raise ValueError(f"{path}:{lineno + 1}: not UTF-8 text; the data must be JSONL in UTF-8, plain or "
                         "gzip-compressed (.jsonl.gz)") from None
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise ValueError(f"{path}: a damaged gzip file ({e}); compress the JSONL again, or pass it uncompressed") \
            from None
    if not records:
        raise ValueError(f"data file {path!r} has no records")
    return records


def detect_task(records: list[dict], path: str = "data") -> str:
    """"classification" for text/label records, "instruction" for instruction/output records."""
    first = records[0]
    if "text" in first and "label" in first:
        task, keys = CLASSIFICATION, ("text", "label")
    elif "instruction" in first:  # a first record without "output" is reported below, by number
        task, keys = INSTRUCTION, ("instruction", "output")
    else:
        raise ValueError(f"{path}: cannot tell the task from keys {sorted(first)}; use text/label records "
                         "(classification) or instruction/input/output records (instruction tuning)")
    for i, rec in enumerate(records, 1):
        missing = [k for k in keys if k not in rec]
        if missing:
            raise ValueError(f"{path}: record {i} lacks {missing} (every record needs {list(keys)})")
        if task == INSTRUCTION:
            # str() of a null or a list would train on the text "None" or "['a']" without a word.
            bad = [k for k in ("instruction", "input", "output") if k in rec and not isinstance(rec[k], str)]
            if bad or not rec["output"].strip():
                what = f"{bad[0]!r} is {type(rec[bad[0]]).__name__}, not a string" if bad else "'output' is empty"
                raise ValueError(f"{path}: record {i}: {what}; instruction, input and output must be text "
                                 "(input may be left out)")
    return task


def split(records: list[dict], eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """A seeded train/eval split holding out ``eval_fraction`` of the records."""
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval fraction must be between 0 and 1, got {eval_fraction}")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, int(round(len(records) * eval_fraction)))
    return [records[i] for i in order[n_eval:]], [records[i] for i in order[:n_eval]]


def label_set(train: list[dict], path: str = "data") -> list:
    """Sorted distinct labels of the training records; a classifier needs two at least."""
    labels = sorted({r["label"] for r in train}, key=lambda v: (str(type(v)), v))
    if len(labels) < 2:
        raise ValueError(f"{path}: every training record has the label {labels[0]!r}: a classifier needs two labels "
                         "at least; add records of the other classes")
    return labels


def usable_classification(records: list[dict], path: str = "data") -> list[dict]:
    """The text/label records whose text is a string and whose label a string or number; one warning counts the rest."""
    def usable(r: dict) -> bool:
        return isinstance(r["text"], str) and isinstance(r["label"], (str, int, float)) and r["label"] == r["label"]

    kept = [r for r in records if usable(r)]
    if len(kept) < len(records):
        first = next(i for i, r in enumerate(records, 1) if not usable(r))
        bad = records[first - 1]
        what = ("text" if not isinstance(bad["text"], str) else "label")
        if not kept:
            raise ValueError(f"{path}: no record has a text string and a label (string or number); record {first}'s "
                             f"{what} is {bad[what]!r}")
        log.warning("%s: skipped %d of %d records whose text is not a string or whose label is not a string or "
                    "number (the first: record %d, %s %r)", path, len(records) - len(kept), len(records), first, what,
                    bad[what])
    return kept


@dataclass
class Encoded(torch.utils.data.Dataset):
    """Tokenized examples as padded tensors: input_ids, attention_mask, labels."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[i], "attention_mask": self.attention_mask[i], "labels": self.labels[i]}

    @property
    def num_tokens(self) -> int:
        """Non-padding tokens in the dataset."""
        return int(self.attention_mask.sum())


def check_max_length(max_length: int, tokenizer, model_config) -> None:
    """Reject a sequence length beyond what the model's position embeddings cover."""
    limit = getattr(model_config, "max_position_embeddings", None) or getattr(model_config, "n_positions", None)
    if limit is not None and getattr(model_config, "model_type", "") in ("roberta", "xlm-roberta"):
        limit -= 2  # RoBERTa's position ids start after the padding index
    if limit is not None and max_length > limit:
        raise ValueError(f"--max-length {max_length} exceeds the model's maximum sequence length {limit}; "
                         f"use --max-length {limit} or less")


def encode_classification(records: list[dict], tokenizer, labels: list, max_length: int, path: str) -> Encoded:
    """Tokenize text/label records; a label outside ``labels`` is an error naming it."""
    index = {lab: i for i, lab in enumerate(labels)}
    bad = [(i, r["label"]) for i, r in enumerate(records, 1) if r["label"] not in index]
    if bad:
        raise ValueError(f"{path}: record {bad[0][0]} has label {bad[0][1]!r} outside the label set {labels} "
                         f"({len(bad)} such records)")
    enc = tokenizer([r["text"] for r in records], truncation=True, max_length=max_length,
                    padding="max_length", return_tensors="pt")
    return Encoded(enc["input_ids"], enc["attention_mask"], torch.tensor([index[r["label"]] for r in records]))


PROMPT_FORMATS = ("auto", "chat", "plain")


def uses_chat_template(tokenizer, prompt_format: str = "auto") -> bool:
    """Whether prompts go through the tokenizer's chat template ("auto": when it has one)."""
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"prompt format {prompt_format!r} is not one of {PROMPT_FORMATS}")
    has = bool(getattr(tokenizer, "chat_template", None))
    if prompt_format == "chat" and not has:
        raise ValueError("--prompt-format chat: the tokenizer has no chat template; use --prompt-format plain")
    return has if prompt_format == "auto" else prompt_format == "chat"


def prompt_ids(record: dict, tokenizer, chat: bool) -> list[int]:
    """Token ids of a record's prompt: a user turn plus the assistant header (chat), or the plain text + blank line."""
    text = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
    if chat:
        # The template holds every special token itself (BOS, role markers): none added on top.
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                 add_generation_prompt=True)
        return tokenizer(rendered, add_special_tokens=False)["input_ids"]
    return tokenizer(text + "\n\n", add_special_tokens=True)["input_ids"]


def encode_instruction(records: list[dict], tokenizer, max_length: int, path: str = "data",
                       prompt_format: str = "auto") -> Encoded:
    """Tokenize instruction records (dropping any whose prompt fills max_length); prompt and padding get label -100.

    Prompts use the tokenizer's chat template when it has one (``prompt_format="auto"``), so an
    instruction-tuned model is trained in the format it was tuned and is prompted in.
    """
    chat = uses_chat_template(tokenizer, prompt_format)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids, masks, labels = [], [], []
    dropped = truncated = 0
    for r in records:
        p = prompt_ids(r, tokenizer, chat)
        if len(p) >= max_length:
            # Truncation would leave no output token: every label -100, nothing to learn (and a
            # batch of only such records has a NaN loss).
            dropped += 1
            continue
        o = tokenizer(r["output"], add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            o = o + [tokenizer.eos_token_id]
        truncated += len(p) + len(o) > max_length
        seq = (p + o)[:max_length]
        lab = ([-100] * len(p) + o)[:max_length]
        n = len(seq)
        ids.append(seq + [pad] * (max_length - n))
        masks.append([1] * n + [0] * (max_length - n))
        labels.append(lab + [-100] * (max_length - n))
    if records and dropped == len(records):
        raise ValueError(f"{path}: every record's prompt (instruction + input) is {max_length} tokens or longer, "
                         f"so no output token fits; raise --max-length (now {max_length})")
    if dropped:
        log.warning("%s: dropped %d of %d records whose prompt is %d tokens or longer (no output token fits); "
                    "raise --max-length to keep them", path, dropped, len(records), max_length)
    if truncated:
        log.warning("%s: truncated the output of %d of %d records to fit %d tokens (their end-of-sequence "
                    "token is cut off too); raise --max-length to keep them whole", path, truncated,
                    len(records), max_length)
    return Encoded(torch.tensor(ids), torch.tensor(masks), torch.tensor(labels))
