"""What ``launch/train.py`` runs: the command line, the training loop, data, embedded jobs, evaluation, checkpoints."""
