"""Dynamic loss scaling for fp16 HiFT training (the optimizer owns mixed precision)."""
from __future__ import annotations


class DynamicLossScaler:
    """Loss scale that halves on overflow and doubles after ``growth_interval`` clean steps."""

    def __init__(self, init_scale: float = 2.0 ** 16, growth_interval: int = 1000, factor: float = 2.0,
                 min_scale: float = 1.0, hysteresis: int = 1, dynamic: bool = True):
        if init_scale <= 0 or factor <= 1.0 or growth_interval < 1 or hysteresis < 1:
            raise ValueError(f"invalid loss scaler settings: init_scale={init_scale}, factor={factor}, "
                             f"growth_interval={growth_interval}, hysteresis={hysteresis}")
        self.scale = float(init_scale)
        self.growth_interval = growth_interval
        self.factor = factor
        self.min_scale = min_scale
        self.hysteresis = hysteresis
        self.dynamic = dynamic
        self._clean_steps = 0
        self._overflows_left = hysteresis

    @classmethod
    def from_ds_fp16(cls, fp16: dict) -> "DynamicLossScaler":
        """Scaler configured from a DeepSpeed ``"fp16"`` config block."""
        static = float(fp16.get("loss_scale", 0) or 0)
        if static > 0:
            return cls(init_scale=static, dynamic=False)
        return cls(init_scale=2.0 ** fp16.get("initial_scale_power", 16),
                   growth_interval=fp16.get("loss_scale_window", 1000),
                   min_scale=fp16.get("min_loss_scale", 1.0), hysteresis=fp16.get("hysteresis", 2))

    def update(self, overflow: bool) -> None:
        """Account for one step that did (True) or did not overflow."""
        if not self.dynamic:
            return
        if overflow:
            self._clean_steps = 0
            self._overflows_left -= 1
            if self._overflows_left <= 0:
                self.scale = max(self.scale / self.factor, self.min_scale)
                self._overflows_left = self.hysteresis
            return
        self._clean_steps += 1
        if self._clean_steps % self.growth_interval == 0:
            self.scale *= self.factor
            self._overflows_left = self.hysteresis

    def state_dict(self) -> dict:
        """Scale and counters, for checkpoints."""
        return {"scale": self.scale, "clean_steps": self._clean_steps, "overflows_left": self._overflows_left}

    def load_state_dict(self, state: dict) -> None:
        """Restore from ``state_dict``."""
        self.scale = state["scale"]
        self._clean_steps = state["clean_steps"]
        self._overflows_left = state["overflows_left"]
