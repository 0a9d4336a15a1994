"""The UQ benchmark runs end to end on a tiny budget and reports every headline key, finite."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_smoke_run_reports_finite_headline_keys(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.uq", "--smoke", "--out", str(tmp_path)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(report["protocols"]) == {"heldout", "rotated"}
    for name, methods in report["protocols"].items():
        for method in ("bnn", "deterministic", "ensemble"):
            keys = ["accuracy", "nll", "ece", "auroc_maxprob"] + (["auroc_mi"] if method != "deterministic" else [])
            for key in keys:
                assert math.isfinite(methods[method][key]), (name, method, key)
        assert {"bnn_flipout", "bnn_local"} <= set(methods)
        assert (tmp_path / f"{name}.png").stat().st_size > 0
    assert (tmp_path / "results.csv").read_text().startswith("protocol,method,metric,mean,std")
