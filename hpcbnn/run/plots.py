"""Pictures a person would rather look at than read: calibration, uncertainty, learning curves, scaling.

Figures are built with matplotlib's object API and written through the Agg canvas, so no
display and no global pyplot state are involved (safe on compute nodes and in threads).
Inputs are the JSON-serialisable outputs of `hpcbnn.uq`, of a run directory and of the
benchmarks. `python -m hpcbnn.plots RUN_DIR` redraws a run's pictures from its files.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from hpcbnn.errors import UsageError, entry_point

SCALING_KEYS = ("scaling", "mode", "ranks", "step_time", "efficiency", "comm_share")


def reliability_diagram(bin_stats: dict[str, Any], path: str | Path) -> Path:
    """Accuracy against confidence per bin, the gap to the diagonal, and the bin counts.

    `bin_stats` is the "reliability" entry of `metrics.finalize_classification`.
    """
    edges = bin_stats["edges"]
    width = edges[1] - edges[0]
    filled = [i for i, n in enumerate(bin_stats["count"]) if n > 0]
    left = [edges[i] for i in filled]
    accuracy = [bin_stats["accuracy"][i] for i in filled]
    confidence = [bin_stats["confidence"][i] for i in filled]

    fig = Figure(figsize=(5, 6), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    top.bar(left, accuracy, width=width, align="edge", color="tab:blue", edgecolor="black", label="accuracy")
    top.bar(
        left,
        [c - a for c, a in zip(confidence, accuracy)],
        bottom=accuracy,
        width=width,
        align="edge",
        color="tab:red",
        alpha=0.3,
        edgecolor="tab:red",
        hatch="//",
        label="gap to confidence",
    )
    top.plot([0, 1], [0, 1], "k--", label="perfect calibration")
    top.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy", title=f"Reliability (ECE = {bin_stats['ece']:.4f})")
    top.legend(loc="upper left")
    bottom.bar(edges[:-1], bin_stats["count"], width=width, align="edge", color="gray", edgecolor="black")
    bottom.set(xlabel="confidence", ylabel="examples")
    return _save(fig, path)


def regression_calibration(cal_data: dict[str, Any], path: str | Path) -> Path:
    """Observed against nominal central-interval coverage.

    `cal_data` is the "calibration" entry of `metrics.finalize_regression`.
    """
    fig = Figure(figsize=(5, 4.5), layout="constrained")
    curve = fig.subplots()
    curve.plot([0, 1], [0, 1], "k--", label="perfect calibration")
    curve.plot(cal_data["nominal"], cal_data["observed"], "o-", color="tab:blue", label="model")
    curve.fill_between([0, 1], [0, 0], [0, 1], color="tab:red", alpha=0.08, label="overconfident")
    curve.set(
        xlim=(0, 1),
        ylim=(0, 1),
        xlabel="nominal coverage of central interval",
        ylabel="observed coverage",
        title="Regression calibration",
    )
    curve.legend(loc="upper left")
    return _save(fig, path)


def uncertainty_plot(selective: dict[str, Any], ood: dict[str, Any] | None, path: str | Path) -> Path:
    """The risk-coverage curve and, with an OOD set, histograms of the mutual information
    in and out of distribution: does the model know what it does not know?

    `selective` is the "selective" entry of the test metrics (`ood.risk_coverage`), `ood`
    the result of `ood.ood_detection`.
    """
    fig = Figure(figsize=(10.5 if ood else 5, 4.5), layout="constrained")
    axes = fig.subplots(1, 2 if ood else 1, squeeze=False)[0]
    if ood:
        hist = ood["mi_histogram"]
        edges = hist["edges"]
        for part, color, label in (("in", "tab:blue", "in-distribution"), ("out", "tab:red", "out-of-distribution")):
            total = max(1, sum(hist[part]))
            axes[0].stairs([c / total for c in hist[part]], edges, color=color, fill=True, alpha=0.35)
            axes[0].stairs(
                [c / total for c in hist[part]], edges, color=color, label=f"{label} (mean {ood[f'mi_{part}']:.2g})"
            )
        axes[0].set(
            xscale="log",
            xlabel="mutual information (nats)",
            ylabel="fraction of examples",
            title=f"Epistemic uncertainty (MI-AUROC {ood['auroc_mi']:.3f})",
        )
        axes[0].legend(fontsize="small")
    curve = axes[-1]
    coverage, risk = selective["coverage"], selective["risk"]
    error = risk[-1]  # at full coverage: the error rate
    curve.plot(coverage, risk, color="tab:blue", label=f"model (AURC {selective['aurc']:.4f})")
    curve.plot(coverage, [max(0.0, 1 - (1 - error) / c) for c in coverage], "k--", label="oracle (errors last)")
    curve.set(
        xlim=(0, 1),
        ylim=(0, max(0.01, 1.05 * max(risk))),
        xlabel="coverage (most confident fraction kept)",
        ylabel="risk (error rate)",
        title="Selective prediction",
    )
    curve.legend(loc="upper left", fontsize="small")
    return _save(fig, path)


# Panels of the learning curves: title, then (label, key) series; "val.x" is a validation metric.
CURVE_PANELS = (
    ("loss", (("training loss", "loss"),)),
    ("negative log-likelihood", (("training (expected)", "nll"), ("validation (predictive)", "val.nll"))),
    ("KL / N", (("KL / N", "kl_per_n"),)),
    ("learning rate", (("learning rate", "lr"),)),
    ("validation accuracy", (("accuracy", "val.accuracy"),)),
    ("validation ECE", (("ECE", "val.ece"),)),
    ("validation mutual information", (("MI", "val.mutual_information"),)),
    ("validation RMSE", (("RMSE", "val.rmse"),)),
    ("validation CRPS", (("CRPS", "val.crps"),)),
)


def learning_curves(records: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Per-epoch training and validation curves from the records of metrics.jsonl, and the
    posterior standard deviations per layer (median, p10-p90 band): a posterior that
    learns shows layers and quantiles apart, not one flat line.

    Panels whose keys no record has (e.g. accuracy of a regression run) are left out.
    """
    if not records:
        raise ValueError("no epochs to plot: metrics.jsonl is empty")
    epochs = [r["epoch"] for r in records]

    def series(key: str) -> list[float]:
        values = [_lookup(r, key) for r in records]
        return [math.nan if v is None else v for v in values]

    panels = [
        (title, present)
        for title, lines in CURVE_PANELS
        if (present := [(label, key) for label, key in lines if any(_lookup(r, key) is not None for r in records)])
    ]
    layers = list(records[-1].get("sigma") or {})
    columns = 4
    rows = -(-(len(panels) + bool(layers)) // columns)
    fig = Figure(figsize=(4 * columns, 3.2 * rows), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax, (title, lines) in zip(axes, panels):
        for label, key in lines:
            ax.plot(epochs, series(key), "o-", markersize=3, label=label)
        ax.set(title=title, xlabel="epoch")
        if len(lines) > 1:
            ax.legend(fontsize="small")
    if layers:
        ax = axes[len(panels)]
        for name in layers:
            quantile = {  # looked up by name: a layer's name has dots of its own ("components.0.1")
                q: [((r.get("sigma") or {}).get(name) or {}).get(q, math.nan) for r in records]
                for q in ("p10", "median", "p90")
            }
            (line,) = ax.plot(epochs, quantile["median"], "o-", markersize=3, label=name)
            ax.fill_between(epochs, quantile["p10"], quantile["p90"], color=line.get_color(), alpha=0.2)
        ax.set(title="posterior sigma (median, p10-p90)", xlabel="epoch", yscale="log")
        ax.legend(fontsize="x-small")
    for ax in axes[: len(panels) + bool(layers)]:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes[len(panels) + bool(layers) :]:
        ax.set_axis_off()
    return _save(fig, path)


def scaling_plot(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Time per step (with its communication part) and efficiency against ranks, per mode.

    One column per scaling kind present ("weak", "strong"); each row of `rows` needs the
    keys in `SCALING_KEYS`: step_time in seconds, comm_share and efficiency as fractions.
    Rows that carry a `ceiling` (the machine's efficiency at their ranks with no
    communication, `benchmarks.scaling`) add it to the efficiency axes as a dotted line.
    """
    for i, row in enumerate(rows):
        missing = [k for k in SCALING_KEYS if k not in row]
        if missing:
            raise ValueError(f"scaling row {i} lacks {', '.join(missing)}: {row}")
    kinds = [k for k in ("weak", "strong") if any(r["scaling"] == k for r in rows)]
    if not kinds:
        raise ValueError('no scaling rows with scaling "weak" or "strong" to plot')
    modes = sorted({r["mode"] for r in rows})
    colors = dict(zip(modes, ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown")))
    fig = Figure(figsize=(5.5 * len(kinds), 7), layout="constrained")
    axes = fig.subplots(2, len(kinds), squeeze=False, sharex="col")
    for column, kind in enumerate(kinds):
        time_ax, eff_ax = axes[0, column], axes[1, column]
        of_kind = [r for r in rows if r["scaling"] == kind]
        for mode in sorted({r["mode"] for r in of_kind}):
            series = sorted((r for r in of_kind if r["mode"] == mode), key=lambda r: r["ranks"])
            ranks = [r["ranks"] for r in series]
            time_ax.plot(ranks, [r["step_time"] for r in series], "o-", color=colors[mode], label=mode)
            comm = [r for r in series if r["comm_share"] > 0]  # a log axis cannot show "none"
            time_ax.plot(
                [r["ranks"] for r in comm], [r["step_time"] * r["comm_share"] for r in comm], "x--", color=colors[mode]
            )
            eff_ax.plot(ranks, [r["efficiency"] for r in series], "o-", color=colors[mode], label=mode)
        ranks = sorted({r["ranks"] for r in of_kind})
        time_ax.set(title=f"{kind} scaling", ylabel="time per step (s)", yscale="log")
        time_ax.legend(
            handles=[
                *time_ax.get_legend_handles_labels()[0],
                Line2D([], [], color="gray", marker="o", label="whole step"),
                Line2D([], [], color="gray", marker="x", linestyle="--", label="communication"),
            ],
            fontsize="small",
        )
        eff_ax.axhline(1.0, color="black", linestyle="--", label="ideal")
        ceiling = {r["ranks"]: r["ceiling"] for r in of_kind if "ceiling" in r}
        if ceiling:
            eff_ax.plot(sorted(ceiling), [ceiling[n] for n in sorted(ceiling)], "k:", label="machine ceiling")
        eff_ax.set(
            xlabel="ranks",
            ylabel="parallel efficiency",
            xscale="log",
            ylim=(0, max(1.1, max(r["efficiency"] for r in of_kind) * 1.05, max(ceiling.values(), default=0) * 1.05)),
        )
        eff_ax.set_xticks(ranks, [str(n) for n in ranks])
        eff_ax.minorticks_off()
        eff_ax.legend(loc="lower left", fontsize="small")
    return _save(fig, path)


def draw_run(run_dir: str | Path) -> list[Path]:
    """Every picture of a run directory from its files: curves.png from metrics.jsonl and,
    once training has finished, the calibration and uncertainty pictures from summary.json."""
    run_dir = Path(run_dir)
    log = run_dir / "metrics.jsonl"
    if not log.is_file():
        raise UsageError(f"{log} is missing: is {run_dir} a run directory written by hpcbnn.train?")
    try:
        records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise UsageError(f"{log} is not JSON lines ({exc})") from None
    if not records:
        raise UsageError(f"{log} has no epochs yet: nothing to draw")
    written = [learning_curves(records, run_dir / "curves.png")]
    summary_path = run_dir / "summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        test = summary["test"]
        if "reliability" in test:
            written.append(reliability_diagram(test["reliability"], run_dir / "reliability.png"))
        if "calibration" in test:
            written.append(regression_calibration(test["calibration"], run_dir / "calibration.png"))
        if "selective" in test:
            written.append(uncertainty_plot(test["selective"], summary.get("ood"), run_dir / "uncertainty.png"))
    return written


@entry_point("hpcbnn.plots")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hpcbnn.plots",
        description="Redraw a run's pictures: curves.png from metrics.jsonl (also during training), "
        "reliability/calibration.png and uncertainty.png from summary.json.",
    )
    parser.add_argument("run_dir", type=Path, help="a run directory written by hpcbnn.train")
    for path in draw_run(parser.parse_args(argv).run_dir):
        print(path)
    return 0


def _lookup(record: Any, key: str) -> Any:
    for part in key.split("."):
        record = record.get(part) if isinstance(record, dict) else None
    return record


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=120)
    return path
