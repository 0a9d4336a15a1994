"""The fan-in fractions of a Bayesian network, set after `bayesianize` so that the studies can vary them.

    apply_fractions(model, init_fraction=0.01, prior_fraction=0.5)

`bayesianize(..., prior_scale="fan_in", init_std="fan_in")` uses the library's PRIOR_FRACTION and
INIT_FRACTION of each layer's He std; this gives the same layers other fractions, as if those
constants had other values.
"""

from __future__ import annotations

from torch import nn

from hpcbnn.bnn.layers import BayesianModule, he_std, inverse_softplus


def apply_fractions(model: nn.Module, init_fraction: float | None, prior_fraction: float | None) -> None:
    """Initial sigma and prior std of every Bayesian layer as fractions of its He std (None: leave as built)."""
    for m in model.modules():
        if not isinstance(m, BayesianModule):
            continue
        he = he_std(m.weight_mu.shape)
        if prior_fraction is not None:
            m.prior_scale = prior_fraction * he
        if init_fraction is not None:
            for rho in (m.weight_rho, m.bias_rho):
                if rho is not None:
                    nn.init.constant_(rho, inverse_softplus(init_fraction * he))
