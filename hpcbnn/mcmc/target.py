"""From a model to the sampler's target: a flat, unconstrained, batched log density + gradient.

The sampler sees `theta [chains, dim] -> (log p [chains], grad [chains, dim])` on the real
line. A traced program becomes such a target here: its latent variables are found by
running it once under `tape`, each is mapped to the reals with the bijection
`torch.distributions.biject_to` gives for its support (log for positive parameters,
logit for bounded ones, ...) and the log-Jacobian of that map is added to the density.

On a grid with D > 1 data groups the likelihood is split: each data rank scores only its
shard of the observations, data rank 0 alone adds the prior and the Jacobian, and
`ShardedSum` adds the ranks' [log p, grad] for all local chains with one Allreduce per
evaluation (float64, so that the split sum equals the one-process sum to ~1e-12).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from mpi4py import MPI
from torch import Tensor
from torch.distributions import Distribution, Transform, biject_to

from hpcbnn.bnn.noise import sampling
from hpcbnn.mcmc.hmc import Target
from hpcbnn.ppl.tracing import condition, tape


@dataclass(frozen=True)
class Latent:
    """One latent variable: its constrained shape (per chain) and its map from the reals."""

    name: str
    shape: torch.Size
    transform: Transform

    @property
    def free_shape(self) -> torch.Size:
        return self.transform.inverse_shape(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.free_shape)


class Layout:
    """Where each latent variable lives in the flat unconstrained vector theta."""

    def __init__(self, latents: list[Latent]) -> None:
        self.latents = latents
        self.dim = sum(v.size for v in latents)

    def constrain(self, theta: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """Values [chains, *shape] of every latent, and log|det d values / d theta| [chains]."""
        values, log_det = {}, torch.zeros(theta.shape[0], dtype=theta.dtype, device=theta.device)
        for latent, free in zip(self.latents, theta.split([v.size for v in self.latents], dim=-1)):
            u = free.reshape(theta.shape[0], *latent.free_shape)
            x = latent.transform(u)
            ladj = latent.transform.log_abs_det_jacobian(u, x)
            log_det = log_det + ladj.reshape(theta.shape[0], -1).sum(-1)
            values[latent.name] = x
        return values, log_det

    def names(self) -> list[str]:
        """One name per constrained scalar, e.g. `mu`, `theta[3]`, `w[0,1]`."""
        out = []
        for v in self.latents:
            if not v.shape:
                out.append(v.name)
            else:
                out += [f"{v.name}[{','.join(map(str, i))}]" for i in itertools.product(*map(range, v.shape))]
        return out

    def flatten(self, values: Mapping[str, Tensor]) -> Tensor:
        """Constrained values as [chains, number of names]."""
        return torch.cat([values[v.name].reshape(values[v.name].shape[0], -1) for v in self.latents], -1)


class ModelTarget:
    """The log joint of `model(*args)` conditioned on `observed`, over its other variables.

    The model must broadcast over a leading chains dimension of its latent values (write
    `mu[..., None]`, not `mu.unsqueeze(0)`), as `hpcbnn.ppl.tracing.log_joint(batch_dims=1)`
    requires. `prior=False` leaves out the prior and Jacobian terms (data ranks other than 0).
    """

    def __init__(
        self, model: Callable[..., Any], *args: Any, observed: Mapping[str, Tensor], prior: bool = True
    ) -> None:
        self.model, self.args, self.observed, self.prior = model, args, dict(observed), prior
        with tape() as rvs, self.chains(1):
            condition(model, **self.observed)(*args)
        missing = self.observed.keys() - rvs.keys()
        if missing:
            raise ValueError(f"the model has no random variable named {sorted(missing)}")
        self.layout = Layout(
            [
                Latent(name, self.shape(rv.value), biject_to(rv.distribution.support))
                for name, rv in rvs.items()
                if name not in self.observed
            ]
        )
        self.dim = self.layout.dim

    def chains(self, n: int) -> AbstractContextManager[Any]:
        """The context the model runs in for `n` chains: none, the values carry the chains."""
        return nullcontext()

    def shape(self, value: Tensor) -> torch.Size:
        """A latent's shape per chain, from its value in the one-chain run of `__init__`."""
        return value.shape

    def log_density(self, theta: Tensor) -> Tensor:
        """log p [chains] at unconstrained theta [chains, dim] (differentiable).

        A variable with a prior (a Bayesian layer's weight) is scored under the prior."""
        values, log_det = self.layout.constrain(theta)
        total = log_det if self.prior else torch.zeros_like(log_det)
        with tape() as rvs, _unvalidated(), self.chains(len(theta)):
            condition(self.model, **values, **self.observed)(*self.args)
            for name, rv in rvs.items():
                if self.prior or name in self.observed:
                    total = total + rv.model_log_prob().reshape(len(theta), -1).sum(-1)
        return total

    def __call__(self, theta: Tensor) -> tuple[Tensor, Tensor]:
        with torch.enable_grad():
            theta = theta.detach().requires_grad_(True)
            lp = self.log_density(theta)
            (grad,) = torch.autograd.grad(lp.sum(), theta)
        return lp.detach(), grad


class NetworkTarget(ModelTarget):
    """A `ModelTarget` whose latents are the weights of Bayesian layers (hpcbnn.bnn.variables).

    The model runs inside `sampling(0, 0, range(chains))`, so each layer evaluates every
    chain's weights in one batched op: the program stacks its inputs once per sample
    (`len(current().samples)` of them), as for the variational predictive. Every latent
    must carry that samples dimension first, as the layers' weights do.
    """

    def chains(self, n: int) -> AbstractContextManager[Any]:
        return sampling(0, 0, range(n))

    def shape(self, value: Tensor) -> torch.Size:
        return value.shape[1:]


@contextmanager
def _unvalidated() -> Iterator[None]:
    """Skip torch.distributions' support checks (a host sync per variable and evaluation).

    Latent values come from bijections onto their supports, and the observed values were
    checked when the model was first run; this runs at every leapfrog step.
    """
    default = Distribution._validate_args
    Distribution.set_default_validate_args(False)
    try:
        yield
    finally:
        Distribution.set_default_validate_args(default)


class ShardedSum:
    """The sum of the data ranks' local targets: one fused float64 Allreduce of [log p, grad]."""

    def __init__(self, local: Target, comm: MPI.Comm) -> None:
        self.local, self.comm = local, comm

    def __call__(self, theta: Tensor) -> tuple[Tensor, Tensor]:
        lp, grad = self.local(theta)
        if self.comm.Get_size() == 1:
            return lp, grad
        buf = torch.cat([lp.unsqueeze(-1), grad], dim=-1).to(device="cpu", dtype=torch.float64)
        self.comm.Allreduce(MPI.IN_PLACE, buf.numpy())
        buf = buf.to(device=theta.device, dtype=theta.dtype)
        return buf[:, 0], buf[:, 1:]
