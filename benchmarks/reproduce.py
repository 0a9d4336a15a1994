"""The sampling-parallelism paper's three claims, reproduced with hpcbnn (docs/reproduction.md).

    python -m benchmarks.reproduce [--quick | --smoke] [--out runs/reproduce]
    python -m benchmarks.reproduce --ranks 1 2 4 8 16 --launcher "srun --mpi=pmix"   # on a cluster

1. Augmentation diversity: per-sample vs per-rank vs shared augmentation randomness in
   sample mode on 4 ranks, epochs to a validation target (`benchmarks.convergence`).
2. The MLP on an electricity load series: a day-ahead forecast of Taylor's half-hourly
   demand of England and Wales, the BNN against a deterministic net (`benchmarks.electricity`).
3. The scaling figure: weak and strong scaling of sample, data and hybrid mode, against the
   machine ceiling (`benchmarks.scaling`), beside the paper group's published measurements.

Writes each part's files under OUT/<part>/, the three figures (convergence.png,
forecast.png, scaling.png) and reproduce.json into OUT, prints each part's table, and
prints that JSON as the last line. Measured on 2 cores: the full run 605 s, --quick 341 s
(20 epochs, 1 electricity seed, 5 timed steps); --smoke (1 epoch, 1 step) only checks that
everything runs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import convergence, electricity, scaling

# torch_blue's experiments/outputs/scaling.csv (the same group, a CIFAR-10 CNN): efficiency at P GPUs.
REFERENCE = {
    "source": "torch_blue experiments/outputs/scaling.csv, CIFAR-10 CNN",
    "weak_sample": {"2": 0.992, "4": 0.991, "8": 0.988, "16": 0.969},
    "strong_data_16": [0.97, 0.99],
    "strong_sample_16": [0.27, 0.74],
}


@dataclass(frozen=True)
class Budget:
    name: str
    scaling_steps: int
    scaling_warmup: int
    scaling_modes: tuple[str, ...]


BUDGETS = {
    "full": Budget("full", scaling_steps=10, scaling_warmup=2, scaling_modes=scaling.MODES),
    "quick": Budget("quick", scaling_steps=5, scaling_warmup=1, scaling_modes=scaling.MODES),
    "smoke": Budget("smoke", scaling_steps=1, scaling_warmup=1, scaling_modes=("sample",)),
}


def run(out: Path, budget: Budget, ranks: list[int], launcher: str) -> dict[str, Any]:
    """The three parts in order; their figures copied into `out`, the summary written to out/reproduce.json."""
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    quick, smoke = budget.name == "quick", budget.name == "smoke"
    # 1. Augmentation diversity: 4-rank training runs, one per mode and seed.
    converged = convergence.run(out / "convergence", convergence.BUDGETS[budget.name])
    print(convergence.table(converged, convergence.BUDGETS[budget.name].epochs), flush=True)
    # 2. The electricity MLP: converted with `python -m hpcbnn.data csv`, trained in one process per method.
    forecast = electricity.run(out / "electricity", quick=quick, smoke=smoke)
    print(electricity.table(forecast), flush=True)
    # 3. The scaling figure: one launch per configuration, and the machine ceiling per P.
    scaled = scaling.run(
        ranks=ranks,
        modes=budget.scaling_modes,
        steps=budget.scaling_steps,
        warmup=budget.scaling_warmup,
        launcher=launcher,
        out=out / "scaling",
    )
    print(scaling.table(scaled), flush=True)
    for part, figure in (
        ("convergence", "convergence.png"),
        ("electricity", "forecast.png"),
        ("scaling", "scaling.png"),
    ):
        shutil.copy(out / part / figure, out / figure)
    result = {
        "budget": budget.name,
        "convergence": converged,
        "electricity": forecast,
        "scaling": {**scaled, "reference": REFERENCE},
        "seconds": time.perf_counter() - start,
    }
    (out / "reproduce.json").write_text(json.dumps(result, indent=1))
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.reproduce", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="fewer epochs, seeds and steps (about 6 minutes on 2 cores)")
    size.add_argument("--smoke", action="store_true", help="1 epoch, 1 seed, 1 step: checks that it runs")
    parser.add_argument("--out", type=Path, default=Path("runs/reproduce"))
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2], help="scaling: rank counts (must include 1)")
    parser.add_argument(
        "--launcher", default=scaling.DEFAULT_LAUNCHER, help="scaling: mpirun ... (-np P) or srun ... (-n P)"
    )
    args = parser.parse_args(argv)
    budget = BUDGETS["smoke" if args.smoke else "quick" if args.quick else "full"]
    result = run(args.out, budget, args.ranks, args.launcher)
    print(f"wrote {args.out}/reproduce.json, convergence.png, forecast.png, scaling.png ({result['seconds']:.0f} s)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
