"""benchmarks.layers runs end to end on tiny sizes and reports every estimator against its goal."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_layers_benchmark_reports_ratios_and_goals():
    cmd = [sys.executable, "-m", "benchmarks.layers", "--models", "mlp", "--estimators", "reparam", "flipout",
           "--samples", "2", "--batch", "4", "--repeats", "1", "--threads", "1"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True, timeout=300).stdout
    result = json.loads(out.strip().splitlines()[-1])
    rows = {(r["model"], r["estimator"]): r for r in result["rows"]}
    assert set(rows) == {("mlp", "reparam"), ("mlp", "flipout")}
    assert rows["mlp", "reparam"]["goal"] == 1.5 and rows["mlp", "flipout"]["goal"] == 2.5
    for r in rows.values():
        assert r["t_det"] > 0 and r["t_bayes"] > 0 and r["time_ratio"] == r["t_bayes"] / r["t_det"]
        assert r["mem_bayes"] > 0
    assert [c["chunk"] for c in result["chunks"]] == [2, 1]
