"""Smoke test of `python -m benchmarks.scaling`: the machine ceiling and the idle backend per P, in the JSON,
the CSV and the figure."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys

import pytest

from tests.mpi import ROOT


@pytest.mark.mpi
def test_the_benchmark_measures_the_machine_ceiling_and_prints_its_json_last(tmp_path) -> None:
    launcher = f"mpirun {'--allow-run-as-root ' if os.geteuid() == 0 else ''}--oversubscribe --bind-to none"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.scaling", "--ranks", "1", "2", "--modes", "sample", "--steps", "2",
         "--warmup", "1", "--rounds", "2", "--launcher", launcher, "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    ceiling = result["ceiling"]
    assert ceiling["1"] == 1.0 and ceiling["2"] > 0 and result["rounds"] == 2
    assert result["idle"]["1"] == 1.0 and result["idle"]["2"] > 0 and result["idle_step_time"]["2"] > 0
    assert {(r["scaling"], r["ranks"]) for r in result["rows"]} == {(s, p) for s in ("weak", "strong") for p in (1, 2)}
    for row in result["rows"]:
        assert row["mode"] == "sample" and row["step_time"] > 0 and 0 <= row["comm_share"]
        assert math.isclose(row["efficiency_vs_ceiling"], row["efficiency"] / ceiling[str(row["ranks"])])
    with open(tmp_path / "scaling.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [float(r["ceiling"]) for r in table] == [ceiling[r["ranks"]] for r in table]
    assert (tmp_path / "scaling.png").stat().st_size > 10_000


@pytest.mark.mpi
def test_the_allreduce_benchmark_times_each_reduction_against_mpi() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.allreduce", "--ranks", "2", "--floats", "6000", "--repeats", "2"],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["ranks"] == 2 and result["mb"] == pytest.approx(0.024)
    assert {"mpi, flat", "torch", "gloo, flat"} <= set(result["ms"]) and all(v > 0 for v in result["ms"].values())
    assert "vs MPI" in done.stdout
