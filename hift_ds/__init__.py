"""hift-ds: HiFT hierarchical full-parameter fine-tuning as a DeepSpeed optimizer wrapper."""
__version__ = "0.1.0"
