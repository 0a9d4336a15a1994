"""Posterior health: is the variational posterior shaped by the data, or still where the
initialisation and the KL pull left it?

A posterior whose standard deviations are all equal (min = max) never learned which weights
the data pins down; `sigma_quantiles` shows it per layer, every epoch.

    sigma_quantiles(model)  # {"fc.0": {"min": ..., "p10": ..., "median": ..., "p90": ..., "max": ...}, ...}
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hpcbnn.bnn.layers import BayesianModule

QUANTILES = {"min": 0.0, "p10": 0.1, "median": 0.5, "p90": 0.9, "max": 1.0}


@torch.no_grad()
def sigma_quantiles(model: nn.Module) -> dict[str, dict[str, float]]:
    """Quantiles of the posterior standard deviations softplus(rho) of each Bayesian layer
    (weights and biases together), keyed by the layer's qualified name in `model`.

    >>> from hpcbnn.bnn.layers import BayesianLinear
    >>> q = sigma_quantiles(nn.Sequential(BayesianLinear(3, 2, init_std=0.01)))
    >>> list(q), round(q["0"]["median"], 6)
    (['0'], 0.01)
    """
    result = {}
    for name, module in model.named_modules():
        if isinstance(module, BayesianModule):
            rho = [module.weight_rho] + ([] if module.bias_rho is None else [module.bias_rho])
            sigma = torch.cat([F.softplus(r.detach().double()).reshape(-1) for r in rho]).cpu().numpy()
            values = np.quantile(sigma, list(QUANTILES.values()))
            result[name or type(module).__name__] = {k: float(v) for k, v in zip(QUANTILES, values)}
    return result
