"""Smoke test of `python -m benchmarks.hmc_vs_vi`: both posteriors trained, sampled, scored, tabled."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.mpi import ROOT


def test_the_benchmark_prints_the_table_and_its_json(tmp_path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.hmc_vs_vi", "--smoke", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=400, env=env, cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[2].startswith("| posterior | accuracy | NLL | ECE")
    result = json.loads(lines[-1])
    assert result["hmc"]["agreement"] == 1.0 and 0 <= result["vi"]["agreement"] <= 1
    for posterior in ("vi", "hmc"):
        assert 0 <= result[posterior]["accuracy"] <= 1 and result[posterior]["nll"] > 0
        assert 0 <= result[posterior]["auroc_entropy"] <= 1
    assert (tmp_path / "hmc" / "evaluation.json").is_file() and (tmp_path / "vi" / "evaluation.json").is_file()
