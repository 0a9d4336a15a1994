"""hpcbnn: Bayesian neural networks on supercomputers with sampling parallelism.

    import hpcbnn as hb
    model = hb.bayesianize(torchvision.models.resnet18(num_classes=10))
    grid = hb.ProcessGrid("sample")                 # K = P ranks share each batch
    comm = hb.make_collectives(grid, "horovod")
    with hb.sampling(seed, step, grid.local_samples(S)):
        out = model(x.repeat(S // grid.sample_size, 1, 1, 1))

The package folders follow a training step: `data` -> `ppl` (random variables) -> `bnn`
(Bayesian layers, objectives) -> `parallel` (grid, reduction, engine) -> `optim` -> `run`,
with `uq` (metrics) and `mcmc` (distributed NUTS) beside them. Names are imported on first
use, so `import hpcbnn` starts neither MPI nor torchvision.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

__version__ = "0.1.0"

# Open MPI busy-polls while a rank waits inside MPI, and Horovod's background thread waits
# there every cycle, on the core the rank's compute thread is bound to: measured, that halved
# weak sample scaling (docs/performance.md). Yielding the core while idle is read at MPI_Init,
# which runs after this (the first mpi4py import); a value the user or launcher set wins.
os.environ.setdefault("OMPI_MCA_mpi_yield_when_idle", "1")

_EXPORTS = {
    "bayesianize": "hpcbnn.bnn.bayesianize",
    "sampling": "hpcbnn.bnn.noise",
    "kl_divergence": "hpcbnn.bnn.layers",
    "BayesianModule": "hpcbnn.bnn.layers",
    "BayesianLinear": "hpcbnn.bnn.layers",
    "BayesianConv1d": "hpcbnn.bnn.layers",
    "BayesianConv2d": "hpcbnn.bnn.layers",
    "BayesianMultiheadAttention": "hpcbnn.bnn.layers",
    "elbo_loss": "hpcbnn.bnn.objectives",
    "predictive_loss": "hpcbnn.bnn.objectives",
    "categorical_loglik": "hpcbnn.bnn.objectives",
    "gaussian_loglik": "hpcbnn.bnn.objectives",
    "ProcessGrid": "hpcbnn.parallel.grid",
    "make_collectives": "hpcbnn.parallel.collectives",
    "Engine": "hpcbnn.parallel.engine",
    "evaluate": "hpcbnn.parallel.evaluation",
    "evaluate_uncertainty": "hpcbnn.parallel.evaluation",
    "DrawsPredictor": "hpcbnn.parallel.evaluation",
    "make_optimizer": "hpcbnn.optim.optimizers",
    "make_schedule": "hpcbnn.optim.optimizers",
    "RandomVariable": "hpcbnn.ppl.random_variable",
    "tape": "hpcbnn.ppl.tracing",
    "condition": "hpcbnn.ppl.tracing",
    "log_joint": "hpcbnn.ppl.tracing",
    "NetworkTarget": "hpcbnn.mcmc.target",
    "UsageError": "hpcbnn.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hpcbnn' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
