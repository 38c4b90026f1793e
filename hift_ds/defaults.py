"""The embedded default model and data set for launch/train.py (filled in below)."""
def default_model() -> str:
    """Directory of the embedded default model."""
    raise ValueError("no --model given and no embedded default model is installed")


def default_data() -> str:
    """Path of the embedded default data set."""
    raise ValueError("no --data given and no embedded default data set is installed")
