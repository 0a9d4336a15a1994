"""Does independent augmentation per sample or per rank cut the epochs to converge? (the paper's third claim)

    python -m benchmarks.convergence [--quick | --smoke] [--out DIR]

Sample mode on 4 ranks (mpirun, oversubscribed here), the bundled digits with random
shifts and rotations (`--augment shift-rotate`), `hpcbnn.train`'s defaults otherwise
(S = 8, B = 64, the 8-component mixture, cosine schedule). Only `--augment_mode` changes:

- per-sample: each of the S weight samples sees its own augmentation of the batch;
- per-rank: the S/K samples of one rank share one augmentation (the paper's code);
- shared: every sample sees the same augmentation.

Each mode trains `seeds` runs (seeds 0..n-1: the same initial weights, batches and noise
per seed across modes). From `metrics.jsonl`, the epochs to reach the validation targets
`TARGET_ACCURACY` and `TARGET_NLL` (fixed before the runs; None if a run never does), and
from `summary.json` the final test metrics; mean and sd over the seeds. The full run also
trains without augmentation, as the reference that says whether augmentation matters here.
`convergence.png` draws validation accuracy and NLL against the epoch, one curve per mode
(mean over seeds) with a band of +-1 sd.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

import numpy as np
from matplotlib.figure import Figure

from benchmarks.launch import command
from hpcbnn.parallel.engine import AugmentMode

MODES: tuple[AugmentMode, ...] = get_args(AugmentMode)
REFERENCE = "no augmentation"
RANKS = 4
AUGMENT = "shift-rotate"
TARGET_ACCURACY = 0.94  # validation accuracy, on the digits' 180 validation images
TARGET_NLL = 0.20  # validation NLL per example
TEST_KEYS = ("accuracy", "nll", "ece")


@dataclass(frozen=True)
class Budget:
    seeds: int
    epochs: int
    reference: bool  # also train without augmentation


BUDGETS = {
    "full": Budget(seeds=3, epochs=30, reference=True),
    "quick": Budget(seeds=3, epochs=20, reference=False),
    "smoke": Budget(seeds=1, epochs=1, reference=False),
}


def train(out: Path, mode: str, seed: int, epochs: int) -> Path:
    """One 4-rank training run; its run directory."""
    run = out / mode.replace(" ", "-") / f"seed-{seed}"
    run.mkdir(parents=True, exist_ok=True)
    augment = ["--augment", "none"] if mode == REFERENCE else ["--augment", AUGMENT, "--augment_mode", mode]
    args = ["-m", "hpcbnn.train", *augment, "--seed", str(seed), "--epochs", str(epochs)]
    command([*args, "--ood", "none", "--log_every", "100000", "--run_dir", str(run)], RANKS, run / "train.log")
    return run


def curves(run: Path) -> dict[str, list[float]]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {key: [r["val"][key] for r in records] for key in ("accuracy", "nll")}


def first_epoch(values: list[float], reached: Any) -> int | None:
    """The first epoch (1-based) whose value meets the target, or None."""
    return next((epoch for epoch, v in enumerate(values, 1) if reached(v)), None)


def _mean_sd(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "sd": None}
    return {"mean": float(np.mean(values)), "sd": float(np.std(values, ddof=1)) if len(values) > 1 else None}


def summarise(runs: list[Path]) -> dict[str, Any]:
    """Epochs to the targets and final test metrics of one mode's seeds; the curves for the figure."""
    per_seed = [curves(run) for run in runs]
    to_acc = [first_epoch(c["accuracy"], lambda v: v >= TARGET_ACCURACY) for c in per_seed]
    to_nll = [first_epoch(c["nll"], lambda v: v <= TARGET_NLL) for c in per_seed]
    tests = [json.loads((run / "summary.json").read_text())["test"] for run in runs]
    return {
        "epochs_to_target": {
            "accuracy": _mean_sd([e for e in to_acc if e is not None]),
            "nll": _mean_sd([e for e in to_nll if e is not None]),
            "reached": {"accuracy": sum(e is not None for e in to_acc), "nll": sum(e is not None for e in to_nll)},
            "per_seed": {"accuracy": to_acc, "nll": to_nll},
        },
        "test": {key: _mean_sd([t[key] for t in tests]) for key in TEST_KEYS},
        "curves": per_seed,
    }


