"""Day-ahead forecasts of a real electricity load: the default BNN against a deterministic net (and an ensemble).

    python -m benchmarks.electricity [--quick | --smoke] [--out DIR]    # DIR defaults to runs/electricity

Data: Taylor's half-hourly electricity demand of England and Wales, 5 June - 27 August 2000
(4032 values in MW, bundled with pmdarima as `load_taylor`). The series is written to
DIR/taylor.csv and converted, as a user would, by `python -m hpcbnn.data csv` into DIR/taylor.h5:
windows of one week (336 half-hours) in, the next day (48 half-hours) out, split by time
(the last 20% of the series tests, the 20% before it validates; windows never straddle two
parts), which gives 2037 / 423 / 423 train / val / test windows; their targets span 12 Jun -
25 Jul 09:30, 1 Aug 10:00 - 11 Aug 04:30 and 18 Aug 05:00 - 27 Aug. Validation takes 20% rather than 15% so that
its targets cover more than the one week (7 - 11 Aug) whose level jumps by about 1000 MW
over the week before, which the validation NLL otherwise hinges on.

Protocol: the harness of benchmarks/uq_regression.py on these windows (`Split.from_arrays`
standardises each of the 336 lags and each of the 48 targets with the training statistics),
i.e. the same MLP with a heteroscedastic Gaussian head (mean and scale for each of the 48
half-hours) for every method, Adam on batches of 32, the parameters of the epoch with the best
validation NLL, and the learning rate (and weight decay) chosen on the validation split only:

- bnn: `bayesianize` with the library defaults and the ELBO, predictive = the mixture of S = 64 samples;
- deterministic: MAP with weight decay (coupled L2), one Gaussian per target;
- ensemble: 5 deterministic nets with the deterministic net's chosen settings (full and quick only).

Architecture, fixed before any run: the flattened week (336 inputs) -> 128 ReLU units -> 96
outputs. One hidden layer as in the diabetes protocol, at a width between the 336 inputs and
the 96 outputs; its 55k weights are already many for eight weeks of training series, and a
BNN epoch (4 weight samples per step) stays under a second, so that the full grid with the
ensemble and 3 seeds fits in about two minutes on two cores.

The split is fixed by time, so the seeds (3 in the full run) vary only the initialisation,
the batch order and the weight noise. Reported on the test split, in MW: RMSE, CRPS (per
half-hour), the NLL (per window: joint over the 48 half-hours, density in 1/MW^48) and the
coverage of the central 50/90/95% intervals, each the mean +- standard error over the seeds.
DIR/forecast.png shows the first 7 days of the test part forecast a day ahead from each
midnight (every 48th window, so the forecast is continuous) with the BNN's 50% and 90%
intervals and the deterministic net's 90% interval (seed 0).

The nets forecast the change from the same half-hours one week earlier (seasonal
differencing: the target minus the first 48 lags), and that week is added back; RMSE, NLL,
CRPS and coverage are unchanged by such a shift per window, so they are in MW of demand. On
levels instead the nets' test RMSE was about 900 MW. The table also scores that seasonal
naive forecast itself (a point forecast: its CRPS is its mean absolute error), the yardstick
of load forecasting.

Every run picks an early epoch (2-4 of at most 60): afterwards the training NLL keeps
falling while the validation NLL rises, the nets growing overconfident on the August weeks,
so a patience of 15 epochs suffices; the nets see only eight weeks of training data.

Wall times with one torch thread on 2 shared CPU cores (measured): --smoke about 10 s
(1 seed, 2 epochs, no ensemble), --quick about 20 s (1 seed, at most 40 epochs, 2 x 2 grid),
full about 115 s (3 seeds, at most 60 epochs, 3 learning rates x 3 weight decays).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import math
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor

from benchmarks.uq_regression import KEYS, Budget, Split, chosen_lines, predictives, test_metrics
from hpcbnn.bnn.objectives import gaussian_params
from hpcbnn.data.format import SPLITS, open_dataset, open_h5

INPUT_LENGTH = 336  # one week of half-hours
HORIZON = 48  # the next day
VAL_FRACTION = 0.2
TEST_FRACTION = 0.2
START = dt.datetime(2000, 6, 5)  # Monday, 00:00: the time of the first value
STEPS_PER_DAY = 48
HIDDEN = (128,)
MEMBERS = 5
PLOT_DAYS = 7
METHODS = ("bnn", "deterministic", "ensemble")

# `splits` counts the seeds here. The validation NLL is best after a few epochs (the nets grow
# overconfident on the shifted August weeks after that), hence a short patience.
BUDGETS = {
    "full": Budget(splits=3, epochs=60, lrs=(3e-4, 1e-3, 3e-3), weight_decays=(0.1, 1.0, 10.0), patience=15),
    "quick": Budget(splits=1, epochs=40, lrs=(1e-3, 3e-3), weight_decays=(0.1, 1.0), patience=10),
    "smoke": Budget(splits=1, epochs=2, lrs=(3e-3,), weight_decays=(1.0,)),
}


def write_series(path: Path) -> np.ndarray:
    """Taylor's series as a CSV (time, demand in MW); returns the values."""
    from pmdarima.datasets import load_taylor

    demand = np.asarray(load_taylor(), np.float64)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["time", "demand"])
        for i, value in enumerate(demand):
            writer.writerow([(START + dt.timedelta(minutes=30 * i)).isoformat(" ", "minutes"), f"{value:g}"])
    return demand


