"""Mixed precision for HiFT: dynamic loss scaling for fp16 (the optimizer owns it) and the model's cast."""
from __future__ import annotations

import torch
from torch import nn


class DynamicLossScaler:
    """fp16 loss scale with DeepSpeed's rules: hysteresis before halving, doubling after a clean window."""

    def __init__(self, init_scale: float = 2.0 ** 16, growth_interval: int = 1000, factor: float = 2.0,
                 min_scale: float = 1.0, hysteresis: int = 1, consecutive_hysteresis: bool = False,
                 dynamic: bool = True, raise_at_min_scale: bool = True):
        if init_scale <= 0 or factor <= 1.0 or growth_interval < 1 or hysteresis < 1:
            raise ValueError(f"invalid loss scaler settings: init_scale={init_scale}, factor={factor}, "
                             f"growth_interval={growth_interval}, hysteresis={hysteresis}")
        self.scale = float(init_scale)
        self.growth_interval = growth_interval
        self.factor = factor
        self.min_scale = min_scale
        self.hysteresis = hysteresis
        self.consecutive_hysteresis = consecutive_hysteresis
        self.dynamic = dynamic
        self.raise_at_min_scale = raise_at_min_scale
        # The same counters as DeepSpeed's DynamicLossScaler, so an fp16 config gives the same
        # sequence of scales (and skipped steps) as under DeepSpeed's own FP16 optimizer.
        self._iter = 0
        self._last_overflow = -1
        self._hysteresis_left = hysteresis

    @classmethod
    def from_ds_fp16(cls, fp16: dict) -> "DynamicLossScaler":
        """Scaler configured from a DeepSpeed ``"fp16"`` config block."""
        return cls(**loss_scaler_settings(fp16))

    def update(self, overflow: bool) -> None:
        """Account for one step that did (True) or did not overflow."""
        if not self.dynamic:
            return
        if overflow:
            if self.hysteresis == 1 or self._hysteresis_left == 1:
                if self.scale == self.min_scale and self.raise_at_min_scale:
                    # As DeepSpeed does: otherwise every later step is skipped and the run
                    # goes on without training.
                    raise FloatingPointError(
                        f"fp16 gradients still overflow at the minimum loss scale ({self.min_scale:g}); the run "
                        "has diverged or needs more range: lower the LR, enable gradient_clipping, use bf16, or "
                        "lower fp16.min_loss_scale")
                self.scale = max(self.scale / self.factor, self.min_scale)
            else:
                self._hysteresis_left -= 1
            self._last_overflow = self._iter
        else:
            if self.consecutive_hysteresis:
                self._hysteresis_left = self.hysteresis
            stable = self._iter - self._last_overflow - 1
            if stable > 0 and stable % self.growth_interval == 0:
                if not self.consecutive_hysteresis:
                    self._hysteresis_left = self.hysteresis
                self.scale *= self.factor
        self._iter += 1

    def state_dict(self) -> dict:
        """Scale and counters, for checkpoints."""
        return {"scale": self.scale, "iter": self._iter, "last_overflow": self._last_overflow,
                "hysteresis_left": self._hysteresis_left}

    def load_state_dict(self, state: dict) -> None:
        """Restore from ``state_dict``."""
        self.scale = state["scale"]
        if "iter" not in state:  # saved before the counters followed DeepSpeed's
            state = {"iter": state["clean_steps"], "last_overflow": -1, "hysteresis_left": state["overflows_left"]}
        self._iter = state["iter"]
        self._last_overflow = state["last_overflow"]
        self._hysteresis_left = state["hysteresis_left"]


def loss_scaler_settings(fp16: dict) -> dict:
    """``DynamicLossScaler`` keyword arguments of a DeepSpeed ``"fp16"`` block (DeepSpeed's defaults), checked."""
    static = float(fp16.get("loss_scale", 0) or 0)
    if static > 0:
        settings = dict(init_scale=static, dynamic=False)
    else:
        settings = dict(init_scale=2.0 ** fp16.get("initial_scale_power", 16),
                        growth_interval=fp16.get("loss_scale_window", 1000),
                        min_scale=fp16.get("min_loss_scale", 1.0), hysteresis=fp16.get("hysteresis", 2),
                        consecutive_hysteresis=bool(fp16.get("consecutive_hysteresis", False)))
    DynamicLossScaler(**settings)  # its constructor holds the rules: a bad block fails here, before anything is built
    return settings


def cast_parameters(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast the model's floating-point parameters to ``dtype``, leaving its buffers as they are.

    DeepSpeed (0.19) casts parameters only, so fp32 buffers such as the rotary ``inv_freq`` keep
    their precision; ``model.to(dtype)`` would round them to bf16 and shift every position's
    rotation (+0.01 nats of held-out loss on SmolLM2-135M). Every mode casts the same way.
    """
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
    return model
