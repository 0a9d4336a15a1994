"""The optimizer and its learning-rate schedule, built from the run's configuration."""

from hpcbnn.optim.optimizers import make_optimizer, make_schedule

__all__ = ["make_optimizer", "make_schedule"]
