"""`import hpcbnn as hb` gives the names a user needs, and importing it starts nothing heavy."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import hpcbnn as hb

PUBLIC = {
    "bayesianize": "hpcbnn.bnn.bayesianize",
    "sampling": "hpcbnn.bnn.noise",
    "kl_divergence": "hpcbnn.bnn.layers",
    "elbo_loss": "hpcbnn.bnn.objectives",
    "predictive_loss": "hpcbnn.bnn.objectives",
    "ProcessGrid": "hpcbnn.parallel.grid",
    "make_collectives": "hpcbnn.parallel.collectives",
    "Engine": "hpcbnn.parallel.engine",
    "make_optimizer": "hpcbnn.optim.optimizers",
    "RandomVariable": "hpcbnn.ppl.random_variable",
    "tape": "hpcbnn.ppl.tracing",
    "condition": "hpcbnn.ppl.tracing",
    "log_joint": "hpcbnn.ppl.tracing",
    "BayesianModule": "hpcbnn.bnn.layers",
    "BayesianLinear": "hpcbnn.bnn.layers",
    "BayesianConv1d": "hpcbnn.bnn.layers",
    "BayesianConv2d": "hpcbnn.bnn.layers",
    "BayesianMultiheadAttention": "hpcbnn.bnn.layers",
}


@pytest.mark.parametrize("name", PUBLIC)
def test_exported_and_the_real_object(name: str) -> None:
    assert name in hb.__all__
    assert name in dir(hb)
    assert getattr(hb, name) is getattr(importlib.import_module(PUBLIC[name]), name)


def test_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'Bayesianize'"):
        hb.Bayesianize  # noqa: B018


def test_import_starts_neither_mpi_nor_torchvision() -> None:
    """A login node or a plotting script may import hpcbnn: it must not initialise MPI."""
    code = (
        "import sys, hpcbnn as hb\n"
        "print(sorted(m for m in ('mpi4py.MPI', 'torchvision', 'horovod') if m in sys.modules))\n"
        "hb.sampling, hb.BayesianLinear, hb.log_joint\n"
        "print(sorted(m for m in ('mpi4py.MPI', 'torchvision', 'horovod') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.splitlines() == ["[]", "[]"], out.stdout + out.stderr
