"""hift-ds: HiFT hierarchical full-parameter fine-tuning as a DeepSpeed optimizer wrapper."""
__version__ = "0.1.0"

import importlib  # noqa: E402

from hift_ds.config import HiFTConfig  # noqa: E402
from hift_ds.deepspeed.engine import initialize  # noqa: E402
from hift_ds.optim.optimizer import HiFTOptimizer  # noqa: E402
from hift_ds.schedule import CycleLRScheduler, lr_cycle_scheduler  # noqa: E402

__all__ = ["initialize", "HiFTConfig", "HiFTOptimizer", "lr_cycle_scheduler", "CycleLRScheduler", "profile",
           "__version__"]
# Submodules reachable as attributes without an import of their own, loaded on first use so that
# `import hift_ds` does not load the profiler (and psutil) for a training script that never uses it.
_LAZY_SUBMODULES = ("profile",)


def __getattr__(name: str):
    """``hift_ds.profile`` after a plain ``import hift_ds``: imported on first access."""
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
