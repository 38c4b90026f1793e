"""The model launch/train.py trains: loaded from a Hugging Face name or folder, saved as ``final/`` at the end."""
from __future__ import annotations

import os

from hift_ds import atomic


def load_model(path: str, task: str, num_labels: int, zero3_config: dict | None = None):
    """Tokenizer and model from a HF name or directory, with clear errors for missing weights.

    With a ZeRO-3 ``zero3_config`` the model is built inside ``deepspeed.zero.Init`` and its weights
    loaded partition by partition (transformers does both while an ``HfDeepSpeedConfig`` is alive),
    so no rank ever holds the whole model.
    """
    import transformers

    check_model_path(path)
    if os.path.isdir(path) and not any(f.endswith((".safetensors", ".bin", ".pt")) for f in os.listdir(path)):
        raise ValueError(f"model directory {path!r} has no weights (*.safetensors or *.bin); point --model at a "
                         "saved model (save_pretrained output) or a hub name")
    if zero3_config is not None:
        from transformers.integrations import HfDeepSpeedConfig
        zero3 = HfDeepSpeedConfig(zero3_config)  # noqa: F841 (transformers holds it by weak reference)
    try:
        tok = transformers.AutoTokenizer.from_pretrained(path)
        if task == "classification":
            check_label_count(transformers.AutoConfig.from_pretrained(path), path, num_labels)
            model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
        else:
            model = transformers.AutoModelForCausalLM.from_pretrained(path)
    except OSError as e:
        raise ValueError(f"cannot load model {path!r}: {e}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    return tok, model


def check_model_path(path: str) -> None:
    """A --model that names a file, or a local path that does not exist, is refused before transformers sees it."""
    if os.path.isfile(path):
        raise ValueError(f"--model {path!r} is a file; pass the model's directory (a save_pretrained folder: "
                         "config.json and the weights) or a Hugging Face hub name")
    # A hub name is "name" or "org/name"; anything else that is not here is a local path that does not exist
    # (transformers would answer "Repo id must be in the form 'repo_name' or 'namespace/repo_name'").
    local = path.startswith(("/", ".", "~")) or path.count("/") > 1 or "\\" in path
    if local and not os.path.exists(path):
        raise ValueError(f"--model {path!r} does not exist; pass a model directory (a save_pretrained folder) or a "
                         "Hugging Face hub name")


def check_label_count(config, path: str, num_labels: int) -> None:
    """A saved sequence classifier whose head has another number of labels than the data cannot be fine-tuned on it."""
    heads = [a for a in getattr(config, "architectures", None) or [] if a.endswith("ForSequenceClassification")]
    if heads and config.num_labels != num_labels:
        names = list((getattr(config, "id2label", None) or {}).values())
        raise ValueError(f"--model {path} is a classifier with {config.num_labels} labels ({names}), the data has "
                         f"{num_labels}; pass data with its {config.num_labels} labels, or the model it was "
                         "fine-tuned from (which gets a new head for the data's labels)")


def save_final(model, tok, final: str, state_dict: dict | None = None) -> None:
    """``save_pretrained`` of model and tokenizer into ``final`` (``state_dict``: the whole weights under ZeRO-3)."""
    # Written under a temporary name, then swapped with an older final/ in one step (atomic.write_dir):
    # a kill at any point leaves the old model or the new one at final/, never none.
    atomic.write_dir(final, lambda tmp: (model.save_pretrained(tmp, state_dict=state_dict), tok.save_pretrained(tmp)),
                     replace=True)
