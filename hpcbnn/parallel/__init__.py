"""The process grid, its collectives, and the training step and predictive evaluated on it."""
