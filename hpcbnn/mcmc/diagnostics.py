"""Convergence diagnostics: rank-normalised split R-hat, bulk and tail ESS (Vehtari et al. 2021).

The estimators follow ArviZ (`arviz.rhat(method="rank")`, `arviz.ess(method="bulk" |
"tail")`, `arviz.mcse`), and the tests check them against it; they are re-implemented on
NumPy because importing ArviZ (xarray, pandas, ...), or even scipy.stats, takes longer
than a short sampling run, on every rank of a job.
Arrays are [chains, draws] per parameter, or [chains, draws, parameters] for `summary`.
"""

from __future__ import annotations

import numpy as np
import torch

PROBS = (0.05, 0.5, 0.95)


def split_chains(x: np.ndarray) -> np.ndarray:
    """Each chain's first and second half as two chains (the middle draw of an odd count dropped)."""
    half = x.shape[1] // 2
    return np.concatenate([x[:, :half], x[:, x.shape[1] - half :]], axis=0)


def ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of all values of x pooled, ties given their average rank (x's shape)."""
    flat = x.ravel()
    order = np.argsort(flat, kind="stable")
    new_value = np.concatenate([[True], flat[order][1:] != flat[order][:-1]])
    group = np.cumsum(new_value) - 1
    counts = np.bincount(group)
    average = np.cumsum(counts) - (counts - 1) / 2
    out = np.empty(flat.size)
    out[order] = average[group]
    return out.reshape(x.shape)


def z_scale(x: np.ndarray) -> np.ndarray:
    """Normal scores of the pooled ranks (Blom's offset)."""
    u = (ranks(x) - 0.375) / (x.size + 0.25)
    return torch.special.ndtri(torch.from_numpy(u)).numpy()


def _rhat(x: np.ndarray) -> float:
    n = x.shape[1]
    between = n * np.var(x.mean(axis=1), ddof=1)
    within = np.mean(np.var(x, axis=1, ddof=1))
    return float(np.sqrt((between / within + n - 1) / n))


def rhat(x: np.ndarray) -> float:
    """Rank-normalised split R-hat: the larger of the bulk and the folded (tail) statistic."""
    split = split_chains(x)
    folded = np.abs(split - np.median(split))
    return max(_rhat(z_scale(split)), _rhat(z_scale(folded)))


def _autocov(x: np.ndarray) -> np.ndarray:
    n = x.shape[1]
    centred = x - x.mean(axis=1, keepdims=True)
    size = 2 ** int(np.ceil(np.log2(2 * n)))
    spectrum = np.fft.rfft(centred, n=size, axis=1)
    return np.fft.irfft(spectrum * np.conjugate(spectrum), n=size, axis=1)[:, :n] / n


def ess(x: np.ndarray) -> float:
    """Effective sample size of the mean of `x` [chains, draws]: Geyer's initial monotone
    sequence on the multi-chain autocorrelation estimate."""
    x = np.asarray(x, dtype=float)
    if np.ptp(x) < np.finfo(float).resolution:
        return float(x.size)
    chains, n = x.shape
    acov = _autocov(x)
    mean_var = acov[:, 0].mean() * n / (n - 1)
    var_plus = mean_var * (n - 1) / n + (np.var(x.mean(axis=1), ddof=1) if chains > 1 else 0.0)
    rho = np.zeros(n)
    rho[0], even, odd = 1.0, 1.0, 1.0 - (mean_var - acov[:, 1].mean()) / var_plus
    rho[1] = odd
    t = 1
    while t < n - 3 and even + odd > 0:  # initial positive sequence of pair sums
        even = 1.0 - (mean_var - acov[:, t + 1].mean()) / var_plus
        odd = 1.0 - (mean_var - acov[:, t + 2].mean()) / var_plus
        if even + odd >= 0:
            rho[t + 1], rho[t + 2] = even, odd
        t += 2
    max_t = t - 2
    if even > 0:
        rho[max_t + 1] = even
    for t in range(1, max_t - 1, 2):  # made monotone
        if rho[t + 1] + rho[t + 2] > rho[t - 1] + rho[t]:
            rho[t + 1] = rho[t + 2] = (rho[t - 1] + rho[t]) / 2
    tau = -1 + 2 * rho[: max_t + 1].sum() + rho[max_t + 1 : max_t + 2].sum()
    tau = max(tau, 1 / np.log10(x.size))
    return float(x.size / tau) if np.isfinite(rho).all() else float("nan")


def ess_bulk(x: np.ndarray) -> float:
    return ess(z_scale(split_chains(x)))


def ess_tail(x: np.ndarray) -> float:
    """The smaller ESS of the indicators of the 5% and 95% quantiles."""
    return min(ess(split_chains(x <= np.quantile(x, p))) for p in (0.05, 0.95))


def mcse_mean(x: np.ndarray) -> float:
    return float(np.std(x, ddof=1) / np.sqrt(ess(split_chains(x))))


def summary(draws: np.ndarray) -> dict[str, np.ndarray]:
    """Per-parameter mean, sd, 5/50/95% quantiles, MCSE of the mean, bulk/tail ESS and R-hat.

    R-hat needs at least two chains (NaN otherwise, as in ArviZ)."""
    columns: dict[str, list[float]] = {
        k: [] for k in ("mean", "sd", "q5", "q50", "q95", "mcse_mean", "ess_bulk", "ess_tail", "r_hat")
    }
    for i in range(draws.shape[2]):
        x = draws[:, :, i]
        columns["mean"].append(float(x.mean()))
        columns["sd"].append(float(x.std(ddof=1)))
        for name, q in zip(("q5", "q50", "q95"), np.quantile(x, PROBS)):
            columns[name].append(float(q))
        columns["mcse_mean"].append(mcse_mean(x))
        columns["ess_bulk"].append(ess_bulk(x))
        columns["ess_tail"].append(ess_tail(x))
        columns["r_hat"].append(rhat(x) if x.shape[0] > 1 else float("nan"))
    return {k: np.asarray(v) for k, v in columns.items()}


def ebfmi(energy: np.ndarray) -> np.ndarray:
    """Energy Bayesian fraction of missing information per chain (Betancourt 2016); < 0.3 is poor."""
    return np.square(np.diff(energy, axis=1)).mean(axis=1) / np.var(energy, axis=1)