def convert(csv_path: Path, h5_path: Path) -> None:
    """hpcbnn's own CSV converter, run as a user would run it."""
    command = [
        sys.executable,
        "-m",
        "hpcbnn.data",
        "csv",
        str(csv_path),
        str(h5_path),
        "--input_length",
        str(INPUT_LENGTH),
        "--horizon",
        str(HORIZON),
        "--columns",
        "demand",
        "--targets",
        "demand",
        "--val_fraction",
        str(VAL_FRACTION),
        "--test_fraction",
        str(TEST_FRACTION),
    ]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)


def read_splits(h5_path: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Inputs [N, 336] and targets [N, 48] (MW) of each split of the converted file, validated on open."""
    for split in SPLITS:
        open_dataset(h5_path, split)
    with open_h5(h5_path) as f:
        x = {s: f[s]["x"][:].reshape(f[s]["x"].shape[0], -1) for s in SPLITS}
        y = {s: f[s]["y"][:] for s in SPLITS}
    return x, y


def test_start(length: int) -> int:
    """Time step of the first value of the test part (the converter's split by time)."""
    return length - round(length * TEST_FRACTION)


def midnight_windows(start: int, count: int, days: int) -> np.ndarray:
    """Test windows whose forecast starts at midnight: every 48th from the first, at most `days` of them."""
    first = -(start + INPUT_LENGTH) % STEPS_PER_DAY
    return np.arange(first, count, STEPS_PER_DAY)[:days]


def mixture_quantiles(out: Tensor, split: Split, levels: Sequence[float], iterations: int = 60) -> Tensor:
    """Quantiles [L, N, d] in MW of the uniform mixture of the S Gaussians of `out` [S, N, 2d], by bisection."""
    mean, std = gaussian_params(out.double())
    mean = mean * split.y_std.double() + split.y_mean.double()
    std = std * split.y_std.double()
    normal = torch.distributions.Normal(mean, std)
    q = torch.tensor(levels, dtype=torch.float64).view(-1, 1, 1)
    lo = (mean - 10 * std).amin(0).expand(len(levels), -1, -1).clone()
    hi = (mean + 10 * std).amax(0).expand(len(levels), -1, -1).clone()
    for _ in range(iterations):
        mid = (lo + hi) / 2
        below = normal.cdf(mid[:, None]).mean(1) < q
        lo = torch.where(below, mid, lo)
        hi = torch.where(below, hi, mid)
    return (lo + hi) / 2


def plot_forecast(
    path: Path,
    split: Split,
    outputs: dict[str, Tensor],
    windows: np.ndarray,
    first_step: int,
    observed: np.ndarray,
    last_week: np.ndarray,
) -> Path:
    """The observed demand and the day-ahead forecasts of `windows` (consecutive midnights), concatenated;
    the nets forecast the change from `last_week` [days, 48], which is added back."""
    levels = (0.05, 0.25, 0.75, 0.95)

    shown = {m: outputs[m][:, windows] for m in ("bnn", "deterministic")}  # [S, days, 2 * 48]

    def flat(t: Tensor) -> np.ndarray:  # [..., days, 48] -> [..., days * 48] in MW, one curve in time
        return (t + torch.as_tensor(last_week, dtype=t.dtype)).reshape(*t.shape[:-2], -1).numpy()

    bnn = flat(mixture_quantiles(shown["bnn"], split, levels))
    det = flat(mixture_quantiles(shown["deterministic"], split, levels))
    means = {m: flat((gaussian_params(o)[0] * split.y_std + split.y_mean).mean(0)) for m, o in shown.items()}
    hours = np.arange(len(observed)) / 2
    begin = START + dt.timedelta(minutes=30 * first_step)

    fig = Figure(figsize=(11, 5.2), layout="constrained")
    ax = fig.subplots()
    ax.fill_between(hours, bnn[0], bnn[3], color="tab:blue", alpha=0.2, lw=0, label="BNN 90% interval")
    ax.fill_between(hours, bnn[1], bnn[2], color="tab:blue", alpha=0.35, lw=0, label="BNN 50% interval")
    ax.plot(hours, means["bnn"], color="tab:blue", lw=1.4, label="BNN mean")
    ax.plot(hours, means["deterministic"], color="tab:red", lw=1.1, ls="--", label="deterministic mean")
    ax.plot(hours, det[0], color="tab:red", lw=0.8, ls=":", label="deterministic 90% interval")
    ax.plot(hours, det[3], color="tab:red", lw=0.8, ls=":")
    ax.plot(hours, observed, color="black", lw=1.2, label="observed")
    ax.set_xticks(np.arange(0, hours[-1] + 0.5, 24))
    ax.set_xticklabels([f"{24 * d} h\n{begin + dt.timedelta(days=d):%a %d %b}" for d in range(len(ax.get_xticks()))])
    ax.set(
        xlim=(0, hours[-1]),
        xlabel=f"hours since {begin:%a %d %b %Y} 00:00 (a day-ahead forecast issued at each midnight)",
        ylabel="demand (MW)",
        title="England and Wales electricity demand: day-ahead forecasts on the test part",
    )
    ax.grid(alpha=0.3)
    fig.legend(loc="outside lower center", ncols=6, fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=120)
    return path


def run(out: Path, quick: bool = False, smoke: bool = False) -> dict:
    """The protocol at the full, quick or smoke budget: files in `out`, metrics as means over the seeds."""
    out = Path(out)
    budget = BUDGETS["smoke" if smoke else "quick" if quick else "full"]
    members = 1 if smoke else MEMBERS
    series = write_series(out / "taylor.csv")
    convert(out / "taylor.csv", out / "taylor.h5")
    x, y = read_splits(out / "taylor.h5")
    start = test_start(len(series))
    if not np.allclose(y["test"][0], series[start + INPUT_LENGTH : start + INPUT_LENGTH + HORIZON]):
        raise RuntimeError("the converter's test windows do not start where test_start says")
    # Seasonal differencing: the nets forecast the change from the same day a week before (the
    # first 48 of the 336 lags); every reported metric is invariant to that shift per window.
    last_week = {s: x[s][:, :HORIZON] for s in SPLITS}
    split = Split.from_arrays(x, {s: y[s] - last_week[s] for s in SPLITS})

    per_seed, choices = [], []
    for seed in range(budget.splits):
        outputs, chosen = predictives(split, budget, seed, HIDDEN, members)
        per_seed.append({m: test_metrics(split, o) for m, o in outputs.items()})
        choices.append(chosen)
        if seed == 0:
            windows = midnight_windows(start, len(y["test"]), PLOT_DAYS)
            first = start + INPUT_LENGTH + int(windows[0])
            observed = series[first : first + len(windows) * HORIZON]
            plot_forecast(out / "forecast.png", split, outputs, windows, first, observed, last_week["test"][windows])

    result: dict = {
        "dataset": "taylor electricity demand (MW), day-ahead from one week",
        "seeds": budget.splits,
        "epochs": budget.epochs,
        "hidden": list(HIDDEN),
        "windows": {s: len(v) for s, v in y.items()},
    }
    stderr = {}
    for method in (m for m in METHODS if m in per_seed[0]):
        values = {k: np.array([m[method][k] for m in per_seed]) for k in KEYS}
        result[method] = {k: float(v.mean()) for k, v in values.items()}
        stderr[method] = {
            k: float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else None for k, v in values.items()
        }
    result["stderr"] = stderr
    change = y["test"] - last_week["test"]
    result["seasonal_naive"] = {"rmse": float(np.sqrt(np.mean(change**2))), "crps": float(np.mean(np.abs(change)))}
    result["selected"] = {method: [c[method] for c in choices] for method in ("bnn", "deterministic")}
    result["files"] = {name: str(out / name) for name in ("taylor.csv", "taylor.h5", "forecast.png")}
    return result


def table(result: dict) -> str:
    """The methods as rows, mean +- standard error over the seeds, then the settings chosen on validation."""
    lines = [
        f"{result['dataset']}: {result['seeds']} seed(s), at most {result['epochs']} epochs, hidden "
        f"{result['hidden']}; windows {result['windows']}; RMSE and CRPS in MW, NLL per 48-step window",
        f"{'method':<14}" + "".join(f"{k:>19}" for k in KEYS),
    ]
    for method in (m for m in METHODS if m in result):
        se = result["stderr"][method]
        digits = {"rmse": 0, "crps": 0, "nll": 1}
        cells = (
            f"{result[method][k]:.{digits.get(k, 3)}f}"
            + (f" +-{se[k]:.{digits.get(k, 3)}f}" if se[k] is not None else "")
            for k in KEYS
        )
        lines.append(f"{method:<14}" + "".join(f"{c:>19}" for c in cells))
    naive = result["seasonal_naive"]
    lines.append(
        f"{'last week':<14}{naive['rmse']:>19.0f}{'-':>19}{naive['crps']:>19.0f}  (seasonal naive, a point forecast)"
    )
    return "\n".join([*lines, *chosen_lines(result)])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="1 seed, fewer epochs, a smaller grid")
    size.add_argument("--smoke", action="store_true", help="1 seed, 2 epochs, no ensemble: checks that it runs")
    parser.add_argument("--out", default="runs/electricity", help="directory for the CSV, the HDF5 file and the plot")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    result = run(Path(args.out), quick=args.quick, smoke=args.smoke)
    result["wall_s"] = round(time.perf_counter() - start, 1)
    print(table(result))
    print(f"({result['wall_s']:.0f} s)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
