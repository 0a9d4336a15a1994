"""Uncertainty metrics of a Bayesian predictive, written as additive sums so they reduce exactly."""
