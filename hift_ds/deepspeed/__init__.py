"""``hift_ds.initialize``: a DeepSpeed engine whose optimizer is a HiFTOptimizer, built from a checked ``Plan``."""
from hift_ds.deepspeed.engine import initialize, single_process_env
from hift_ds.deepspeed.plan import Plan, build_plan

__all__ = ["initialize", "single_process_env", "Plan", "build_plan"]
