"""The UQ benchmark runs end to end on a tiny budget over two folds and reports every headline key, finite,
and the bar's paired leads as the means of the per-run differences it saved."""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_smoke_run_reports_finite_headline_keys(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "benchmarks.uq", "--smoke", "--folds", "2", "--out", str(tmp_path)]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1], parse_constant=pytest.fail)  # strict JSON: no NaN
    assert set(report["protocols"]) == {"heldout", "rotated"}
    for name, methods in report["protocols"].items():
        for method in ("bnn", "deterministic", "ensemble"):
            keys = ["accuracy", "nll", "ece", "auroc_maxprob"] + (["auroc_mi"] if method != "deterministic" else [])
            for key in keys:
                assert math.isfinite(methods[method][key]), (name, method, key)
        assert {"bnn_flipout", "bnn_local"} <= set(methods)
        assert (tmp_path / f"{name}.png").stat().st_size > 0
    assert (tmp_path / "results.csv").read_text().startswith("protocol,method,metric,mean,std")
    with open(tmp_path / "runs.csv") as f:
        saved = list(csv.DictReader(f))
    assert {(r["fold"], r["seed"]) for r in saved} == {("0", "0"), ("1", "0")}
    for name, rows in report["bar"].items():
        assert [r["target"].split()[0] for r in rows] == ["NLL", "ECE", "AUROC", "MI-AUROC", "accuracy"]
        value = {(r["method"], r["fold"], r["metric"]): float(r["value"]) for r in saved if r["protocol"] == name}
        nll_lead = [value[("deterministic", f, "nll")] - value[("bnn", f, "nll")] for f in ("0", "1")]
        assert math.isclose(rows[0]["lead"], sum(nll_lead) / 2, rel_tol=1e-4, abs_tol=1e-6)
        assert rows[0]["met"] == (rows[0]["bnn"] < rows[0]["reference"]) and rows[0]["runs"] == 2
        se = abs(nll_lead[0] - nll_lead[1]) / 2  # the standard error of two runs' mean, here over the 2 folds
        assert rows[0]["se_over"] == "2 folds" and math.isclose(rows[0]["se"], se, rel_tol=1e-3, abs_tol=1e-6)
        assert math.isclose(rows[0]["bnn"], report["protocols"][name]["bnn"]["nll"], rel_tol=1e-9)