def plot(result: dict[str, dict[str, Any]], path: Path) -> Path:
    fig = Figure(figsize=(10, 4), layout="constrained")
    panels = fig.subplots(1, 2)
    for (key, target, label), ax in zip(
        (("accuracy", TARGET_ACCURACY, "validation accuracy"), ("nll", TARGET_NLL, "validation NLL")), panels
    ):
        for mode, summary in result.items():
            values = np.array([c[key] for c in summary["curves"]])
            epochs = np.arange(1, values.shape[1] + 1)
            mean, sd = values.mean(0), values.std(0, ddof=1) if len(values) > 1 else np.zeros(values.shape[1])
            style = "--" if mode == REFERENCE else "-"
            (line,) = ax.plot(epochs, mean, style, label=f"{mode} ({len(values)} seeds)")
            ax.fill_between(epochs, mean - sd, mean + sd, color=line.get_color(), alpha=0.2)
        ax.axhline(target, color="black", linestyle=":", label=f"target {target:g}")
        ax.set(xlabel="epoch", ylabel=label)
        if key == "nll":
            ax.set(yscale="log")
        else:
            ax.set(ylim=(max(0.0, ax.get_ylim()[0]), 1.0))
    panels[0].legend(fontsize="small")
    fig.suptitle(f"digits, {AUGMENT} augmentation drawn per sample, per rank or shared; sample mode on {RANKS} ranks")
    fig.savefig(path, dpi=110)
    return path


def run(out: Path, budget: Budget) -> dict[str, dict[str, Any]]:
    """Train every mode and seed; summarise, draw `out/convergence.png`; the summaries without curves."""
    modes = [*MODES, *([REFERENCE] if budget.reference else [])]
    result = {
        mode: summarise([train(out, mode, seed, budget.epochs) for seed in range(budget.seeds)]) for mode in modes
    }
    plot(result, out / "convergence.png")
    return {mode: {k: v for k, v in summary.items() if k != "curves"} for mode, summary in result.items()}


def _cell(stat: dict[str, float | None], digits: int) -> str:
    if stat["mean"] is None:
        return "never"
    sd = "" if stat["sd"] is None or math.isnan(stat["sd"]) else f" +-{stat['sd']:.{digits}f}"
    return f"{stat['mean']:.{digits}f}{sd}"


def table(result: dict[str, dict[str, Any]], epochs: int) -> str:
    head = f"{'augmentation':<16}{'epochs to acc':>16}{'epochs to NLL':>16}" + "".join(
        f"{'test ' + k:>18}" for k in TEST_KEYS
    )
    lines = [f"targets on validation: accuracy >= {TARGET_ACCURACY}, NLL <= {TARGET_NLL}; {epochs} epochs", head]
    for mode, r in result.items():
        e = r["epochs_to_target"]
        seeds = len(e["per_seed"]["accuracy"])
        reached = f"(reached by {e['reached']['accuracy']}/{seeds} and {e['reached']['nll']}/{seeds} seeds)"
        lines.append(
            f"{mode:<16}{_cell(e['accuracy'], 1):>16}{_cell(e['nll'], 1):>16}"
            + "".join(f"{_cell(r['test'][k], 4):>18}" for k in TEST_KEYS)
            + f"  {reached}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.convergence", description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="3 seeds, 20 epochs, no reference")
    size.add_argument("--smoke", action="store_true", help="1 seed, 1 epoch: checks that it runs")
    parser.add_argument("--out", type=Path, default=Path("runs/convergence"))
    args = parser.parse_args(argv)
    budget = BUDGETS["smoke" if args.smoke else "quick" if args.quick else "full"]
    start = time.perf_counter()
    result = run(args.out, budget)
    print(table(result, budget.epochs))
    print(f"wrote {args.out / 'convergence.png'} ({time.perf_counter() - start:.0f} s)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
