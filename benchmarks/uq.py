"""Does the uncertainty pay? hpcbnn's BNN against a deterministic net and a deep ensemble, in one harness.

    python -m benchmarks.uq [--quick | --smoke] [--seeds N] [--folds F] [--out runs/uq]
    python -m benchmarks.uq --tune [--round 2|3|4|5|6] [--folds F]  # the validation-split studies (docs/uq.md)

Protocols, on scikit-learn's bundled digits with hpcbnn's train/val/test split (inputs
standardised with the training split's statistics, as the loader does):
  heldout   train on classes 0-4; out of distribution (OOD): the images of classes 5-9
  rotated   train on all classes; OOD: the same images rotated by 90 degrees (as hpcbnn.train's
            default OOD set); digits that look alike rotated (0, 1, 8) cap the attainable AUROC
  inverted  (with --protocols) the same, OOD: the images inverted (16 - pixel), far from the data
Every method trains the MLP 64-128-128 for the same epochs, batch and schedule, with the
library: `bayesianize`, `sampling`, `categorical_loglik`, `elbo_loss`, `kl_divergence`,
`make_optimizer`, `make_schedule`. The BNN takes every variational setting from
`hpcbnn.run.config.Config()` (what `python -m hpcbnn.train` uses); the deterministic net
is MAP with weight decay, the ensemble 5 of them from different seeds. Hyper-parameters
of the baselines were chosen on the validation split (`--tune` reprints the evidence).

Reported on the test split: accuracy, NLL, ECE, Brier; OOD AUROC and FPR at 95% TPR (of
the in-distribution inputs) scored by max-probability, predictive entropy and mutual
information (MI); accuracy and ECE under Gaussian pixel noise of 5 severities; AURC of
the risk-coverage curve. Means over seeds go to a table, `results.csv` and one PNG per
protocol under --out; the last line printed is one JSON object. With --folds F every method
runs once per fold and seed on F rotations of the split (fold 0 is the standard split), and
each target also gets the BNN's paired lead over its reference, run by run (`runs.csv`).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.fractions import apply_fractions, scale_means
from hpcbnn.bnn.bayesianize import bayesianize, draw_prior_means, resolve_means
from hpcbnn.bnn.layers import ESTIMATORS, INIT_FRACTION, PRIOR_FRACTION, BayesianModule, MeanInit, kl_divergence
from hpcbnn.bnn.models import mlp
from hpcbnn.bnn.noise import sampling
from hpcbnn.bnn.objectives import categorical_loglik, elbo_loss, predictive_loss
from hpcbnn.data.convert import DIGITS_COUNTS, DIGITS_SEED, split_indices
from hpcbnn.optim import make_optimizer, make_schedule
from hpcbnn.run.config import Config
from hpcbnn.uq.metrics import classification_metrics

PROTOCOLS = ("heldout", "rotated")
HIDDEN = [128, 128]
EPOCHS = 60
ENSEMBLE = 5
EVAL_SAMPLES = 32
NOISE_LEVELS = (2.0, 4.0, 6.0, 8.0, 10.0)  # std of the Gaussian pixel noise, in raw pixel units (0..16)
MAP_LR = 1e-3  # chosen on the validation split (--tune): the lowest NLL, mean over the protocols
MAP_WEIGHT_DECAY = 1e-3  # likewise
SCORES = ("maxprob", "entropy", "mi")
FOLDS = 5  # ceil(1797 / 360): folds 0-4 test every digit (fold 4 reuses 3 of fold 0's test digits)
HEADLINE = ("accuracy", "nll", "ece", "brier", "auroc_maxprob", "auroc_entropy", "auroc_mi", "fpr95_mi", "aurc")


@dataclass
class Split:
    x: Tensor
    y: Tensor


@dataclass
class Protocol:
    name: str
    classes: int
    train: Split
    val: Split
    test: Split
    ood_val: Tensor
    ood_test: Tensor
    raw_test: Tensor  # unstandardised test inputs, for the graded shift
    mean: float
    std: float

    def shifted(self, severity: int) -> Tensor:
        """The test inputs with Gaussian pixel noise of level `severity` (1..5), always the same draw."""
        g = torch.Generator().manual_seed(1000 + severity)
        noisy = self.raw_test + NOISE_LEVELS[severity - 1] * torch.randn(self.raw_test.shape, generator=g)
        return (noisy.clamp(0, 16) - self.mean) / self.std


def digits_protocols(names: list[str], fold: int = 0) -> list[Protocol]:
    """The protocols on fold `fold` of the digits: fold 0 is hpcbnn's standard split, fold f moves the test
    part (and the validation part after it) f test-sizes along the same permutation (`split_indices`)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x_all = torch.tensor(digits.data, dtype=torch.float32)
    y_all = torch.tensor(digits.target, dtype=torch.int64)
    test = DIGITS_COUNTS["test"]
    rows = split_indices(len(y_all), DIGITS_COUNTS["val"], test, DIGITS_SEED, offset=fold * test)
    raw = {s: (x_all[torch.as_tensor(r)], y_all[torch.as_tensor(r)]) for s, r in rows.items()}

    def build(name: str, keep: Callable[[Tensor], Tensor], ood: Callable[[str], Tensor], classes: int) -> Protocol:
        parts = {s: (x[keep(y)], y[keep(y)]) for s, (x, y) in raw.items()}
        mean, std = float(parts["train"][0].mean()), float(parts["train"][0].std())
        norm = lambda x: (x - mean) / std  # noqa: E731
        split = {s: Split(norm(x), y) for s, (x, y) in parts.items()}
        return Protocol(
            name,
            classes,
            split["train"],
            split["val"],
            split["test"],
            norm(ood("val")),
            norm(ood("test")),
            parts["test"][0],
            mean,
            std,
        )

    heldout = build("heldout", lambda y: y < 5, lambda s: raw[s][0][raw[s][1] >= 5], 5)
    rotate = lambda s: raw[s][0].view(-1, 8, 8).rot90(1, (1, 2)).reshape(-1, 64)  # noqa: E731
    rotated = build("rotated", lambda y: y >= 0, rotate, 10)
    inverted = build("inverted", lambda y: y >= 0, lambda s: 16.0 - raw[s][0], 10)
    return [p for p in (heldout, rotated, inverted) if p.name in names]


