"""hpcbnn: Bayesian neural networks on supercomputers with sampling parallelism."""

__version__ = "0.1.0"
