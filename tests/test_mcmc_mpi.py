"""`python -m hpcbnn.mcmc` under real mpirun: the same draws on 1 and 2 ranks, clear errors.

Chains split over ranks, or the likelihood split over data shards, must not change a
chain's draws. They agree to float64 rounding, not bit for bit: the split sum of the
log density (Allreduce of the shards) and matrix products over a different number of
chains add in another order; the differences stay around 1e-10 here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hpcbnn.mcmc.results import load
from tests.mpi import ROOT, run_mpi

pytestmark = pytest.mark.mpi

LINEAR = ["-m", "hpcbnn.mcmc", "--model", "linear", "--rows", "400", "--chains", "4",
          "--warmup", "40", "--draws", "30", "--plots", "false"]


def run(np_: int, args: list[str], out: Path, timeout: float = 180):
    result = run_mpi(np_, args + ["--out", str(out)], timeout=timeout)
    assert result.returncode == 0, result.output
    return result


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory) -> tuple[np.ndarray, dict]:
    out = tmp_path_factory.mktemp("p1")
    result = run(1, LINEAR, out)
    assert "r_hat" in result.stdout and (out / "summary.txt").is_file()
    draws, names, stats = load(out / "draws.h5")
    assert draws.shape == (4, 30, 5) and names == [f"w[{i}]" for i in range(5)]
    return draws, stats


@pytest.mark.parametrize("mode", ["sample", "data"])
def test_two_ranks_give_the_draws_of_one(mode: str, one_rank, tmp_path) -> None:
    run(2, LINEAR + ["--mode", mode], tmp_path)
    draws, _, stats = load(tmp_path / "draws.h5")
    np.testing.assert_allclose(draws, one_rank[0], rtol=0, atol=1e-8)
    np.testing.assert_array_equal(stats["tree_depth"], one_rank[1]["tree_depth"])


def test_covertype_on_a_hybrid_grid(tmp_path) -> None:
    """2 x 2 grid: two chains per sample group, each summing two data shards; plots written."""
    result = run(4, ["-m", "hpcbnn.mcmc", "--model", "covertype", "--rows", "2000", "--chains", "4",
                     "--warmup", "10", "--draws", "10", "--max_depth", "4", "--mode", "hybrid",
                     "--sample_group", "2"], tmp_path, timeout=300)
    assert "D 2 data groups x K 2" in result.stdout
    draws, names, stats = load(tmp_path / "draws.h5")
    assert draws.shape == (4, 10, 55) and names[-1] == "w[54]"
    assert np.isfinite(draws).all() and stats["tree_depth"].max() <= 4
    assert {p.name for p in tmp_path.iterdir()} >= {"draws.h5", "summary.txt", "trace.png", "rank.png"}


@pytest.mark.parametrize("args, message", [
    (["--chains", "3"], "--chains 3 is not divisible by the K=2 ranks"),
    (["--model", "eight_schools", "--mode", "data"], "no data rows to split over D=2"),
])
def test_usage_errors_stop_every_rank_with_one_line(args: list[str], message: str, tmp_path) -> None:
    result = run_mpi(2, ["-m", "hpcbnn.mcmc", *args, "--out", str(tmp_path)], timeout=120)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if "hpcbnn.mcmc: error" in line]
    assert len(lines) == 1 and message in lines[0], result.output


def test_benchmark_smoke_prints_the_tables_and_one_json_line() -> None:
    """`python -m benchmarks.mcmc --smoke`: 1 and 8 chains, NumPyro when installed, and the
    data split timed under mpirun on 1 and 2 ranks (no durations asserted)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "benchmarks.mcmc", "--smoke"], capture_output=True,
                          text=True, timeout=600, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "| chains | hpcbnn ms/step" in done.stdout and "| ranks | chains |" in done.stdout
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["bandwidth_limit_ms"] > 0
    assert [row["chains"] for row in report["chains"]] == [1, 8]
    for row in report["chains"]:
        assert row["hpcbnn"]["ms_per_step"] > 0 and row["hpcbnn"]["ms_per_ess"] > 0 and row["step_vs_limit"] > 0
        if row["numpyro"] is not None:
            assert row["numpyro"]["ms_per_ess"] > 0 and row["ess_time_vs_numpyro"] > 0
    assert [(r["ranks"], r["chains"]) for r in report["ranks"]] == [(1, 1), (1, 8), (2, 1), (2, 8)]
    assert all(r["efficiency"] > 0 for r in report["ranks"])
