"""Likelihoods and objectives, written so that their cross-rank reduction is exact.

Every objective starts from the per-sample log-likelihoods `loglik` [k, B] of the k local
samples on the B local examples. The engine averages gradients (mean) over all ranks.
- ELBO: -mean(loglik) + kl_weight * KL / N. Linear in the samples and the examples, so
  the mean over ranks of the local values is the global value: plain averaging is exact.
- Predictive: -mean_b log((1/S) sum_s p(y_b | w_s)) + kl_weight * KL / N. Not linear in
  the samples: each rank reduces its k samples to a logsumexp per example, `gather`
  concatenates those [1, B] rows over the sample communicator into [K, B] with a
  differentiable all-gather whose backward is the true adjoint (a sum over the K ranks
  holding the same loss), and the global logsumexp follows. The K-fold sum in the adjoint
  and the engine's 1/K mean cancel, so the update is the single-process one.
`kl_weight` is the one temperature knob: 1 is the standard ELBO, < 1 a cold posterior.
Its default, DEFAULT_KL_WEIGHT, is shared by both objectives, `Engine` and `hpcbnn.train`'s
Config, so `bayesianize(model)` with the ELBO fits the same tempered posterior as the CLI.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

MIN_SCALE = 1e-6  # keeps the Gaussian likelihood finite when a predicted scale collapses
DEFAULT_KL_WEIGHT = 0.003  # the plain ELBO (1) underfits small data sets; chosen on validation (docs/uq.md)


def categorical_loglik(logits: Tensor, y: Tensor) -> Tensor:
    """log p(y | logits) for logits [k, B, C] and integer classes y [B] -> [k, B]."""
    logp = F.log_softmax(logits, dim=-1)
    return logp.gather(-1, y.long().expand(logits.shape[0], -1).unsqueeze(-1)).squeeze(-1)


def gaussian_params(out: Tensor) -> tuple[Tensor, Tensor]:
    """A network's Gaussian head out [..., 2d] = (mean, raw scale) -> mean, softplus(raw) + MIN_SCALE."""
    mean, raw = out.chunk(2, dim=-1)
    return mean, F.softplus(raw) + MIN_SCALE


def gaussian_loglik(out: Tensor, y: Tensor) -> Tensor:
    """Heteroscedastic Gaussian (see `gaussian_params`), y [B, d] (or [B] when d = 1) -> [k, B],
    summed over the d outputs."""
    mean, scale = gaussian_params(out)
    y = y.reshape(mean.shape[1:])
    z = (y - mean) / scale
    return (-0.5 * z.square() - scale.log() - 0.5 * math.log(2 * math.pi)).sum(-1)


def elbo_loss(
    loglik: Tensor,
    kl: Tensor,
    n_train: int,
    kl_weight: float = DEFAULT_KL_WEIGHT,
    num_samples: int | None = None,
    gather: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """The negative ELBO per example, local part: -mean(loglik) + kl_weight * kl / n_train.

    `num_samples` and `gather` are unused (the ELBO is linear in the samples); they make
    the two objectives interchangeable.
    """
    return -loglik.mean() + kl_weight * kl / n_train


def predictive_loss(
    loglik: Tensor,
    kl: Tensor,
    n_train: int,
    kl_weight: float = DEFAULT_KL_WEIGHT,
    num_samples: int | None = None,
    gather: Callable[[Tensor], Tensor] = lambda t: t,
) -> Tensor:
    """-mean_b log((1/S) sum_s p(y_b | w_s)) + kl_weight * kl / n_train over all S samples.

    `gather` concatenates [1, B] rows over the sample communicator into [K, B]; S defaults
    to k * K (every rank holds k samples).
    """
    local = torch.logsumexp(loglik, dim=0)
    rows = gather(local.unsqueeze(0))
    s = num_samples or loglik.shape[0] * rows.shape[0]
    log_predictive = torch.logsumexp(rows, dim=0) - math.log(s)
    return -log_predictive.mean() + kl_weight * kl / n_train
