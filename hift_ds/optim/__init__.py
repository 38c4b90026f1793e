"""The HiFT optimizer: one group trained per step, its masters and state in a group store."""
from hift_ds.optim.optimizer import HiFTOptimizer

__all__ = ["HiFTOptimizer"]