@dataclass
class Variational:
    """The BNN's settings; the defaults are the library's (Config and bayesianize)."""

    estimator: str = Config.estimator
    components: int | None = Config.components  # None: one per sample
    prior_scale: Any = Config.prior_scale
    init_std: Any = Config.init_std
    init_fraction: float = INIT_FRACTION  # initial sigma / He std, with init_std "fan_in"
    prior_fraction: float = PRIOR_FRACTION  # prior std / He std, with prior_scale "fan_in"
    rho_lr_scale: float = Config.rho_lr_scale
    kl_weight: float = Config.kl_weight
    kl_warmup: float = 0.0  # fraction of the steps over which the KL weight ramps up linearly
    objective: str = Config.objective
    lr: float = Config.lr
    samples: int = Config.samples
    batch_size: int = Config.batch_size
    eval_samples: int = EVAL_SAMPLES  # of the predictive at evaluation
    means: MeanInit | None = Config.means  # None: bayesianize's default (prior draws for a mixture)
    mean_scale: float = 1.0  # round 6: the initial means multiplied by this (after the draw)
    first_prior_fraction: float | None = None  # round 6: the first layer's prior / He std (None: prior_fraction)


def batches(n: int, batch_size: int, seed: int, epoch: int) -> list[Tensor]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 10_000 + epoch))
    return list(order.split(batch_size))


def fit_bnn(p: Protocol, v: Variational, seed: int, epochs: int) -> nn.Module:
    torch.manual_seed(seed)
    components = v.components or v.samples
    means = resolve_means(v.means, components)
    model = bayesianize(  # the means drawn below, once the prior has v's fraction: the same draws as bayesianize's
        mlp(64, HIDDEN, p.classes),
        prior_scale=v.prior_scale,
        init_std=v.init_std,
        estimator=v.estimator,
        components=components,
        means="module",
    )
    apply_fractions(  # as bayesianize sets them, with v's fractions for INIT_FRACTION and PRIOR_FRACTION
        model,
        v.init_fraction if v.init_std == "fan_in" else None,
        v.prior_fraction if v.prior_scale == "fan_in" else None,
        v.first_prior_fraction,
    )
    draw_prior_means(model, means)
    scale_means(model, v.mean_scale)
    optimizer = make_optimizer(model, "adam", v.lr, rho_lr_scale=v.rho_lr_scale)
    n = len(p.train.y)
    per_epoch = math.ceil(n / v.batch_size)
    total = epochs * per_epoch
    schedule = make_schedule(optimizer, total, per_epoch)
    objective = elbo_loss if v.objective == "elbo" else predictive_loss
    step = 0
    for epoch in range(epochs):
        for idx in batches(n, v.batch_size, seed, epoch):
            x, y = p.train.x[idx], p.train.y[idx]
            with sampling(seed, step, range(v.samples)):
                out = model(x.repeat(v.samples, 1))
            loglik = categorical_loglik(out.view(v.samples, len(idx), -1), y)
            warm = min(1.0, (step + 1) / (v.kl_warmup * total)) if v.kl_warmup else 1.0
            loss = objective(loglik, kl_divergence(model), n, v.kl_weight * warm)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
    return model


