"""Out-of-distribution detection and selective prediction, exact on any grid.

These metrics rank examples, so they are not sums: the per-example scores (a few floats
per example) are gathered over the data communicator (`gather`) and every rank computes
the metric from all of them. That is exact, not a histogram approximation: on one rank
`auroc` equals scikit-learn's `roc_auc_score` and `fpr_at_tpr` its `roc_curve`.

Scores of the Bayesian model average p = mean_s p_s (`uncertainty_scores`):

- `maxprob`: max_c p_c, the confidence (low means OOD);
- `entropy`: H[p], the total predictive uncertainty (high means OOD);
- `mi`: H[p] - mean_s H[p_s], the mutual information between prediction and weights,
  the epistemic part that a deterministic network does not have (high means OOD).

    inside = gather(uncertainty_scores(probs_in), grid.data_comm)
    outside = gather(uncertainty_scores(probs_out), grid.data_comm)
    ood_detection(inside, outside)["auroc_mi"]
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

SCORES = ("maxprob", "entropy", "mi")
HIGHER_MEANS_OOD = {"maxprob": False, "entropy": True, "mi": True}
TPR_LEVEL = 0.95
HISTOGRAM_BINS = 40
CURVE_POINTS = 101


def uncertainty_scores(probs: Tensor) -> dict[str, np.ndarray]:
    """Per-example scores (float64 [N] each) of per-sample class probabilities `probs` [S, N, C].

    >>> p = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # two samples that disagree completely
    >>> {k: round(float(v[0]), 4) for k, v in uncertainty_scores(p).items()}
    {'maxprob': 0.5, 'entropy': 0.6931, 'mi': 0.6931}
    """
    if probs.dim() != 3:
        raise ValueError(f"expected probs [S, N, C], got {tuple(probs.shape)}")
    p = probs.detach().to(torch.float64)
    average = p.mean(0)
    entropy = _entropy(average)
    return {
        "maxprob": average.max(-1).values.cpu().numpy(),
        "entropy": entropy.cpu().numpy(),
        "mi": (entropy - _entropy(p).mean(0)).clamp_min(0).cpu().numpy(),  # >= 0 in exact arithmetic
    }


def gather(local: dict[str, np.ndarray], comm: Any) -> dict[str, np.ndarray]:
    """Concatenate each rank's per-example arrays over an mpi4py communicator, on every rank.

    Over the grid's data communicator each example is there exactly once: the ranks of a
    sample group hold the same examples, the data groups different ones.
    """
    parts = comm.allgather(local)
    return {key: np.concatenate([p[key] for p in parts]) for key in local}


def auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    """Area under the ROC curve of telling `outside` (positives) from `inside` by a score
    that is higher for OOD: P(score_out > score_in) + P(tie) / 2, counted exactly.

    >>> auroc(np.array([0.1, 0.2, 0.3]), np.array([0.3, 0.4]))  # (3 + 2.5) / 6
    0.9166666666666666
    """
    inside, outside = _checked(inside, outside)
    ordered = np.sort(inside)
    below = np.searchsorted(ordered, outside, "left")
    at_most = np.searchsorted(ordered, outside, "right")
    pairs = 2 * int(below.sum()) + int((at_most - below).sum())  # integers: no rounding
    return pairs / (2 * len(inside) * len(outside))


def fpr_at_tpr(inside: np.ndarray, outside: np.ndarray, tpr: float = TPR_LEVEL) -> float:
    """The fraction of `outside` taken for in-distribution when the threshold keeps a
    fraction `tpr` of `inside` (in-distribution is the positive class, as in Hendrycks &
    Gimpel 2017; scores are higher for OOD). It is `fpr[argmax(tpr_curve >= tpr)]` of
    scikit-learn's `roc_curve(drop_intermediate=False)` on the confidence -score.

    >>> fpr_at_tpr(np.arange(20.0), np.array([17.5, 30.0]))  # keeping 19 of 20 (up to 18) admits 17.5
    0.5
    """
    inside, outside = _checked(inside, outside)
    if not 0 < tpr <= 1:
        raise ValueError(f"tpr must lie in (0, 1], got {tpr}")
    n = len(inside)
    k = min(n, max(1, math.ceil(tpr * n)))  # the fewest kept in-distribution examples with k/n >= tpr
    while k > 1 and (k - 1) / n >= tpr:
        k -= 1
    while k < n and k / n < tpr:
        k += 1
    threshold = np.partition(inside, k - 1)[k - 1]  # keep every example scored at most this
    return float(np.count_nonzero(outside <= threshold)) / len(outside)


def ood_detection(inside: dict[str, np.ndarray], outside: dict[str, np.ndarray]) -> dict[str, Any]:
    """AUROC and FPR at 95% TPR by each score, the mean scores in and out, and an MI histogram.

    `inside`/`outside` are `uncertainty_scores` of every in-/out-of-distribution example.
    Keys: count_in, count_out, auroc_{score}, fpr95_{score}, {score}_in, {score}_out for
    score in SCORES, and mi_histogram (log-spaced edges, counts in and out) for the picture.
    """
    result: dict[str, Any] = {"count_in": len(inside["mi"]), "count_out": len(outside["mi"])}
    for score in SCORES:
        sign = 1.0 if HIGHER_MEANS_OOD[score] else -1.0
        result[f"auroc_{score}"] = auroc(sign * inside[score], sign * outside[score])
        result[f"fpr95_{score}"] = fpr_at_tpr(sign * inside[score], sign * outside[score])
    for score in SCORES:
        result[f"{score}_in"] = float(inside[score].mean())
        result[f"{score}_out"] = float(outside[score].mean())
    result["mi_histogram"] = _log_histogram(inside["mi"], outside["mi"])
    return result


def risk_coverage(confidence: np.ndarray, correct: np.ndarray, points: int = CURVE_POINTS) -> dict[str, Any]:
    """Selective prediction: the error rate among the most confident fraction c of examples,
    for every coverage c = k/N, and its mean, the AURC (Geifman & El-Yaniv 2017).

    Ties in confidence are resolved by their expectation over orders (errors spread evenly
    through a tie group), so the result does not depend on the order the examples arrive in,
    i.e. on the grid. The curve is returned at about `points` coverages.

    >>> rc = risk_coverage(np.array([0.9, 0.8, 0.7, 0.6]), np.array([True, True, False, True]))
    >>> rc["aurc"], rc["risk"][-1]  # mean of 0, 0, 1/3, 1/4; all examples: 1 error in 4
    (0.14583333333333331, 0.25)
    """
    confidence, correct = np.asarray(confidence, np.float64), np.asarray(correct, bool)
    if confidence.ndim != 1 or correct.shape != confidence.shape or not len(confidence):
        raise ValueError(f"expected confidence and correct of the same length N > 0, got {confidence.shape}")
    n = len(confidence)
    order = np.argsort(-confidence, kind="stable")
    levels, starts = np.unique(-confidence[order], return_index=True)
    ends = np.r_[starts[1:], n]
    errors_at_end = np.cumsum(~correct[order])[ends - 1].astype(np.float64)
    errors_at_start = np.r_[0.0, errors_at_end[:-1]]
    group = np.repeat(np.arange(len(levels)), ends - starts)
    k = np.arange(1, n + 1)
    into = (k - starts[group]) / (ends - starts)[group]  # fraction of the tie group taken
    errors = errors_at_start[group] + into * (errors_at_end - errors_at_start)[group]
    risk = errors / k
    shown = np.unique(np.linspace(1, n, min(points, n)).round().astype(np.int64))
    return {
        "aurc": float(risk.mean()),
        "coverage": (shown / n).tolist(),
        "risk": risk[shown - 1].tolist(),
    }


def _entropy(p: Tensor) -> Tensor:
    return -torch.special.xlogy(p, p).sum(-1)


def _checked(inside: np.ndarray, outside: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    inside, outside = np.asarray(inside, np.float64).ravel(), np.asarray(outside, np.float64).ravel()
    if not len(inside) or not len(outside):
        raise ValueError(f"need in- and out-of-distribution scores, got {len(inside)} and {len(outside)}")
    if not (np.isfinite(inside).all() and np.isfinite(outside).all()):
        raise ValueError("scores must be finite")
    return inside, outside


def _log_histogram(inside: np.ndarray, outside: np.ndarray, bins: int = HISTOGRAM_BINS) -> dict[str, Any]:
    """Counts in log-spaced bins spanning both sets (MI spans decades); values below the
    first edge (zeros included) are counted in the first bin."""
    both = np.concatenate([inside, outside])
    positive = both[both > 0]
    lo = math.floor(math.log10(positive.min())) if len(positive) else -8
    hi = max(lo + 1, math.ceil(math.log10(positive.max()))) if len(positive) else lo + 1
    edges = np.logspace(lo, hi, bins + 1)

    def counts(v: np.ndarray) -> list[int]:
        return np.histogram(np.clip(v, edges[0], edges[-1]), edges)[0].tolist()

    return {"edges": edges.tolist(), "in": counts(inside), "out": counts(outside)}
