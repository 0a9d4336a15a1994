"""Each plot writes a real PNG from the real outputs of the metrics."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import torch

from hpcbnn.run import plots
from hpcbnn.uq import metrics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the IHDR chunk, after checking the signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    assert len(data) > 10_000  # axes, bars, text: not an empty canvas
    return struct.unpack(">II", data[16:24])


def test_reliability_diagram(tmp_path):
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(4, 500, 10, generator=g) * 3, -1)
    y = torch.randint(0, 10, (500,), generator=g)
    stats = metrics.classification_metrics(probs, y, bins=15)["reliability"]
    assert None in stats["accuracy"]  # empty bins must be drawn as gaps, not fail
    out = plots.reliability_diagram(stats, tmp_path / "figs" / "reliability.png")
    assert png_size(out) == (600, 720)


def regression_cal_data(with_intervals: bool) -> dict:
    g = torch.Generator().manual_seed(1)
    x = torch.linspace(0, 6, 300)
    mean = torch.sin(x)[None, :, None] + 0.1 * torch.randn(8, 300, 1, generator=g)
    std = torch.full_like(mean, 0.15)
    y = torch.sin(x)[:, None] + 0.3 * torch.randn(300, 1, generator=g)
    data = dict(metrics.regression_metrics(mean, std, y)["calibration"])
    if with_intervals:
        data["intervals"] = metrics.prediction_intervals(mean, std, y)
    return data


@pytest.mark.parametrize("with_intervals,size", [(True, (1320, 540)), (False, (600, 540))])
def test_regression_calibration(tmp_path, with_intervals, size):
    out = plots.regression_calibration(regression_cal_data(with_intervals), tmp_path / "cal.png")
    assert png_size(out) == size


def scaling_rows() -> list[dict]:
    rows = []
    for mode, loss in (("sample", 0.03), ("data", 0.12), ("hybrid", 0.06)):
        for ranks in (1, 2, 4, 8):
            eff = 1 / (1 + loss * (ranks - 1))
            rows.append({"scaling": "weak", "mode": mode, "ranks": ranks, "step_time": 0.2 / eff,
                         "efficiency": eff, "comm_share": 1 - eff})
            rows.append({"scaling": "strong", "mode": mode, "ranks": ranks,
                         "step_time": 0.2 / (ranks * eff), "efficiency": eff,
                         "comm_share": 1 - eff})
    return rows


def test_scaling_plot_has_a_panel_per_scaling_kind(tmp_path):
    both = png_size(plots.scaling_plot(scaling_rows(), tmp_path / "both.png"))
    weak = png_size(plots.scaling_plot([r for r in scaling_rows() if r["scaling"] == "weak"],
                                       tmp_path / "weak.png"))
    assert both == (1320, 840) and weak == (660, 840)


def test_scaling_plot_names_a_missing_key(tmp_path):
    row = scaling_rows()[0]
    del row["comm_share"]
    with pytest.raises(ValueError, match="scaling row 0 lacks comm_share"):
        plots.scaling_plot([row], tmp_path / "x.png")
