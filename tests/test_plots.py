"""Each plot writes a real PNG from the real outputs of the metrics."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

from hpcbnn.errors import UsageError
from hpcbnn.run import plots
from hpcbnn.uq import metrics, ood

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


def test_regression_calibration(tmp_path):
    g = torch.Generator().manual_seed(1)
    x = torch.linspace(0, 6, 300)
    mean = torch.sin(x)[None, :, None] + 0.1 * torch.randn(8, 300, 1, generator=g)
    std = torch.full_like(mean, 0.15)
    y = torch.sin(x)[:, None] + 0.3 * torch.randn(300, 1, generator=g)
    out = plots.regression_calibration(metrics.regression_metrics(mean, std, y)["calibration"], tmp_path / "cal.png")
    assert png_size(out) == (600, 540)


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


def test_scaling_plot_draws_the_machine_ceiling_when_the_rows_carry_it(tmp_path, monkeypatch):
    figures = []
    save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or save(fig, path))
    ceiling = {1: 1.0, 2: 0.97, 4: 0.9, 8: 0.8}
    rows = [{**r, "ceiling": ceiling[r["ranks"]]} for r in scaling_rows()]
    assert png_size(plots.scaling_plot(rows, tmp_path / "ceiling.png")) == (1320, 840)
    plots.scaling_plot(scaling_rows(), tmp_path / "none.png")
    with_ceiling, without = ([{line.get_label(): line for line in ax.get_lines()} for ax in fig.axes[2:]]
                             for fig in figures)
    for lines in with_ceiling:  # both efficiency axes
        line = lines["machine ceiling"]
        assert list(line.get_xdata()) == [1, 2, 4, 8] and list(line.get_ydata()) == [1.0, 0.97, 0.9, 0.8]
        assert line.get_linestyle() == ":" and line.get_color() == "k" and "ideal" in lines
    assert all("machine ceiling" not in lines and "ideal" in lines for lines in without)


def epoch_records(classification: bool = True) -> list[dict]:
    val = {"accuracy": 0.9, "nll": 0.3, "ece": 0.02, "mutual_information": 0.01} if classification else {
        "rmse": 1.0, "nll": 1.2, "crps": 0.5}
    return [{"epoch": e, "loss": 2.0 / e, "nll": 1.0 / e, "kl_per_n": 0.1, "lr": 1e-3, "val": val,
             "sigma": {"0": {"min": 1e-3, "p10": 2e-3, "median": 3e-3, "p90": 4e-3, "max": 5e-3}}}
            for e in range(1, 4)]


@pytest.mark.parametrize("classification, size", [(True, (1920, 768)), (False, (1920, 768))])
def test_learning_curves(tmp_path, classification, size):
    assert png_size(plots.learning_curves(epoch_records(classification), tmp_path / "curves.png")) == size


def test_uncertainty_plot_with_and_without_an_ood_set(tmp_path):
    g = torch.Generator().manual_seed(2)
    sure = torch.softmax(6 * torch.randn(4, 300, 10, generator=g), -1)
    unsure = torch.softmax(torch.randn(4, 200, 10, generator=g), -1)
    inside, outside = ood.uncertainty_scores(sure), ood.uncertainty_scores(unsure)
    selective = ood.risk_coverage(inside["maxprob"], torch.rand(300, generator=g).numpy() < 0.8)
    report = ood.ood_detection(inside, outside)
    assert png_size(plots.uncertainty_plot(selective, report, tmp_path / "u.png")) == (1260, 540)
    assert png_size(plots.uncertainty_plot(selective, None, tmp_path / "u1.png")) == (600, 540)


def test_plots_command_redraws_a_run_directory_and_refuses_other_ones(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in epoch_records()))
    assert plots.draw_run(run) == [run / "curves.png"]  # no summary.json yet: training goes on
    assert png_size(run / "curves.png") == (1920, 768)
    with pytest.raises(UsageError, match=r"metrics\.jsonl is missing"):
        plots.draw_run(tmp_path)
