"""A Bayesian layer's weights as random variables, for `hpcbnn.ppl`'s tracers.

While a tracer is active (`tape`, `condition`, `log_joint`), a Bayesian layer builds its
weight and bias as named random variables and evaluates the network on their values:

    with sampling(seed, step, range(k)), tape() as rvs:
        model(x)                        # rvs["features.0.weight"].value: [k, out, in]
    rvs["features.0.weight"].distribution   # the posterior N(mu, sigma^2)
    rvs["features.0.weight"].prior          # N(0, prior_scale^2), a random variable too
    mean = {n: rv.distribution.mean for n, rv in rvs.items()}
    with sampling(seed, step, range(k)), condition(**mean):
        model(x)                        # every sample at the posterior mean

Names are the layers' qualified names (`bayesianize` assigns them) plus `.weight` or
`.bias`. A drawn value is `mu + sigma * eps` with the sampling context's noise, the same
numbers as an untraced reparam step; every estimator evaluates such explicit weight
samples under a tracer (flipout and local reparameterisation agree in distribution only).
Outside a sampling context the value is one draw in training mode and the posterior mean
in eval mode. A given value is `[*shape]` (shared by the k samples) or `[k, *shape]`;
outside a sampling context its leading dimension sets k.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch import distributions as D

from hpcbnn.bnn.noise import current
from hpcbnn.bnn.softplus import softplus
from hpcbnn.errors import UsageError
from hpcbnn.ppl.random_variable import RandomVariable
from hpcbnn.ppl.tracing import traceable

if TYPE_CHECKING:
    from hpcbnn.bnn.layers import BayesianModule


class _Noise:
    """The layer's eps for the k samples, drawn on first use only (a conditioned layer draws none)."""

    def __init__(self, layer: BayesianModule) -> None:
        self.layer = layer
        self.eps: tuple[Tensor, Tensor | None] | None = None

    def __call__(self, part: str) -> Tensor:
        if self.eps is None:
            self.eps = self.layer.noise()
        eps = self.eps[0] if part == "weight" else self.eps[1]
        assert eps is not None, "a layer with a bias draws its noise"
        return eps


@traceable
def layer_variable(
    layer: BayesianModule, part: str, k: int, noise: _Noise, *, value: Any = None, name: str
) -> RandomVariable:
    """The `part` ("weight" or "bias") of `layer` as a random variable holding k samples."""
    mu, rho = (layer.weight_mu, layer.weight_rho) if part == "weight" else (layer.bias_mu, layer.bias_rho)
    sigma = softplus(rho)
    posterior = D.Normal(mu, sigma, validate_args=False)
    prior = D.Normal(mu.new_zeros(()), mu.new_full((), layer.prior_scale), validate_args=False)
    if value is None:
        value = mu.unsqueeze(0) if k == 0 else torch.addcmul(mu, sigma, noise(part))
    else:
        value = _samples(torch.as_tensor(value, dtype=mu.dtype, device=mu.device), mu.shape, k, name)
    return RandomVariable(posterior, value=value, name=name, prior=prior)


def _samples(value: Tensor, shape: torch.Size, k: int, name: str) -> Tensor:
    """A given value as [k, *shape]: one shared tensor expanded, or k (or, outside a context, any) samples."""
    if value.shape == shape:
        return value.expand(max(k, 1), *shape)
    if value.dim() == len(shape) + 1 and value.shape[1:] == shape and (current() is None or value.shape[0] == k):
        return value
    want = f"[{', '.join(map(str, shape))}] or [{k}, {', '.join(map(str, shape))}]"
    raise UsageError(f"{name}: a value of shape {list(value.shape)}; the layer takes {want}")


def traced_forward(layer: BayesianModule, x: Tensor, k: int) -> Tensor:
    """The layer on explicit weight samples that the active tracers may record or replace."""
    base = layer.variable_name
    if base is None:
        raise UsageError(
            f"{type(layer).__name__}: a traced Bayesian layer needs its qualified name; build the "
            f"model with bayesianize() or call hpcbnn.bnn.noise.assign_noise_keys(model)"
        )
    prefix = f"{base}." if base else ""
    noise = _Noise(layer)
    w = layer_variable(layer, "weight", k, noise, name=f"{prefix}weight").value
    b = None if layer.bias_mu is None else layer_variable(layer, "bias", k, noise, name=f"{prefix}bias").value
    n = w.shape[0] if b is None else max(w.shape[0], b.shape[0])
    if x.shape[0] % n:
        raise UsageError(
            f"{type(layer).__name__} {base!r}: input has {x.shape[0]} rows, not a multiple of the "
            f"{n} weight samples; stack the batch once per sample (sample-major)"
        )
    return layer.batched_op(
        x, _broadcast(w, n, f"{prefix}weight"), None if b is None else _broadcast(b, n, f"{prefix}bias")
    )


def _broadcast(t: Tensor, n: int, name: str) -> Tensor:
    if t.shape[0] == n:
        return t
    if t.shape[0] == 1:
        return t.expand(n, *t.shape[1:])
    raise UsageError(f"{name}: {t.shape[0]} samples where the layer's other part has {n}; give both alike")
