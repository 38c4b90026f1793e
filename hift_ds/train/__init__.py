"""What ``launch/train.py`` runs: the command line, the training loop, data, embedded jobs, evaluation, checkpoints.

``main(argv)`` trains and returns the metrics (bad input raises ValueError); ``run(argv)`` is the
command line around it (``error: ...`` and exit status 2). The modules, one job each:

- ``cli``: the options, the DeepSpeed config they override, the embedded job they default to, ``run()``;
- ``loop``: ``main()`` in stages: data and model, engine, resume, epochs, final evaluation and save;
- ``model``: the model loaded from a Hugging Face name or folder, and saved as ``final/``;
- ``data``, ``jobs`` (the embedded jobs), ``evaluation``, ``curve`` (the learning curve), ``checkpoints``,
  ``outputs`` (what --output-dir holds), ``badam`` (the BAdam baseline).
"""
from hift_ds.train.cli import batches_per_epoch, build_config, build_parser, parse_args, resolve_job, run
from hift_ds.train.loop import main
from hift_ds.train.model import load_model

__all__ = ["main", "run", "build_parser", "parse_args", "build_config", "batches_per_epoch", "resolve_job",
           "load_model"]
