"""The examples run as the README shows them: under mpirun, to a falling loss."""

from __future__ import annotations

import importlib.util
import re

import pytest

from tests.mpi import run_mpi

HOROVOD = importlib.util.find_spec("horovod") is not None
BACKENDS = ["torch", pytest.param("horovod", marks=pytest.mark.skipif(
    not HOROVOD, reason="Horovod is not installed: run `make setup`"))]


@pytest.mark.mpi
@pytest.mark.parametrize("backend", BACKENDS)
def test_sample_parallel_example_learns(backend: str) -> None:
    result = run_mpi(2, ["examples/sample_parallel.py", "--steps", "30", "--backend", backend], timeout=120)
    assert result.returncode == 0, result.output[-3000:]
    steps = [int(s) for s in re.findall(r"^step +(\d+) ", result.stdout, re.M)]
    nll = [float(v) for v in re.findall(r"expected NLL ([\d.]+)", result.stdout)]
    assert steps == [0, 20, 29], result.output[-3000:]  # rank 0 alone logs
    assert nll[-1] < 0.8 * nll[0], f"the expected NLL did not fall: {nll}"
    assert "warn" not in result.output.lower(), result.output[-3000:]
