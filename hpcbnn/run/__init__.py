"""A training run: configuration, run directory, checkpoints, signals, progress, the two commands."""
