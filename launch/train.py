#!/usr/bin/env python
"""Fine-tune a Hugging Face model with HiFT (or plain DeepSpeed full fine-tuning) on JSONL data.

Run as ``deepspeed launch/train.py --deepspeed ds_configs/hift.json --model M --data D`` or as
``python launch/train.py ...`` (one process; the distributed environment is set up here).
With no --model/--data it fine-tunes an embedded job (see README): ``--task classification``
(MiniLM on BBC News, the default) or ``--task instruction`` (SmolLM2-135M-Instruct on the
chatterbot corpus). ``python launch/train.py --help`` lists the options.

The work is done by ``hift_ds.train`` (the options in ``cli.py``, the run in ``loop.py``); tests and
benchmarks call ``hift_ds.train.main(argv)`` directly. Bad input ends with ``error: ...`` on stderr
and exit status 2; a bug keeps its traceback.
"""
import sys

from hift_ds.train import run

if __name__ == "__main__":
    sys.exit(run())
