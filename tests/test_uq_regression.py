"""The regression UQ benchmark runs end to end at its smoke budget and reports sane metrics."""

from __future__ import annotations

import math

from benchmarks.uq_regression import KEYS, METHODS, run


def test_smoke_run_reports_finite_metrics_and_coverages_in_unit_interval() -> None:
    result = run(smoke=True)
    assert result["dataset"] == "diabetes"
    for method in METHODS:
        assert set(result[method]) == set(KEYS)
        assert all(math.isfinite(v) for v in result[method].values())
        assert all(0 <= result[method][f"coverage_{a}"] <= 1 for a in (50, 90, 95))
        assert result[method]["rmse"] > 0 and result[method]["crps"] > 0
