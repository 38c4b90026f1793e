"""Memory profiler: ``MemoryProfiler`` and ``SavedTensorMeter`` (library), ``python -m hift_ds.profile`` (CLI)."""
from hift_ds.profile.cli import build_parser, main
from hift_ds.profile.memory import MemoryProfiler, SavedTensorMeter, plot_timelines

__all__ = ["MemoryProfiler", "SavedTensorMeter", "plot_timelines", "build_parser", "main"]
