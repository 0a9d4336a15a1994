"""The electricity forecast benchmark runs end to end at its smoke budget: files, plot and finite metrics."""

from __future__ import annotations

import math
from pathlib import Path

from benchmarks.electricity import HORIZON, INPUT_LENGTH, run
from hpcbnn.data.format import open_dataset, open_h5


def test_smoke_run_writes_csv_h5_and_plot_and_reports_finite_metrics(tmp_path: Path) -> None:
    result = run(tmp_path, smoke=True)
    csv = tmp_path / "taylor.csv"
    assert csv.read_text().splitlines()[0].split(",")[-1] == "demand"
    assert len(csv.read_text().splitlines()) == 1 + 4032
    test = open_dataset(tmp_path / "taylor.h5", "test")
    assert test.task == "regression" and test.num_classes == HORIZON == 48
    assert test.target_shape == (48,) and test.input_shape == (1, INPUT_LENGTH)
    assert result["windows"]["test"] == test.n > 100
    with open_h5(tmp_path / "taylor.h5") as f:
        assert f["test"]["y"].shape == (test.n, 48)
    assert (tmp_path / "forecast.png").stat().st_size > 10_000
    assert result["seeds"] == 1
    for method in ("bnn", "deterministic"):
        for key in ("rmse", "crps", "coverage_90"):
            assert math.isfinite(result[method][key]), (method, key)
        assert result[method]["rmse"] > 0 and result[method]["crps"] > 0
        assert 0 <= result[method]["coverage_90"] <= 1
