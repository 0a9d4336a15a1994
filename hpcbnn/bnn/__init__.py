"""Bayesian networks: the sampling context, mean-field layers, `bayesianize`, objectives, models."""
