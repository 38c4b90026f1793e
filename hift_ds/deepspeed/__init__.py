"""``hift_ds.initialize``: a DeepSpeed engine whose optimizer is a HiFTOptimizer."""
from hift_ds.deepspeed.engine import initialize, single_process_env

__all__ = ["initialize", "single_process_env"]
