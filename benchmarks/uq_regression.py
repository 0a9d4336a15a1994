"""Does the BNN's regression uncertainty pay? The default BNN against a deterministic net and a deep ensemble.

    python -m benchmarks.uq_regression [--quick | --smoke]

Data: scikit-learn's bundled diabetes set (442 x 10, one target), split 60/20/20 by
`split_indices` with seeds 0..splits-1 (seed 0 is the split of `python -m hpcbnn.data
diabetes`); inputs and targets standardised with the training split's statistics. Every
method is the same MLP 10-50-2 with a heteroscedastic Gaussian head (mean, raw scale),
trained with Adam on batches of 32 for the same number of epochs:

- bnn: `bayesianize` with the library defaults, the ELBO with K weight samples per step
  inside `sampling`, predictive = the mixture of S samples;
- deterministic: Gaussian NLL, MAP with weight decay (coupled L2, i.e. a Gaussian prior);
- ensemble: 5 deterministic nets from different initialisations and batch orders, with the
  deterministic net's chosen settings, predictive = their mixture.

After every epoch each run is scored on the validation split, and it keeps its parameters
from the epoch with the best validation NLL (stopping 50 epochs after it, the budget's
patience); the learning rate (and the weight decay) of each method is the one whose best
validation NLL is lowest. The test split is only used for the reported metrics
(`hpcbnn.uq.metrics.regression_metrics`, in the target's original units), averaged over the
splits with their standard error.

The harness is not tied to diabetes: `Split.from_arrays` standardises any [N, F] inputs and
[N, d] targets, and `evaluate_split(split, budget, seed, hidden=...)` runs the three methods
on it with a d-output Gaussian head (benchmarks/electricity.py uses it for a forecast).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

import hpcbnn
from benchmarks.fractions import apply_fractions
from hpcbnn.bnn.layers import INIT_FRACTION, PRIOR_FRACTION, Estimator
from hpcbnn.bnn.models import mlp
from hpcbnn.bnn.objectives import DEFAULT_KL_WEIGHT, gaussian_params
from hpcbnn.data.convert import DIABETES_COUNTS, diabetes_arrays, split_indices
from hpcbnn.optim import make_optimizer
from hpcbnn.optim.optimizers import RHO_LR_SCALE
from hpcbnn.uq.metrics import regression_metrics

DATASET = "diabetes"
HIDDEN = (50,)
BATCH = 32
TRAIN_SAMPLES = 4  # weight samples per ELBO step
EVAL_SAMPLES = 64  # weight samples of the BNN's predictive
MEMBERS = 5
PATIENCE = 50  # epochs without a better validation NLL before a run stops
METHODS = ("bnn", "deterministic", "ensemble")
KEYS = ("rmse", "nll", "crps", "coverage_50", "coverage_90", "coverage_95")


@dataclass(frozen=True)
class Budget:
    splits: int
    epochs: int
    lrs: tuple[float, ...]
    weight_decays: tuple[float, ...]
    patience: int = PATIENCE


BUDGETS = {
    "full": Budget(splits=5, epochs=300, lrs=(3e-3, 1e-2, 3e-2), weight_decays=(1e-2, 3e-2, 1e-1, 3e-1)),
    "quick": Budget(splits=2, epochs=150, lrs=(3e-3, 1e-2), weight_decays=(3e-2, 1e-1)),
    "smoke": Budget(splits=1, epochs=5, lrs=(1e-2,), weight_decays=(1e-1,)),
}


@dataclass(frozen=True)
class Variational:
    """The BNN's settings; the defaults are the library's (`benchmarks.uq --tune --round 2` varies them)."""

    kl_weight: float = DEFAULT_KL_WEIGHT
    rho_lr_scale: float = RHO_LR_SCALE
    init_fraction: float = INIT_FRACTION  # initial sigma / He std
    prior_fraction: float = PRIOR_FRACTION  # prior std / He std
    estimator: Estimator = "reparam"
    samples: int = TRAIN_SAMPLES


@dataclass(frozen=True)
class Split:
    """Standardised inputs [N, F] and targets [N, d] per split, and the target scale to undo it
    (per target column, [d], so that it broadcasts against outputs [..., N, d])."""

    x: dict[str, Tensor]
    y: dict[str, Tensor]
    y_mean: Tensor
    y_std: Tensor

    @classmethod
    def from_arrays(cls, x: Mapping[str, np.ndarray], y: Mapping[str, np.ndarray]) -> Split:
        """Arrays x [N, F] and y [N, d] (or [N]) per split, standardised with the training split's
        per-column mean and std (a constant column is only centred)."""
        x = {s: v.reshape(len(v), -1) for s, v in x.items()}
        y = {s: v.reshape(len(v), -1) for s, v in y.items()}
        x_mean, x_std = x["train"].mean(0), _nonzero(x["train"].std(0))
        y_mean, y_std = y["train"].mean(0), _nonzero(y["train"].std(0))
        return cls(
            x={s: torch.from_numpy((v - x_mean) / x_std) for s, v in x.items()},
            y={s: torch.from_numpy((v - y_mean) / y_std) for s, v in y.items()},
            y_mean=torch.from_numpy(np.asarray(y_mean)),
            y_std=torch.from_numpy(np.asarray(y_std)),
        )


def _nonzero(std: np.ndarray) -> np.ndarray:
    return np.where(std > 0, std, np.ones_like(std))


def load_split(seed: int) -> Split:
    x, y = diabetes_arrays()
    rows = split_indices(len(y), DIABETES_COUNTS["val"], DIABETES_COUNTS["test"], seed)
    return Split.from_arrays({s: x[r] for s, r in rows.items()}, {s: y[r] for s, r in rows.items()})


def build(
    in_features: int, bayesian: bool, seed: int, v: Variational, hidden: Sequence[int] = HIDDEN, targets: int = 1
) -> nn.Module:
    """The MLP in_features-hidden-(2 * targets): a Gaussian head (mean, raw scale) per target."""
    torch.manual_seed(seed)
    model = mlp(in_features, tuple(hidden), 2 * targets)
    if not bayesian:
        return model
    model = hpcbnn.bayesianize(model, estimator=v.estimator)
    apply_fractions(model, v.init_fraction, v.prior_fraction)
    return model


def predict(model: nn.Module, x: Tensor, bayesian: bool, seed: int) -> Tensor:
    """Head outputs [S, N, 2d] of the predictive's components: EVAL_SAMPLES weight samples of a BNN, else 1."""
    with torch.no_grad():
        if not bayesian:
            return model(x)[None]
        with hpcbnn.sampling(seed, -1, range(EVAL_SAMPLES)):  # step -1: noise no training step used
            return model(x.repeat(EVAL_SAMPLES, 1)).view(EVAL_SAMPLES, len(x), -1)