def fit_map(
    p: Protocol, seed: int, epochs: int, lr: float = MAP_LR, weight_decay: float = MAP_WEIGHT_DECAY
) -> nn.Module:
    torch.manual_seed(seed)
    model = mlp(64, HIDDEN, p.classes)
    optimizer = make_optimizer(model, "adam", lr, weight_decay=weight_decay)
    n = len(p.train.y)
    per_epoch = math.ceil(n / Config.batch_size)
    schedule = make_schedule(optimizer, epochs * per_epoch, per_epoch)
    for epoch in range(epochs):
        for idx in batches(n, Config.batch_size, seed, epoch):
            loss = F.cross_entropy(model(p.train.x[idx]), p.train.y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return model


Predictor = Callable[[Tensor], Tensor]  # inputs [N, 64] -> per-sample class probabilities [S, N, C]


def bnn_predictor(model: nn.Module, seed: int, samples: int = EVAL_SAMPLES) -> Predictor:
    @torch.no_grad()
    def predict(x: Tensor) -> Tensor:
        with sampling(seed, -1, range(samples)):
            return model(x.repeat(samples, 1)).view(samples, len(x), -1).softmax(-1)

    return predict


def members_predictor(models: list[nn.Module]) -> Predictor:
    @torch.no_grad()
    def predict(x: Tensor) -> Tensor:
        return torch.stack([m(x).softmax(-1) for m in models])

    return predict


def scores(probs: Tensor) -> dict[str, np.ndarray]:
    """Uncertainty scores (higher = less sure) per input: 1 - max-probability, entropy, MI."""
    avg = probs.double().mean(0)
    entropy = -(avg * avg.clamp_min(1e-300).log()).sum(-1)
    expected = -(probs.double() * probs.double().clamp_min(1e-300).log()).sum(-1).mean(0)
    return {"maxprob": (1 - avg.max(-1).values).numpy(), "entropy": entropy.numpy(), "mi": (entropy - expected).numpy()}


def fpr_at_95_tpr(inside: np.ndarray, outside: np.ndarray) -> float:
    """Share of OOD inputs accepted when the threshold accepts 95% of the in-distribution inputs."""
    threshold = np.quantile(inside, 0.95)
    return float((outside <= threshold).mean())


def risk_coverage(probs: Tensor, y: Tensor) -> tuple[np.ndarray, np.ndarray, float]:
    """Error rate of the most confident fraction c of inputs, for every c; AURC is its mean."""
    avg = probs.double().mean(0)
    confidence, predicted = avg.max(-1)
    wrong = (predicted != y).double()[confidence.argsort(descending=True)].numpy()
    k = np.arange(1, len(wrong) + 1)
    risk = np.cumsum(wrong) / k
    return k / len(wrong), risk, float(risk.mean())


def evaluate(
    predict: Predictor, x: Tensor, y: Tensor, ood: Tensor, shifted: list[Tensor] | None = None
) -> tuple[dict[str, float], dict[str, Any]]:
    """Metrics of one trained method, and the arrays the plots need."""
    from sklearn.metrics import roc_auc_score

    probs, probs_ood = predict(x), predict(ood)
    m = classification_metrics(probs, y)
    out: dict[str, float] = {k: m[k] for k in ("accuracy", "nll", "ece", "brier")}
    s_in, s_out = scores(probs), scores(probs_ood)
    labels = np.r_[np.zeros(len(x)), np.ones(len(ood))]
    for name in SCORES:
        if name == "mi" and probs.shape[0] == 1:
            continue  # a single network has no epistemic part
        out[f"auroc_{name}"] = float(roc_auc_score(labels, np.r_[s_in[name], s_out[name]]))
        out[f"fpr95_{name}"] = fpr_at_95_tpr(s_in[name], s_out[name])
    out["mi_in"], out["mi_out"] = float(s_in["mi"].mean()), float(s_out["mi"].mean())
    coverage, risk, out["aurc"] = risk_coverage(probs, y)
    for i, xs in enumerate(shifted or [], start=1):
        ms = classification_metrics(predict(xs), y)
        out[f"shift{i}_accuracy"], out[f"shift{i}_ece"] = ms["accuracy"], ms["ece"]
    arrays = {"mi_in": s_in["mi"], "mi_out": s_out["mi"], "coverage": coverage, "risk": risk, "reliability": m}
    return out, arrays


def sigma_quantiles(model: nn.Module) -> dict[str, float]:
    """Quantiles of all posterior standard deviations, relative to each layer's prior scale."""
    ratios = torch.cat(
        [
            (F.softplus(m.weight_rho.detach()) / m.prior_scale).flatten()
            for m in model.modules()
            if isinstance(m, BayesianModule)
        ]
    )
    q = torch.quantile(ratios, torch.tensor([0.05, 0.5, 0.95]))
    return {"sigma_q05": float(q[0]), "sigma_q50": float(q[1]), "sigma_q95": float(q[2])}


Runs = dict[str, list[dict[str, float]]]  # method -> its test metrics, one dict per (fold, seed), in one order


def run_protocol(
    p: Protocol, seeds: list[int], epochs: int, ensemble: int, estimators: list[str], runs: Runs, arrays: dict
) -> None:
    """Train and test every method once per seed on one fold; appends to `runs`, keeps the first plot arrays."""
    shifted = [p.shifted(s) for s in range(1, len(NOISE_LEVELS) + 1)]

    def record(method: str, predict: Predictor, extra: dict[str, float] | None = None) -> None:
        metrics, plot = evaluate(predict, p.test.x, p.test.y, p.ood_test, shifted)
        runs.setdefault(method, []).append({**metrics, **(extra or {})})
        arrays.setdefault(method, plot)

    for seed in seeds:
        members = [fit_map(p, seed * 100 + i, epochs) for i in range(ensemble)]
        record("deterministic", members_predictor(members[:1]))
        record("ensemble", members_predictor(members))
        for estimator in estimators:
            method = "bnn" if estimator == Config.estimator else f"bnn_{estimator}"
            model = fit_bnn(p, Variational(estimator=estimator), seed, epochs)
            record(method, bnn_predictor(model, seed), sigma_quantiles(model))


def summarise(runs: Runs) -> dict[str, dict[str, float]]:
    """Mean and standard deviation over the runs of every method's metrics."""
    return {
        method: {k: float(np.mean([r[k] for r in rs])) for k in rs[0]}
        | {f"{k}_std": float(np.std([r[k] for r in rs])) for k in rs[0]}
        for method, rs in runs.items()
    }


def plot(p: Protocol, arrays: dict[str, dict], summary: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 4, figsize=(19, 4.2))
    bins = np.linspace(0, max(float(arrays[m]["mi_out"].max()) for m in ("bnn", "ensemble")) + 1e-9, 30)
    for method, color in (("bnn", "C0"), ("ensemble", "C1")):
        ax[0].hist(arrays[method]["mi_in"], bins, color=color, alpha=0.35, label=f"{method} in", density=True)
        ax[0].hist(
            arrays[method]["mi_out"], bins, color=color, histtype="step", lw=2, label=f"{method} OOD", density=True
        )
    ax[0].set(title=f"{p.name}: mutual information", xlabel="MI (nats)", ylabel="density")
    ax[0].legend()
    for method in ("deterministic", "ensemble", "bnn"):
        rel = arrays[method]["reliability"]["reliability"]
        conf = [c for c in rel["confidence"] if c is not None]
        acc = [a for a in rel["accuracy"] if a is not None]
        ax[1].plot(conf, acc, "o-", label=f"{method} (ECE {summary[method]['ece']:.3f})")
        ax[2].plot(
            arrays[method]["coverage"], arrays[method]["risk"], label=f"{method} (AURC {summary[method]['aurc']:.4f})"
        )
        ax[3].plot(
            NOISE_LEVELS,
            [summary[method][f"shift{i}_accuracy"] for i in range(1, len(NOISE_LEVELS) + 1)],
            "o-",
            label=method,
        )
    ax[1].plot([0, 1], [0, 1], "k:", lw=1)
    ax[1].set(title="reliability (test)", xlabel="confidence", ylabel="accuracy")
    ax[2].set(title="risk-coverage (test)", xlabel="coverage", ylabel="error rate among accepted")
    ax[3].set(title="accuracy under pixel noise", xlabel="noise std (pixel units, 0..16)", ylabel="accuracy")
    for a in ax[1:]:
        a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(rows: list[tuple[str, str, dict[str, float]]], keys: tuple[str, ...]) -> str:
    head = f"{'protocol':<10} {'method':<14} " + " ".join(f"{k:>13}" for k in keys)
    lines = [head, "-" * len(head)]
    for proto, method, values in rows:
        cells = " ".join(f"{values[k]:>13.4f}" if k in values else f"{'-':>13}" for k in keys)
        lines.append(f"{proto:<10} {method:<14} {cells}")
    return "\n".join(lines)


def targets(
    bnn: dict[str, float], det: dict[str, float], ens: dict[str, float], best: str
) -> list[tuple[str, float, float, float]]:
    """The issue's targets for a BNN on one protocol: (target, BNN's value, reference, least difference),
    the values signed so that higher is better; `best` is the BNN's best OOD score."""
    return [
        ("NLL below deterministic", -bnn["nll"], -det["nll"], 0.0),
        ("ECE below deterministic", -bnn["ece"], -det["ece"], 0.0),
        (f"AUROC ({best}) above det. max-prob", bnn[f"auroc_{best}"], det["auroc_maxprob"], 0.0),
        ("MI-AUROC >= ensemble's - 0.01", bnn["auroc_mi"], ens["auroc_mi"], -0.01),
        ("accuracy within 0.5 points of det.", bnn["accuracy"], det["accuracy"], -0.005),
    ]


def is_met(lead: float, margin: float) -> bool:
    """Whether a target holds at this lead: "below" and "above" are strict, the tolerances are not."""
    return lead > 0 if margin == 0 else lead >= margin


def best_score(bnn: dict[str, float]) -> str:
    """The BNN's best OOD score by AUROC; its best is what the issue compares with det. max-prob."""
    return max(SCORES, key=lambda k: bnn[f"auroc_{k}"])


def checks(bnn: dict[str, float], det: dict[str, float], ens: dict[str, float]) -> list[tuple[str, float, float, bool]]:
    """The issue's targets for a BNN on one protocol: (target, BNN's value, reference, met)."""
    return [(what, abs(a), abs(b), is_met(a - b, m)) for what, a, b, m in targets(bnn, det, ens, best_score(bnn))]


def paired(runs: Runs, seeds: int) -> list[dict[str, Any]]:
    """Each target judged on the means over runs (as `checks`), with the BNN's lead over its reference
    (higher is better) per run, its mean, a standard error, and the runs in which the target holds.

    The methods of one fold and seed share their data, so the lead removes the split's share of the
    noise. A seed draws the same initial weights in every fold, so the standard error is taken over the
    seeds (each seed's lead averaged over the folds); with one seed, over the folds, which then leaves
    out the spread of the initial weights. `runs` are fold-major: run i is fold i // seeds."""
    mean = summarise(runs)
    best = best_score(mean["bnn"])
    per_run = [targets(b, d, e, best) for b, d, e in zip(runs["bnn"], runs["deterministic"], runs["ensemble"])]
    rows = []
    for i, (what, a, b, met) in enumerate(checks(mean["bnn"], mean["deterministic"], mean["ensemble"])):
        leads = np.array([t[i][1] - t[i][2] for t in per_run])
        groups = leads.reshape(-1, seeds).mean(0) if seeds > 1 else leads
        se = float(groups.std(ddof=1) / math.sqrt(len(groups))) if len(groups) > 1 else None  # JSON has no NaN
        held = sum(is_met(float(x), per_run[0][i][3]) for x in leads)
        rows.append(
            {
                "target": what,
                "bnn": a,
                "reference": b,
                "met": met,
                "lead": float(leads.mean()),
                "se": se,
                "se_over": f"{len(groups)} {'seeds' if seeds > 1 else 'folds'}",
                "runs_met": held,
                "runs": len(leads),
            }
        )
    return rows


def bar(name: str, runs: Runs, seeds: int) -> list[str]:
    """The issue's targets for the default BNN on one protocol, each with its numbers, met / NOT met, and
    the paired lead over the runs."""
    lines = []
    for r in paired(runs, seeds):
        se = "" if r["se"] is None else f" +- {r['se']:.4f} (s.e. over {r['se_over']})"
        verdict = "met" if r["met"] else "NOT met"
        lines.append(
            f"{name:<10} {r['target']:<38} {r['bnn']:.4f} vs {r['reference']:.4f}  {verdict:<8}"
            f" lead {r['lead']:+.4f}{se}, holds in {r['runs_met']} of {r['runs']} runs"
        )
    return lines


def regression_results(quick: bool) -> dict | None:
    """The regression protocol of benchmarks/uq_regression.py, when that module exists."""
    try:
        module = importlib.import_module("benchmarks.uq_regression")
    except ModuleNotFoundError as exc:
        if exc.name != "benchmarks.uq_regression":
            raise
        print("benchmarks.uq: benchmarks/uq_regression.py is absent; no regression protocol")
        return None
    return module.run(quick)


def benchmark(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    epochs = 1 if args.smoke else (30 if args.quick else EPOCHS)
    seeds = list(range(1 if args.smoke or args.quick else args.seeds))
    ensemble = 2 if args.smoke else ENSEMBLE
    began = time.perf_counter()
    estimators = list(dict.fromkeys([Config.estimator, *args.estimators]))  # the default BNN always runs
    runs: dict[str, Runs] = {name: {} for name in args.protocols}
    arrays: dict[str, dict] = {name: {} for name in args.protocols}
    for fold in range(args.folds):
        for p in digits_protocols(args.protocols, fold):
            run_protocol(p, seeds, epochs, ensemble, estimators, runs[p.name], arrays[p.name])
            if args.folds > 1:
                print(f"benchmarks.uq: {p.name} fold {fold} done ({time.perf_counter() - began:.0f} s)", flush=True)
    results = {name: summarise(r) for name, r in runs.items()}
    for p in digits_protocols(args.protocols):
        plot(p, arrays[p.name], results[p.name], out / f"{p.name}.png")
    rows = [(proto, method, values) for proto, methods in results.items() for method, values in methods.items()]
    print(
        f"benchmarks.uq: {args.folds} fold(s) x {len(seeds)} seed(s), {epochs} epochs, ensemble of {ensemble}, "
        f"S_eval={EVAL_SAMPLES}"
    )
    print(table(rows, HEADLINE))
    print()
    shift_keys = tuple(f"shift{i}_{m}" for m in ("accuracy", "ece") for i in range(1, len(NOISE_LEVELS) + 1))
    print(f"graded shift: Gaussian pixel noise of std {NOISE_LEVELS} (pixel units)")
    print(table(rows, shift_keys))
    print()
    print(table(rows, ("mi_in", "mi_out", "fpr95_maxprob", "fpr95_entropy", "sigma_q05", "sigma_q50", "sigma_q95")))
    print()
    print("\n".join(line for name, r in runs.items() for line in bar(name, r, len(seeds))))
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["protocol", "method", "metric", "mean", "std"])
        for proto, method, values in rows:
            for k, v in values.items():
                if not k.endswith("_std"):
                    writer.writerow([proto, method, k, f"{v:.6g}", f"{values[f'{k}_std']:.3g}"])
    with open(out / "runs.csv", "w", newline="") as f:  # every run, for paired comparisons
        writer = csv.writer(f)
        writer.writerow(["protocol", "method", "fold", "seed", "metric", "value"])
        for proto, methods in runs.items():
            for method, per_run in methods.items():
                for i, values in enumerate(per_run):
                    fold, seed = divmod(i, len(seeds))
                    writer.writerows([proto, method, fold, seed, k, f"{v:.9g}"] for k, v in values.items())
    regression = None if args.smoke else regression_results(args.quick)
    if regression is not None:
        module = importlib.import_module("benchmarks.uq_regression")
        print("regression (benchmarks/uq_regression.py):")
        print(module.table(regression) if hasattr(module, "table") else json.dumps(regression, default=float))
    print(f"benchmarks.uq: {time.perf_counter() - began:.0f} s; results.csv and PNGs in {out}")
    report: dict[str, Any] = {
        "protocols": {
            proto: {m: {k: v for k, v in values.items() if not k.endswith("_std")} for m, values in methods.items()}
            for proto, methods in results.items()
        },
        "bar": {name: paired(r, len(seeds)) for name, r in runs.items()},
    }
    if regression is not None:
        report["regression"] = regression
    print(json.dumps(report, default=float))


# Rounds 1-3 ran with the then-default fan-in fractions (prior = He std, sigma0 = 0.1 He), pinned here.
ROUND3 = {"prior_fraction": 1.0, "init_fraction": 0.1, "means": "module"}
SINGLE = ROUND3 | {"components": 1, "lr": 3e-3}  # rounds 1 and 2 compared single posteriors at the then-default lr
OLD = SINGLE | {"prior_scale": 1.0, "init_std": 1e-3, "rho_lr_scale": 1.0, "kl_weight": 1.0}
FAN = SINGLE | {"prior_scale": "fan_in", "init_std": "fan_in", "rho_lr_scale": 1.0, "kl_weight": 1.0}
TUNE_OPTIONS: dict[str, dict[str, Any]] = {
    "old defaults: N(0,1) prior, sigma0 1e-3": OLD,
    "old, rho lr x10": OLD | {"rho_lr_scale": 10.0},
    "old, kl_weight 0.01": OLD | {"kl_weight": 0.01},
    "N(0,1) prior, sigma0 fan_in": OLD | {"init_std": "fan_in"},
    "N(0,1) prior, sigma0 fan_in, rho x10, kl 0.01": OLD
    | {"init_std": "fan_in", "rho_lr_scale": 10.0, "kl_weight": 0.01},
    "fan_in prior, sigma0 1e-3": FAN | {"init_std": 1e-3},
    "fan_in prior, sigma0 fan_in": FAN,
    "fan_in, rho x10": FAN | {"rho_lr_scale": 10.0},
    "fan_in, rho x10, kl 0.1": FAN | {"rho_lr_scale": 10.0, "kl_weight": 0.1},
    "fan_in, rho x10, kl 0.03": FAN | {"rho_lr_scale": 10.0, "kl_weight": 0.03},
    "fan_in, rho x10, kl 0.01": FAN | {"rho_lr_scale": 10.0, "kl_weight": 0.01},
    "fan_in, rho x10, kl 0.003": FAN | {"rho_lr_scale": 10.0, "kl_weight": 0.003},
    "fan_in, rho x10, kl 0.001": FAN | {"rho_lr_scale": 10.0, "kl_weight": 0.001},
    "fan_in, rho x1, kl 0.01": FAN | {"kl_weight": 0.01},
    "fan_in, rho x3, kl 0.01": FAN | {"rho_lr_scale": 3.0, "kl_weight": 0.01},
    "fan_in, rho x3, kl 0.003": FAN | {"rho_lr_scale": 3.0, "kl_weight": 0.003},
    "fan_in, rho x10, kl 0.01, KL warm-up 30%": FAN | {"rho_lr_scale": 10.0, "kl_weight": 0.01, "kl_warmup": 0.3},
    "fan_in, rho x10, kl 0.01, predictive": FAN | {"rho_lr_scale": 10.0, "kl_weight": 0.01, "objective": "predictive"},
    "fan_in, rho x10, kl 0.003, lr 1e-2": FAN | {"rho_lr_scale": 10.0, "kl_weight": 0.003, "lr": 1e-2},
}
MAP_GRID = [(lr, wd) for lr in (1e-3, 3e-3) for wd in (0.0, 1e-4, 1e-3)]
TUNE_KEYS = ("accuracy", "nll", "ece", "auroc_maxprob", "auroc_mi", "mi_out", "sigma_q05", "sigma_q50", "sigma_q95")


def tune(args: argparse.Namespace) -> None:
    """Every option (and the MAP grid, and the ensemble) on the validation split, means over seeds."""
    seeds = list(range(args.seeds))
    for p in digits_protocols(args.protocols):
        found: dict[str, list[dict[str, float]]] = {}
        for seed in seeds:
            for lr, wd in MAP_GRID:
                model = fit_map(p, seed, EPOCHS, lr, wd)
                found.setdefault(f"MAP lr {lr:g} wd {wd:g}", []).append(
                    evaluate(members_predictor([model]), p.val.x, p.val.y, p.ood_val)[0]
                )
            members = [fit_map(p, seed * 100 + i, EPOCHS) for i in range(ENSEMBLE)]
            found.setdefault("ensemble of 5", []).append(
                evaluate(members_predictor(members), p.val.x, p.val.y, p.ood_val)[0]
            )
            for name, options in TUNE_OPTIONS.items():
                model = fit_bnn(p, dataclasses.replace(Variational(), **options), seed, EPOCHS)
                metrics = evaluate(bnn_predictor(model, seed), p.val.x, p.val.y, p.ood_val)[0]
                found.setdefault(name, []).append(metrics | sigma_quantiles(model))
            print(f"benchmarks.uq --tune: {p.name} seed {seed} done", flush=True)
        print(f"validation split of {p.name}, {len(seeds)} seed(s), {EPOCHS} epochs, means over seeds")
        print(f"{'option':<46} " + " ".join(f"{k:>11}" for k in TUNE_KEYS))
        for name, rs in found.items():
            values = {k: float(np.mean([r[k] for r in rs])) for k in rs[0]}
            cells = " ".join(f"{values[k]:>11.4g}" if k in values else f"{'-':>11}" for k in TUNE_KEYS)
            print(f"{name:<46} {cells}", flush=True)


ROUND1 = SINGLE | {"prior_scale": "fan_in", "init_std": "fan_in", "rho_lr_scale": 10.0, "kl_weight": 0.003}
ROUND2_OPTIONS: dict[str, dict[str, Any]] = {
    "rho x10, kl 0.003 (round 1)": ROUND1,
    "rho x10, kl 0.01": ROUND1 | {"kl_weight": 0.01},
    "rho x3, kl 0.003": ROUND1 | {"rho_lr_scale": 3.0},
    "rho x3, kl 0.01": ROUND1 | {"rho_lr_scale": 3.0, "kl_weight": 0.01},
    "rho x3, kl 0.03": ROUND1 | {"rho_lr_scale": 3.0, "kl_weight": 0.03},
    "rho x3, kl 0.003, sigma0 0.3 He": ROUND1 | {"rho_lr_scale": 3.0, "init_fraction": 0.3},
    "rho x3, kl 0.003, local": ROUND1 | {"rho_lr_scale": 3.0, "estimator": "local"},
    "rho x10, kl 0.003, local": ROUND1 | {"estimator": "local"},
}
ROUND2_EVAL_SAMPLES = (8, 128)  # re-scores of the round-1 option's models (training unchanged)
ROUND3_OPTIONS: dict[str, dict[str, Any]] = {
    "1 component (round 2)": ROUND3 | {"components": 1, "lr": 3e-3},
    "4 components": ROUND3 | {"components": 4, "lr": 3e-3},
    "8 components": ROUND3 | {"components": 8, "lr": 3e-3},
    "8 components, lr 1e-3": ROUND3 | {"components": 8, "lr": 1e-3},
    "8 components, lr 1e-3, rho x10": ROUND3 | {"components": 8, "lr": 1e-3, "rho_lr_scale": 10.0},
}
MODULE = {"means": "module"}  # rounds 3-5: torch's initial means (the mixture's default before round 6)
ROUND4_OPTIONS: dict[str, dict[str, Any]] = {  # the round-3 mixture (8 components, lr 1e-3) with other fractions
    "round 3: prior 1 He, sigma0 0.1 He": ROUND3,
    "prior 1 He, sigma0 0.03 He": MODULE | {"prior_fraction": 1.0, "init_fraction": 0.03},
    "prior 1 He, sigma0 0.01 He, rho x1": MODULE | {"prior_fraction": 1.0, "init_fraction": 0.01, "rho_lr_scale": 1.0},
    "prior 2 He, sigma0 0.01 He": MODULE | {"prior_fraction": 2.0, "init_fraction": 0.01},
    "prior 0.7 He, sigma0 0.01 He": MODULE | {"prior_fraction": 0.7, "init_fraction": 0.01},
    "prior 0.5 He, sigma0 0.03 He": MODULE | {"prior_fraction": 0.5, "init_fraction": 0.03},
    "prior 0.5 He, sigma0 0.01 He": MODULE | {"prior_fraction": 0.5, "init_fraction": 0.01},
    "prior 0.5 He, sigma0 0.003 He": MODULE | {"prior_fraction": 0.5, "init_fraction": 0.003},
    "prior 0.35 He, sigma0 0.01 He": MODULE | {"prior_fraction": 0.35, "init_fraction": 0.01},
    "prior 0.25 He, sigma0 0.01 He": MODULE | {"prior_fraction": 0.25, "init_fraction": 0.01},
}
ROUND5_OPTIONS: dict[str, dict[str, Any]] = {  # the prior of round 4's mixture again, on 5 folds' validation parts
    "prior 0.5 He (round 4)": MODULE | {"prior_fraction": 0.5, "init_fraction": 0.01},
    "prior 0.35 He": MODULE | {"prior_fraction": 0.35, "init_fraction": 0.01},
    "prior 0.7 He": MODULE | {"prior_fraction": 0.7, "init_fraction": 0.01},
    "prior 1 He": MODULE | {"prior_fraction": 1.0, "init_fraction": 0.01},
    "prior 0.25 He": MODULE | {"prior_fraction": 0.25, "init_fraction": 0.01},
}
ROUND6_OPTIONS: dict[str, dict[str, Any]] = {  # round 5's mixture (0.7 He): where the means start, layer 1's prior
    "prior 0.7 He (round 5)": MODULE,
    "layer 1 0.25 He, rest 0.7": MODULE | {"first_prior_fraction": 0.25},
    "layer 1 0.35 He, rest 1": MODULE | {"first_prior_fraction": 0.35, "prior_fraction": 1.0},
    "means from the prior": {"means": "prior"},
    "means x2": MODULE | {"mean_scale": 2.0},
    "layer 1 0.25 He, means from prior": {"means": "prior", "first_prior_fraction": 0.25},
}
ROUNDS_RANKED = {4: ROUND4_OPTIONS, 5: ROUND5_OPTIONS, 6: ROUND6_OPTIONS}
RANKED = {
    "classification": (("nll", -1), ("ece", -1), ("auroc_best", 1), ("auroc_mi", 1)),
    "regression": (("nll", -1),),
}


def mean_ranks(means: dict[str, dict[str, float]], options: list[str], kind: str) -> dict[str, float]:
    """Each option's rank (1 is best) on every metric of RANKED[kind], averaged over those metrics."""
    per_metric = []
    for key, sign in RANKED[kind]:
        order = sorted(options, key=lambda o: -sign * means[o][key])
        per_metric.append({o: order.index(o) + 1 for o in options})
    return {o: float(np.mean([r[o] for r in per_metric])) for o in options}


def regression_settings(v: Variational) -> Any:
    """The classification option `v` as benchmarks.uq_regression's settings (it trains with half the samples)."""
    reg = importlib.import_module("benchmarks.uq_regression")
    return reg.Variational(
        kl_weight=v.kl_weight,
        rho_lr_scale=v.rho_lr_scale,
        init_fraction=v.init_fraction,
        prior_fraction=v.prior_fraction,
        estimator=v.estimator,
        samples=v.samples // 2,
    )


def tune_mixtures(args: argparse.Namespace, options: dict[str, dict[str, Any]], label: str) -> dict[str, dict]:
    """Mixture options (the same S = 8 samples per step) against the deterministic net and the ensemble,
    on the validation split of each fold; prints and returns the means over folds and seeds per protocol."""
    seeds = list(range(args.seeds))
    tables: dict[str, dict] = {}
    for name in args.protocols:
        found: dict[str, list[dict[str, float]]] = {}
        for fold, seed in ((f, s) for f in range(args.folds) for s in seeds):
            (p,) = digits_protocols([name], fold)
            members = [fit_map(p, seed * 100 + i, EPOCHS) for i in range(ENSEMBLE)]
            for method, predict in (("MAP (deterministic)", members[:1]), ("ensemble of 5", members)):
                found.setdefault(method, []).append(
                    evaluate(members_predictor(predict), p.val.x, p.val.y, p.ood_val)[0]
                )
            for option, settings in options.items():
                model = fit_bnn(p, dataclasses.replace(Variational(), **settings), seed, EPOCHS)
                metrics = evaluate(bnn_predictor(model, seed), p.val.x, p.val.y, p.ood_val)[0]
                found.setdefault(option, []).append(metrics | sigma_quantiles(model))
            print(f"benchmarks.uq --tune {label}: {name} fold {fold} seed {seed} done", flush=True)
        keys = ("accuracy", "nll", "ece", "auroc_maxprob", "auroc_entropy", "auroc_mi", "mi_in", "mi_out", "sigma_q50")
        runs = f"{args.folds} fold(s) x {len(seeds)} seed(s)"
        print(f"validation split of {name}, {runs}, {EPOCHS} epochs, means over folds and seeds")
        print(f"{'option':<36} " + " ".join(f"{k:>13}" for k in keys))
        means = {o: {k: float(np.mean([r[k] for r in rs])) for k in rs[0]} for o, rs in found.items()}
        for option, values in means.items():
            print(f"{option:<36} " + " ".join(f"{values[k]:>13.4g}" if k in values else f"{'-':>13}" for k in keys))
        tables[name] = means
    return tables


def tune_round3(args: argparse.Namespace) -> None:
    """Round 3: mixture posteriors of K components against the round-2 default (docs/uq.md)."""
    tune_mixtures(args, ROUND3_OPTIONS, "--round 3")


def tune_ranked(args: argparse.Namespace, round_: int, options: dict[str, dict[str, Any]]) -> None:
    """Rounds 4 and 5: mixture options on the validation split; saves <out>/tune<round>_<protocol>.json and
    ranks the options (`rank_mixtures`) once heldout and rotated both exist."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, means in tune_mixtures(args, options, f"--round {round_}").items():
        (out / f"tune{round_}_{name}.json").write_text(json.dumps(means, indent=1))
    rank_mixtures(out, round_, options)


def rank_mixtures(out: Path, round_: int, options: dict[str, dict[str, Any]]) -> None:
    """The rule of rounds 4 and 5: the most of the issue's targets met on the validation split, then the
    lowest mean rank (NLL, ECE, best AUROC, MI-AUROC) within each protocol averaged over the two (round 2's
    rule), then the lower mean validation NLL (added in round 4 when the first two options tied on the rest)."""
    files = {n: out / f"tune{round_}_{n}.json" for n in PROTOCOLS}
    if not all(f.exists() for f in files.values()):
        return
    tables = {n: json.loads(f.read_text()) for n, f in files.items()}
    met = {o: 0 for o in options}
    ranks: dict[str, list[float]] = {o: [] for o in options}
    for means in tables.values():
        for o in options:
            met[o] += sum(c[3] for c in checks(means[o], means["MAP (deterministic)"], means["ensemble of 5"]))
            means[o]["auroc_best"] = max(means[o][f"auroc_{k}"] for k in SCORES)
        for o, r in mean_ranks(means, list(options), "classification").items():
            ranks[o].append(r)
    nll = {o: float(np.mean([t[o]["nll"] for t in tables.values()])) for o in options}
    print(
        f"round {round_}: targets met on validation (of 10), then mean rank (NLL, ECE, best AUROC, MI-AUROC), then NLL"
    )
    print(f"{'option':<36} {'met':>4} {'heldout':>9} {'rotated':>9} {'mean':>7} {'mean nll':>9}")
    for o in sorted(options, key=lambda o: (-met[o], np.mean(ranks[o]), nll[o])):
        r = ranks[o]
        print(f"{o:<36} {met[o]:>4} {r[0]:>9.2f} {r[1]:>9.2f} {np.mean(r):>7.2f} {nll[o]:>9.5f}")


def tune_round2(args: argparse.Namespace) -> None:
    """Round 2: the round-1 default against nearby options on heldout, rotated and diabetes regression (val
    only); saves <out>/tune2_<protocol>.json and, once all three exist, ranks the options (docs/uq.md)."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = list(range(args.seeds))
    for name in args.protocols:
        found: dict[str, list[dict[str, float]]] = {}
        if name == "regression":
            reg = importlib.import_module("benchmarks.uq_regression")
            for option, settings in ROUND2_OPTIONS.items():
                v = dataclasses.replace(Variational(), **settings)
                found[option] = [{"nll": reg.validation_nll(regression_settings(v))}]
                print(f"benchmarks.uq --tune --round 2: regression {option}: {found[option][0]['nll']:.4f}", flush=True)
        else:
            (p,) = digits_protocols([name])
            for seed in seeds:
                members = [fit_map(p, seed * 100 + i, EPOCHS) for i in range(ENSEMBLE)]
                found.setdefault("MAP (deterministic)", []).append(
                    evaluate(members_predictor(members[:1]), p.val.x, p.val.y, p.ood_val)[0]
                )
                found.setdefault("ensemble of 5", []).append(
                    evaluate(members_predictor(members), p.val.x, p.val.y, p.ood_val)[0]
                )
                for option, settings in ROUND2_OPTIONS.items():
                    v = dataclasses.replace(Variational(), **settings)
                    model = fit_bnn(p, v, seed, EPOCHS)
                    metrics = evaluate(bnn_predictor(model, seed, v.eval_samples), p.val.x, p.val.y, p.ood_val)[0]
                    found.setdefault(option, []).append(metrics | sigma_quantiles(model))
                    if settings is ROUND1:
                        for k in ROUND2_EVAL_SAMPLES:
                            metrics = evaluate(bnn_predictor(model, seed, k), p.val.x, p.val.y, p.ood_val)[0]
                            found.setdefault(f"{option}, eval S {k}", []).append(metrics | sigma_quantiles(model))
                print(f"benchmarks.uq --tune --round 2: {name} seed {seed} done", flush=True)
        means = {o: {k: float(np.mean([r[k] for r in rs])) for k in rs[0]} for o, rs in found.items()}
        for values in means.values():
            values["auroc_best"] = max(values.get(f"auroc_{k}", 0.0) for k in SCORES)
        (out / f"tune2_{name}.json").write_text(json.dumps(means, indent=1))
        print(f"validation split of {name}, {len(seeds)} seed(s), {EPOCHS} epochs, means over seeds")
        keys = ("nll",) if name == "regression" else (*TUNE_KEYS, "auroc_best")
        print(f"{'option':<46} " + " ".join(f"{k:>11}" for k in keys))
        for option, values in means.items():
            print(f"{option:<46} " + " ".join(f"{values[k]:>11.4g}" if k in values else f"{'-':>11}" for k in keys))
    rank_round2(out)


def rank_round2(out: Path) -> None:
    """Mean rank over the protocols of each option's mean rank within a protocol (classification: NLL, ECE,
    best AUROC, MI-AUROC; regression: validation NLL); 1 is best. Printed once all three protocols are saved."""
    files = {n: out / f"tune2_{n}.json" for n in ("heldout", "rotated", "regression")}
    if not all(f.exists() for f in files.values()):
        return
    tables = {n: json.loads(f.read_text()) for n, f in files.items()}
    ranks: dict[str, dict[str, float]] = {o: {} for o in ROUND2_OPTIONS}
    for name, means in tables.items():
        kind = "regression" if name == "regression" else "classification"
        for o, r in mean_ranks(means, list(ROUND2_OPTIONS), kind).items():
            ranks[o][name] = r
    print("round 2: mean rank within each protocol (NLL, ECE, best AUROC, MI-AUROC; regression: NLL), then over them")
    print(f"{'option':<46} {'heldout':>9} {'rotated':>9} {'regression':>11} {'mean':>7}")
    for o in sorted(ROUND2_OPTIONS, key=lambda o: np.mean(list(ranks[o].values()))):
        r, mean = ranks[o], float(np.mean(list(ranks[o].values())))
        print(f"{o:<46} {r['heldout']:>9.2f} {r['rotated']:>9.2f} {r['regression']:>11.2f} {mean:>7.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.uq", description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="one seed, 30 epochs (< 5 minutes on 2 cores)")
    mode.add_argument("--smoke", action="store_true", help="one seed, one epoch, ensemble of 2 (for the test)")
    mode.add_argument("--tune", action="store_true", help="compare training options on the validation split")
    parser.add_argument("--round", type=int, default=1, choices=(1, 2, 3, 4, 5, 6), help="which --tune study")
    parser.add_argument("--seeds", type=int, default=3, help="seeds of the full run (means over them)")
    parser.add_argument(
        "--folds",
        type=int,
        default=1,
        choices=range(1, FOLDS + 1),
        metavar=f"1..{FOLDS}",
        help="test parts of the digits, each with its own validation and training parts (fold 0: the standard split)",
    )
    parser.add_argument(
        "--estimators",
        nargs="+",
        default=list(ESTIMATORS),
        choices=ESTIMATORS,
        help="the BNN rows to train (the default estimator's always)",
    )
    parser.add_argument(
        "--protocols",
        nargs="+",
        default=list(PROTOCOLS),
        choices=[*PROTOCOLS, "inverted", "regression"],
        help="which protocols (regression: --tune --round 2 only)",
    )
    parser.add_argument("--out", default="runs/uq", help="where results.csv and the PNGs go")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.tune and args.round not in ROUNDS_RANKED and args.folds > 1:
        parser.error(f"--folds applies to the benchmark and to --tune --round {'/'.join(map(str, ROUNDS_RANKED))}")
    if args.tune and args.round in ROUNDS_RANKED:
        tune_ranked(args, args.round, ROUNDS_RANKED[args.round])
    elif args.tune:
        {1: tune, 2: tune_round2, 3: tune_round3}[args.round](args)
    else:
        benchmark(args)


if __name__ == "__main__":
    main()
