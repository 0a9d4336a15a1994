"""The process grid: shapes, communicator membership, collectives, and the bad-grid error."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from hpcbnn.errors import EXIT_USAGE, UsageError
from hpcbnn.parallel.grid import GridShape, resolve_shape
from tests.mpi import run_mpi

HOROVOD = importlib.util.find_spec("horovod") is not None
BACKENDS = ["torch", pytest.param("horovod", marks=pytest.mark.skipif(
    not HOROVOD, reason="Horovod is not installed: run `make setup`"))]


@pytest.mark.parametrize("mode, p, per_node, k, expected", [
    ("sample", 4, 4, None, GridShape(data=1, sample=4)),
    ("data", 4, 4, None, GridShape(data=4, sample=1)),
    ("hybrid", 8, 4, None, GridShape(data=2, sample=4)),
    ("hybrid", 4, 4, 2, GridShape(data=2, sample=2)),
    ("sample", 1, 1, None, GridShape(data=1, sample=1)),
])
def test_shapes(mode: str, p: int, per_node: int, k: int | None, expected: GridShape) -> None:
    assert resolve_shape(mode, p, per_node, k) == expected


def test_impossible_hybrid_names_the_numbers() -> None:
    with pytest.raises(UsageError, match=r"6 ranks.*K=4"):
        resolve_shape("hybrid", 6, 6, 4)
    with pytest.raises(UsageError, match="unknown mode 'model'"):
        resolve_shape("model", 2, 2)


def expected_rank(rank: int, p: int, k: int) -> dict:
    """What rank `rank` of a D x K grid must report, computed by hand from rank = d*K + s."""
    d, s = divmod(rank, k)
    sample = [d * k + j for j in range(k)]
    data = [j * k + s for j in range(p // k)]

    def sums(group: list[int] | range) -> list:
        return [[float(sum(group)), float(len(group))], [float(sum(g * g for g in group))] * 3]

    weights = list(range(1, 2 * k + 1))
    return {"data_rank": d, "sample_rank": s, "K": k, "D": p // k, "local_rank": rank,
            "sample_members": sample, "data_members": data,
            "sums": {"sample": sums(sample), "data": sums(data), "world": sums(range(p))},
            "mean": (p - 1) / 2, "broadcast": [float(p - 1 + 10)] * 2,
            "gathered": [[float(g), 2.0 * g] for g in sample],
            # d/dx of sum(gathered * weights), summed over the K ranks that each computed it.
            "gather_grad": [[float(k * weights[2 * s]), float(k * weights[2 * s + 1])]]}


@pytest.mark.mpi
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p, mode, k, expected_k", [
    (1, "sample", 0, 1), (2, "sample", 0, 2), (2, "data", 0, 1), (2, "hybrid", 1, 1),
    (4, "sample", 0, 4), (4, "data", 0, 1), (4, "hybrid", 2, 2), (4, "hybrid", 0, 4),
])
def test_grid_and_collectives(backend: str, p: int, mode: str, k: int, expected_k: int) -> None:
    result = run_mpi(p, ["tests/programs/grid_collectives.py", mode, backend, str(k)])
    assert result.returncode == 0, result.output
    ranks = json.loads(result.stdout.splitlines()[-1])
    assert [r["rank"] for r in ranks] == list(range(p))
    for r in ranks:
        want = expected_rank(r["rank"], p, expected_k)
        assert {key: r[key] for key in want} == want
        assert r["device"] == "cpu"


@pytest.mark.mpi
@pytest.mark.parametrize("args, message", [
    (["hybrid", "3", "4", "4"], "4 ranks are not divisible into sample groups of K=3"),
    (["sample", "0", "6", "8"], "--samples 6 is not divisible by the K=4"),
    (["data", "0", "8", "6"], "--batch_size 6 is not divisible by the D=4"),
])
def test_bad_grid_fails_fast_on_every_rank(args: list[str], message: str) -> None:
    result = run_mpi(4, ["tests/programs/grid_check.py", *args], timeout=60)
    assert result.returncode == EXIT_USAGE, result.output
    assert result.stderr.count(message) == 1, result.output  # one line, from rank 0 only
    assert "grid ok" not in result.stdout


@pytest.mark.mpi
def test_good_grid_passes() -> None:
    result = run_mpi(4, ["tests/programs/grid_check.py", "hybrid", "2", "8", "8"], timeout=60)
    assert result.returncode == 0, result.output
    assert result.stdout.count("grid ok") == 4


@pytest.mark.parametrize("preset, expected", [(None, "1"), ("0", "0")])
def test_importing_hpcbnn_makes_idle_mpi_ranks_yield_unless_told_otherwise(preset: str | None, expected: str) -> None:
    """Open MPI reads it at MPI_Init: without it, Horovod's background thread busy-polls the compute core."""
    env = {k: v for k, v in os.environ.items() if k != "OMPI_MCA_mpi_yield_when_idle"}
    if preset is not None:
        env["OMPI_MCA_mpi_yield_when_idle"] = preset
    code = "import os, hpcbnn; print(os.environ['OMPI_MCA_mpi_yield_when_idle'])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert done.stdout.strip() == expected, done.stderr
