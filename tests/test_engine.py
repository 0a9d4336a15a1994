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


def train(tmp: Path, np: int, mode: str, k: int, backend: str, reduction: str = "world", cases: str = "all",
          chunk: int | None = None) -> dict:
    out = tmp / f"{np}-{mode}-{k}-{backend}-{reduction}-{chunk}.pt"
    extra = [] if chunk is None else [str(chunk)]
    result = run_mpi(np, [PROGRAM, mode, str(k), backend, str(out), reduction, cases, *extra], timeout=300)
    assert result.returncode == 0, result.output
    return torch.load(out)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return train(tmp_path_factory.mktemp("p1"), 1, "sample", 0, "torch")


BASE = {"mlp-elbo", "mlp-predictive", "cnn-elbo", "cnn-predictive"}
CASES = BASE | {"mlp-flipout", "mlp-local", "cnn-flipout", "cnn-local", "cnn-shared-flip", "batchnorm", "gaussian",
                "adam-clip"}
TOLERANCE = 1e-10  # float64: per tensor and element, far below any effect of a wrong grid


def assert_same_state(got: dict, want: dict, where: str) -> None:
    """Every tensor of the final state (parameters, BatchNorm buffers) equal to float64
    rounding, element by element: a norm over all parameters would let the rho entries,
    which barely move, hide an error in the means."""
    assert got.keys() == want.keys(), where
    for name, w in want.items():
        g = got[name]
        if not w.is_floating_point():
            assert torch.equal(g, w), f"{where}: {name}"
            continue
        error = (g - w).abs().max().item()
        assert error <= TOLERANCE * max(1.0, w.abs().max().item()), f"{where}: {name} differs by {error:.2e}"


@pytest.mark.mpi
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("np, mode, k, reduction", [
    (2, "sample", 0, "world"), (2, "data", 0, "world"),
    (4, "sample", 0, "world"), (4, "data", 0, "world"), (4, "hybrid", 2, "world"),
    (4, "hybrid", 2, "hierarchical"),
])
def test_any_grid_equals_one_process(reference: dict, tmp_path: Path, backend: str, np: int, mode: str,
                                     k: int, reduction: str) -> None:
    """Horovod runs the base cases: the backends differ in the reduction, not in the estimators,
    likelihoods, optimizers or augmentation, which the torch backend runs in full."""
    cases = CASES if backend == "torch" else BASE
    params = train(tmp_path, np, mode, k, backend, reduction, "all" if backend == "torch" else "base")
    assert reference.keys() == CASES and params.keys() == cases
    data_groups = np // (k or (np if mode == "sample" else 1))
    for name, want in ((n, reference[n]) for n in sorted(cases)):
        moved = max((want["final"][n] - want["initial"][n]).abs().max().item() for n in want["final"]
                    if want["final"][n].is_floating_point())
        assert moved > 1e-3, f"{name}: 5 steps barely changed the state; the test would prove nothing"
        if name == "batchnorm" and data_groups > 1:
            assert params[name].keys() == {"refused"}, f"BatchNorm trained on {data_groups} data groups"
            assert f"D={data_groups} data groups, but the model has BatchNorm layers" in params[name]["refused"]
            continue
        assert_same_state(params[name]["final"], want["final"], f"{name} on {np} ranks ({mode}, {reduction})")


@pytest.mark.mpi
@pytest.mark.parametrize("np, chunk", [(1, 1), (2, 1), (1, 3)])
def test_sample_chunks_train_the_same_model(reference: dict, tmp_path: Path, np: int, chunk: int) -> None:
    """--sample_chunk bounds the weight copies alive at once (S=4 samples, here 1 or 3 at a time on
    1 rank, 1 of each rank's 2 on 2 ranks): the ELBO's update is the one of all samples at once;
    the predictive objective, not linear in the samples, and BatchNorm are refused."""
    params = train(tmp_path, np, "sample", 0, "torch", chunk=chunk)
    for name in sorted(CASES):
        if "predictive" in name:
            assert params[name] == {
                "refused": f"--sample_chunk {chunk} with --objective predictive: only the ELBO splits exactly "
                "over sample chunks; use --objective elbo or leave --sample_chunk unset"
            }
            continue
        if name == "batchnorm":
            assert "whose statistics would cover one chunk of samples" in params[name]["refused"]
            continue
        assert_same_state(params[name]["final"], reference[name]["final"], f"{name}, chunks of {chunk} on {np} ranks")
