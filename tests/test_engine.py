"""The exactness property: any grid trains the same model as one process (MISSION.md, section 2)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from tests.mpi import run_mpi

HOROVOD = importlib.util.find_spec("horovod") is not None
BACKENDS = ["torch", pytest.param("horovod", marks=pytest.mark.skipif(
    not HOROVOD, reason="Horovod is not installed: run `make setup`"))]
PROGRAM = "tests/programs/engine_exactness.py"


def train(tmp: Path, np: int, mode: str, k: int, backend: str, reduction: str = "world") -> dict:
    out = tmp / f"{np}-{mode}-{k}-{backend}-{reduction}.pt"
    result = run_mpi(np, [PROGRAM, mode, str(k), backend, str(out), reduction], timeout=300)
    assert result.returncode == 0, result.output
    return torch.load(out)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return train(tmp_path_factory.mktemp("p1"), 1, "sample", 0, "torch")


@pytest.mark.mpi
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("np, mode, k, reduction", [
    (2, "sample", 0, "world"), (2, "data", 0, "world"),
    (4, "sample", 0, "world"), (4, "data", 0, "world"), (4, "hybrid", 2, "world"),
    (4, "hybrid", 2, "hierarchical"),
])
def test_any_grid_equals_one_process(reference: dict, tmp_path: Path, backend: str, np: int, mode: str,
                                     k: int, reduction: str) -> None:
    params = train(tmp_path, np, mode, k, backend, reduction)
    assert params.keys() == reference.keys() == {"mlp-elbo", "mlp-predictive", "cnn-elbo", "cnn-predictive"}
    for name, want in reference.items():
        moved = (want["final"] - want["initial"]).norm() / want["initial"].norm()
        assert moved > 1e-3, f"{name}: 5 steps barely changed the parameters; the test would prove nothing"
        error = (params[name]["final"] - want["final"]).norm() / want["final"].norm()
        assert error <= 1e-5, f"{name}: relative error {error:.2e} on {np} ranks ({mode}, {reduction})"
