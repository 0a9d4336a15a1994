"""Pictures a person would rather look at than read: calibration and scaling.

Figures are built with matplotlib's object API and written through the Agg canvas, so no
display and no global pyplot state are involved (safe on compute nodes and in threads).
Inputs are the JSON-serialisable outputs of `hpcbnn.uq.metrics` and of the benchmarks.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

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
    """Observed against nominal central-interval coverage; predictions with intervals if given.

    `cal_data` is the "calibration" entry of `metrics.finalize_regression`, optionally with
    an "intervals" entry from `metrics.prediction_intervals`.
    """
    intervals = cal_data.get("intervals")
    fig = Figure(figsize=(11 if intervals else 5, 4.5), layout="constrained")
    axes = fig.subplots(1, 2 if intervals else 1, squeeze=False)[0]
    curve = axes[0]
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
    if intervals:
        _intervals(axes[1], intervals)
    return _save(fig, path)


def scaling_plot(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Time per step (with its communication part) and efficiency against ranks, per mode.

    One column per scaling kind present ("weak", "strong"); each row of `rows` needs the
    keys in `SCALING_KEYS`: step_time in seconds, comm_share and efficiency as fractions.
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
        eff_ax.set(
            xlabel="ranks",
            ylabel="parallel efficiency",
            xscale="log",
            ylim=(0, max(1.1, max(r["efficiency"] for r in of_kind) * 1.05)),
        )
        eff_ax.set_xticks(ranks, [str(n) for n in ranks])
        eff_ax.minorticks_off()
        eff_ax.legend(loc="lower left", fontsize="small")
    return _save(fig, path)


def _intervals(ax: Axes, iv: dict[str, Any]) -> None:
    index = range(len(iv["mean"]))
    ax.fill_between(index, iv["lower"], iv["upper"], color="tab:blue", alpha=0.25, label=f"{iv['level']:.0%} interval")
    ax.plot(index, iv["mean"], color="tab:blue", label="predictive mean")
    ax.plot(index, iv["target"], "k.", markersize=4, label="target")
    ax.set(xlabel="test example", ylabel="value", title="Predictions on the first test examples")
    ax.legend(fontsize="small")


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=120)
    return path
