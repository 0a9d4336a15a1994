"""The fan-in fractions of a Bayesian network, set after `bayesianize` so that the studies can vary them.

    apply_fractions(model, init_fraction=0.01, prior_fraction=0.5)

`bayesianize(..., prior_scale="fan_in", init_std="fan_in")` uses the library's PRIOR_FRACTION and
INIT_FRACTION of each layer's He std; this gives the same layers other fractions, as if those
constants had other values.
"""

from __future__ import annotations

import torch
from torch import nn

from hpcbnn.bnn.layers import BayesianModule, he_std, inverse_softplus

FIRST_IN_FEATURES = 64  # the digits' pixels: the first layer of benchmarks.uq's MLP


def apply_fractions(
    model: nn.Module,
    init_fraction: float | None,
    prior_fraction: float | None,
    first_prior_fraction: float | None = None,
) -> None:
    """Initial sigma and prior std of every Bayesian layer as fractions of its He std (None: leave as built);
    `first_prior_fraction` sets the prior of the first layer of each component (docs/uq.md, round 6)."""
    for m in model.modules():
        if not isinstance(m, BayesianModule):
            continue
        he = he_std(m.weight_mu.shape)
        if prior_fraction is not None:
            m.prior_scale = prior_fraction * he
        if first_prior_fraction is not None and m.weight_mu.shape[1] == FIRST_IN_FEATURES:
            m.prior_scale = first_prior_fraction * he
        if init_fraction is not None:
            for rho in (m.weight_rho, m.bias_rho):
                if rho is not None:
                    nn.init.constant_(rho, inverse_softplus(init_fraction * he))


def scale_means(model: nn.Module, factor: float) -> None:
    """Every Bayesian layer's weight means multiplied by `factor` (round 6: a wider start)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, BayesianModule):
                m.weight_mu.mul_(factor)
