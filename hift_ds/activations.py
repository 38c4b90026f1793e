"""Activation checkpointing for a model HiFT trains: the training CLI, the profiler and the benchmarks share it."""
from __future__ import annotations

from torch import nn


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute activations in backward (Hugging Face gradient checkpointing); a clear error if unsupported."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(model).__name__} does not support gradient checkpointing; drop "
                         "--gradient-checkpointing")
    # Non-reentrant: the reentrant variant needs an input that requires grad at every checkpoint, and HiFT
    # freezes everything below the active group (the embeddings too, most of the time).
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name is deprecated there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False  # a KV cache is incompatible with recomputation in training