def train(
    split: Split,
    bayesian: bool,
    lr: float,
    weight_decay: float,
    seed: int,
    budget: Budget,
    v: Variational,
    hidden: Sequence[int] = HIDDEN,
) -> tuple[nn.Module, int, float]:
    """One run; returns the model at its best validation epoch, that epoch and its validation NLL."""
    x, y = split.x["train"], split.y["train"]
    model = build(x.shape[1], bayesian, seed, v, hidden, y.shape[1])
    optimizer = make_optimizer(model, "adam", lr, weight_decay=weight_decay, rho_lr_scale=v.rho_lr_scale)
    order = torch.Generator().manual_seed(seed)
    best: tuple[float, int, dict[str, Tensor]] = (math.inf, 0, {})
    step = 0
    for epoch in range(1, budget.epochs + 1):
        for rows in torch.randperm(len(y), generator=order).split(BATCH):
            k = v.samples if bayesian else 1
            with hpcbnn.sampling(seed, step, range(k)) if bayesian else nullcontext():
                out = model(x[rows].repeat(k, 1)).view(k, len(rows), -1)
            loglik = hpcbnn.gaussian_loglik(out, y[rows])
            if bayesian:
                loss = hpcbnn.elbo_loss(loglik, hpcbnn.kl_divergence(model), len(y), v.kl_weight)
            else:
                loss = -loglik.mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
        loglik = hpcbnn.gaussian_loglik(predict(model, split.x["val"], bayesian, seed), split.y["val"])
        nll = float(hpcbnn.predictive_loss(loglik, torch.zeros(()), len(y)))  # the mixture's NLL per example
        if nll < best[0]:
            best = (nll, epoch, copy.deepcopy(model.state_dict()))
        elif epoch - best[1] >= budget.patience:
            break
    model.load_state_dict(best[2])
    return model, best[1], best[0]


def select(
    split: Split,
    bayesian: bool,
    seed: int,
    budget: Budget,
    v: Variational = Variational(),
    hidden: Sequence[int] = HIDDEN,
) -> tuple[nn.Module, dict[str, float]]:
    """The run whose best validation NLL is lowest over the learning rates (and weight decays)."""
    decays = (0.0,) if bayesian else budget.weight_decays
    runs = [(train(split, bayesian, lr, wd, seed, budget, v, hidden), lr, wd) for lr in budget.lrs for wd in decays]
    (model, epoch, nll), lr, wd = min(runs, key=lambda r: r[0][2])
    return model, {"lr": lr, "weight_decay": wd, "epochs": epoch, "val_nll": nll}


