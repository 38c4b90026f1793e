"""hift-ds: HiFT hierarchical full-parameter fine-tuning as a DeepSpeed optimizer wrapper."""
__version__ = "0.1.0"

from hift_ds.config import HiFTConfig  # noqa: E402
from hift_ds.engine import initialize  # noqa: E402
from hift_ds.optimizer import HiFTOptimizer  # noqa: E402
from hift_ds.schedule import CycleLRScheduler, lr_cycle_scheduler  # noqa: E402

__all__ = ["initialize", "HiFTConfig", "HiFTOptimizer", "lr_cycle_scheduler", "CycleLRScheduler", "__version__"]
