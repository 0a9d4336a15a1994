"""Smoke test of `python -m benchmarks.reproduce`: all three parts run end to end (1 epoch, 1 step)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from tests.mpi import ROOT


@pytest.mark.mpi
def test_the_reproduction_writes_its_figures_and_json(tmp_path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    launcher = "mpirun --oversubscribe --bind-to none" + (" --allow-run-as-root" if os.geteuid() == 0 else "")
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.reproduce", "--smoke", "--out", str(tmp_path), "--launcher", launcher],
        capture_output=True, text=True, timeout=500, env=env, cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == json.loads((tmp_path / "reproduce.json").read_text())
    assert set(result["convergence"]) == {"per-sample", "per-rank", "shared"}
    for mode in result["convergence"].values():
        assert set(mode["epochs_to_target"]) >= {"accuracy", "nll", "reached"}
        assert 0 < mode["test"]["accuracy"]["mean"] <= 1
    for method in ("bnn", "deterministic"):
        assert all(math.isfinite(result["electricity"][method][k]) for k in ("rmse", "crps", "coverage_90"))
    assert result["scaling"]["ceiling"]["1"] == 1.0 and result["scaling"]["rows"]
    assert all("efficiency_vs_ceiling" in row for row in result["scaling"]["rows"])
    for figure in ("convergence.png", "forecast.png", "scaling.png"):
        assert (tmp_path / figure).stat().st_size > 0
