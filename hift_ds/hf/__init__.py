"""HiFT in the Hugging Face Trainer and TRL's SFTTrainer: ``Trainer(...)`` becomes ``HiFTTrainer(..., hift={...})``."""
from hift_ds.hf.schedule import TrainerCycleLRScheduler
from hift_ds.hf.trainer import HiFTTrainerMixin, with_hift

__all__ = ["HiFTTrainerMixin", "HiFTTrainer", "HiFTSFTTrainer", "with_hift", "TrainerCycleLRScheduler"]


def __getattr__(name: str) -> type:
    """``HiFTTrainer`` / ``HiFTSFTTrainer``, built on first use (this package imports neither transformers nor trl)."""
    from hift_ds.hf import trainer

    if name in ("HiFTTrainer", "HiFTSFTTrainer"):
        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
