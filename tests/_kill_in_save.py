"""launch/train.py's command line, SIGKILLed in the middle of one checkpoint save (tests/test_train.py).

    python tests/_kill_in_save.py STEP [launch/train.py options ...]

The process dies right after DeepSpeed has written the checkpoint of optimizer step STEP and before
hift_ds.train moves the ``latest`` pointer to it: a resumed run must then start from the previous
checkpoint. The kill is put in here, around DeepSpeed's writer, so the product code holds no test hook.
"""
from __future__ import annotations

import os
import signal
import sys


def kill_after_deepspeed_save(step: int) -> None:
    """Make DeepSpeed's ``save_checkpoint`` SIGKILL this process once it has written tag ``step{step}``."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    write = DeepSpeedEngine.save_checkpoint

    def write_then_die(self, save_dir, *args, **kwargs):
        result = write(self, save_dir, *args, **kwargs)
        if kwargs.get("tag", args[0] if args else None) == f"step{step}":
            os.kill(os.getpid(), signal.SIGKILL)  # the checkpoint's files are complete, the pointer not moved
        return result

    DeepSpeedEngine.save_checkpoint = write_then_die


if __name__ == "__main__":
    from hift_ds.train import run

    kill_after_deepspeed_save(int(sys.argv[1]))
    sys.exit(run(sys.argv[2:]))