def test_metrics(split: Split, out: Tensor) -> dict[str, float]:
    """The six reported metrics of the S-Gaussian mixture of `out` [S, N, 2d], in the target's original units."""
    mean, std = gaussian_params(out)
    m = regression_metrics(
        mean * split.y_std + split.y_mean, std * split.y_std, split.y["test"] * split.y_std + split.y_mean
    )
    return {
        "rmse": m["rmse"],
        "nll": m["nll"],
        "crps": m["crps"],
        **{f"coverage_{round(100 * float(a))}": v for a, v in m["coverage"].items()},
    }


def predictives(
    split: Split, budget: Budget, seed: int, hidden: Sequence[int] = HIDDEN, members: int = MEMBERS
) -> tuple[dict[str, Tensor], dict[str, dict[str, float]]]:
    """Test-split head outputs [S, N, 2d] of the methods trained with `seed` (the ensemble only when
    `members` > 1), and the settings chosen on validation for the BNN and the deterministic net."""
    x = split.x["test"]
    bnn, bnn_choice = select(split, True, seed, budget, hidden=hidden)
    det, det_choice = select(split, False, seed, budget, hidden=hidden)
    lr, wd = det_choice["lr"], det_choice["weight_decay"]
    nets = [
        det,
        *(
            train(split, False, lr, wd, seed + 1000 * (i + 1), budget, Variational(), hidden)[0]
            for i in range(members - 1)
        ),
    ]
    ensemble = torch.cat([predict(m, x, False, seed) for m in nets])
    outputs = {"bnn": predict(bnn, x, True, seed), "deterministic": ensemble[:1]}
    if members > 1:
        outputs["ensemble"] = ensemble
    return outputs, {"bnn": bnn_choice, "deterministic": det_choice}


def evaluate_split(
    split: Split, budget: Budget, seed: int, hidden: Sequence[int] = HIDDEN, members: int = MEMBERS
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """Test metrics and the chosen settings of the methods on `split`, trained with `seed`."""
    outputs, choices = predictives(split, budget, seed, hidden, members)
    return {method: test_metrics(split, out) for method, out in outputs.items()}, choices


def run(quick: bool = False, smoke: bool = False) -> dict:
    """The protocol at the full, quick or smoke budget; metrics are means over the splits."""
    budget = BUDGETS["smoke" if smoke else "quick" if quick else "full"]
    per_split, choices = zip(*(evaluate_split(load_split(seed), budget, seed) for seed in range(budget.splits)))
    result: dict = {"dataset": DATASET, "splits": budget.splits, "epochs": budget.epochs}
    stderr = {}
    for method in METHODS:
        values = {k: np.array([m[method][k] for m in per_split]) for k in KEYS}
        result[method] = {k: float(v.mean()) for k, v in values.items()}
        stderr[method] = {
            k: float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else None for k, v in values.items()
        }
    result["stderr"] = stderr
    result["selected"] = {method: [c[method] for c in choices] for method in ("bnn", "deterministic")}
    return result


def validation_nll(v: Variational, quick: bool = False) -> float:
    """The BNN's best validation NLL with settings `v`, mean over the splits (for tuning; no test data)."""
    budget = BUDGETS["quick" if quick else "full"]
    nlls = [select(load_split(seed), True, seed, budget, v)[1]["val_nll"] for seed in range(budget.splits)]
    return float(np.mean(nlls))


def table(result: dict) -> str:
    """The methods as rows, mean +- standard error over the splits, then the settings chosen on validation."""
    lines = [
        f"{result['dataset']}: {result['splits']} split(s), at most {result['epochs']} epochs; "
        "RMSE and CRPS in target units, NLL per example",
        f"{'method':<14}" + "".join(f"{k:>17}" for k in KEYS),
    ]
    for method in METHODS:
        se = result["stderr"][method]
        cells = (f"{result[method][k]:.3f}" + (f" +-{se[k]:.3f}" if se[k] is not None else "") for k in KEYS)
        lines.append(f"{method:<14}" + "".join(f"{c:>17}" for c in cells))
    return "\n".join([*lines, *chosen_lines(result)])


def chosen_lines(result: dict) -> list[str]:
    """One line per method: the settings chosen on validation, per split (or seed)."""
    return [
        f"chosen on validation, {method}: "
        + ", ".join(f"lr {c['lr']:g} wd {c['weight_decay']:g} epoch {c['epochs']}" for c in chosen)
        for method, chosen in result["selected"].items()
    ]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="2 splits, 150 epochs, a smaller grid (< 90 s)")
    size.add_argument("--smoke", action="store_true", help="1 split, a few epochs: checks that it runs (< 20 s)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    result = run(quick=args.quick, smoke=args.smoke)
    print(table(result))
    print(f"({time.perf_counter() - start:.0f} s)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
