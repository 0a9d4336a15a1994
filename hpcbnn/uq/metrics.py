"""Uncertainty metrics of a Bayesian predictive, reducible over data-parallel ranks.

Every metric is computed in two steps so that there is a single code path for one process
and for many: `*_sums` turns a shard of the full S-sample predictive into additive statistics
(sums and counts, float64), those are summed over the data communicator (`allreduce_sums`),
and `finalize_*` turns the totals into plain JSON-serialisable numbers. The one-process
`classification_metrics` / `regression_metrics` are exactly `finalize(sums(...))`.

The predictive is the Bayesian model average: the uniform mixture of the S per-sample
predictives. Regression calibration is measured through the probability integral transform
(PIT) u = F(y) of that mixture: y lies in the central interval of level a iff
|u - 1/2| <= a/2, so one PIT histogram yields the coverage at every level and the
calibration curve without solving for mixture quantiles.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

Sums = dict[str, Tensor]

PIT_BINS = 1000  # coverage levels resolve to 2 / PIT_BINS = 0.002
CURVE_LEVELS = tuple(i / 20 for i in range(21))
COVERAGE_LEVELS = (0.5, 0.9, 0.95)
_PAIR_BUDGET = 1 << 18  # elements of the pairwise CRPS term held at once (fits in cache)
_F64 = torch.float64


def classification_sums(probs: Tensor, y: Tensor, bins: int = 15) -> Sums:
    """Additive statistics of `probs` [S, N, C] (per-sample class probabilities), `y` [N].

    Reliability bins are equal-width in the confidence of the averaged predictive,
    right-closed (lo, hi] with the first one [0, 1/bins].
    """
    if probs.dim() != 3 or y.shape != probs.shape[1:2]:
        raise ValueError(f"expected probs [S, N, C] and y [N], got {tuple(probs.shape)} and {tuple(y.shape)}")
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    p = probs.to(_F64)
    y = y.long()
    average = p.mean(0)
    confidence, predicted = average.max(-1)
    correct = (predicted == y).to(_F64)
    true_class = average.gather(-1, y[:, None]).squeeze(-1)
    one_hot = torch.nn.functional.one_hot(y, p.shape[-1]).to(_F64)
    edges = torch.arange(1, bins, dtype=_F64, device=p.device) / bins
    bin_index = torch.bucketize(confidence, edges)

    def per_bin(values: Tensor) -> Tensor:
        return torch.zeros(bins, dtype=_F64, device=p.device).index_add_(0, bin_index, values)

    return {
        "count": torch.tensor(float(y.numel()), dtype=_F64, device=p.device),
        "correct": correct.sum(),
        "nll": -true_class.clamp_min(torch.finfo(_F64).tiny).log().sum(),
        "brier": (average - one_hot).square().sum(),
        "entropy": _entropy(average).sum(),
        "expected_entropy": _entropy(p).mean(0).sum(),
        "bin_count": per_bin(torch.ones_like(confidence)),
        "bin_confidence": per_bin(confidence),
        "bin_correct": per_bin(correct),
    }


def finalize_classification(sums: Sums) -> dict[str, Any]:
    """Metrics per example from (reduced) `classification_sums`.

    Brier is the squared distance summed over classes; the mutual information between
    prediction and weights (the epistemic part) is entropy minus expected entropy.
    """
    n = _total(sums, "count")
    value = {key: float(sums[key]) / n for key in ("correct", "nll", "brier", "entropy", "expected_entropy")}
    count, confidence, correct = (sums[k].double().cpu() for k in ("bin_count", "bin_confidence", "bin_correct"))
    bins = count.numel()
    ece = float((correct - confidence).abs().sum()) / n
    filled = count > 0
    return {
        "count": int(n),
        "accuracy": value["correct"],
        "nll": value["nll"],
        "brier": value["brier"],
        "ece": ece,
        "entropy": value["entropy"],
        "expected_entropy": value["expected_entropy"],
        "mutual_information": value["entropy"] - value["expected_entropy"],
        "reliability": {
            "edges": [i / bins for i in range(bins + 1)],
            "confidence": _per_filled_bin(confidence, count, filled),
            "accuracy": _per_filled_bin(correct, count, filled),
            "count": [int(c) for c in count],
            "ece": ece,
        },
    }


def classification_metrics(probs: Tensor, y: Tensor, bins: int = 15) -> dict[str, Any]:
    return finalize_classification(classification_sums(probs, y, bins))


def regression_sums(mean: Tensor, std: Tensor, y: Tensor) -> Sums:
    """Additive statistics of per-sample Gaussians `mean`, `std` [S, N, d] for targets `y` [N, d].

    The NLL is the joint one of the d outputs of an example under the mixture (the same
    weight sample for all outputs); RMSE, CRPS and the PIT are per output element. The
    CRPS is the exact closed form for the S-component mixture (Grimit et al. 2006).
    """
    if mean.dim() != 3 or std.shape != mean.shape or y.shape != mean.shape[1:]:
        raise ValueError(
            f"expected mean, std [S, N, d] and y [N, d], got {tuple(mean.shape)}, "
            f"{tuple(std.shape)} and {tuple(y.shape)}"
        )
    if not bool((std > 0).all()):
        raise ValueError("predictive std must be positive everywhere")
    m, s, y = mean.to(_F64), std.to(_F64), y.to(_F64)
    samples, n, d = m.shape
    z = (y - m) / s
    log_density = (-0.5 * z.square() - s.log() - 0.5 * math.log(2 * math.pi)).sum(-1)
    nll = math.log(samples) - torch.logsumexp(log_density, 0)
    pit = torch.special.ndtr(z).mean(0)
    pit_bin = (pit * PIT_BINS).long().clamp_(0, PIT_BINS - 1).reshape(-1)
    return {
        "examples": torch.tensor(float(n), dtype=_F64, device=m.device),
        "elements": torch.tensor(float(n * d), dtype=_F64, device=m.device),
        "squared_error": (m.mean(0) - y).square().sum(),
        "nll": nll.sum(),
        "crps": _mixture_crps(m, s, y).sum(),
        "pit": torch.bincount(pit_bin, minlength=PIT_BINS).to(_F64),
    }


def finalize_regression(sums: Sums, levels: tuple[float, ...] = COVERAGE_LEVELS) -> dict[str, Any]:
    """RMSE of the mixture mean, NLL per example, CRPS per element, coverage and its curve."""
    elements = _total(sums, "elements")
    pit = sums["pit"].double().cpu()
    return {
        "count": int(_total(sums, "examples")),
        "rmse": math.sqrt(float(sums["squared_error"]) / elements),
        "nll": float(sums["nll"]) / _total(sums, "examples"),
        "crps": float(sums["crps"]) / elements,
        "coverage": {f"{a:g}": _coverage(pit, a, elements) for a in levels},
        "calibration": {"nominal": list(CURVE_LEVELS), "observed": [_coverage(pit, a, elements) for a in CURVE_LEVELS]},
    }


def regression_metrics(
    mean: Tensor, std: Tensor, y: Tensor, levels: tuple[float, ...] = COVERAGE_LEVELS
) -> dict[str, Any]:
    return finalize_regression(regression_sums(mean, std, y), levels)


def allreduce_sums(sums: Sums, comm: Any) -> Sums:
    """Sum `sums` over an mpi4py communicator (e.g. the grid's data communicator) in one call."""
    keys = sorted(sums)
    local = torch.cat([sums[k].detach().to("cpu", _F64).reshape(-1) for k in keys]).numpy()
    total = np.empty_like(local)
    comm.Allreduce(local, total)
    parts = torch.from_numpy(total).split([sums[k].numel() for k in keys])
    return {k: part.reshape(sums[k].shape) for k, part in zip(keys, parts)}


def _entropy(p: Tensor) -> Tensor:
    return -torch.special.xlogy(p, p).sum(-1)


def _total(sums: Sums, key: str) -> float:
    n = float(sums[key])
    if n <= 0:
        raise ValueError("no examples to evaluate: the metric sums are empty")
    return n


def _per_filled_bin(total: Tensor, count: Tensor, filled: Tensor) -> list[float | None]:
    """Bin means, None for empty bins (a mean of nothing is not zero)."""
    return [float(t / c) if f else None for t, c, f in zip(total, count, filled)]


def _coverage(pit_hist: Tensor, level: float, elements: float) -> float:
    edge = (1 - level) / 2 * PIT_BINS
    lo = round(edge)
    if not 0 <= level <= 1 or abs(edge - lo) > 1e-6:
        raise ValueError(f"coverage level {level} must lie in [0, 1] on a grid of {2 / PIT_BINS:g}")
    return float(pit_hist[lo : PIT_BINS - lo].sum()) / elements


def _abs_moment(mu: Tensor, var: Tensor) -> Tensor:
    """E|X| for X ~ N(mu, var)."""
    sd = var.sqrt()
    z = mu / sd
    return sd * math.sqrt(2 / math.pi) * torch.exp(-0.5 * z.square()) + mu * torch.erf(z / math.sqrt(2))


def _mixture_crps(m: Tensor, s: Tensor, y: Tensor) -> Tensor:
    """CRPS = E|X - y| - E|X - X'| / 2 of the uniform Gaussian mixture, per element [N, d].

    E|X - X'| averages the S^2 component pairs: the S equal ones are E|N(0, 2 s^2)| =
    2 s / sqrt(pi), the others are symmetric and evaluated once, in cache-sized chunks.
    """
    samples, _, d = m.shape
    var = s.square()
    near = _abs_moment(y - m, var).mean(0)
    i, j = torch.triu_indices(samples, samples, 1, device=m.device)
    chunk = max(1, _PAIR_BUDGET // max(1, len(i) * d))
    pairs = torch.cat(
        [_abs_moment(mc[i] - mc[j], vc[i] + vc[j]).sum(0) for mc, vc in zip(m.split(chunk, 1), var.split(chunk, 1))]
    )
    spread = (2 * pairs + 2 / math.sqrt(math.pi) * s.sum(0)) / samples**2
    return near - 0.5 * spread
