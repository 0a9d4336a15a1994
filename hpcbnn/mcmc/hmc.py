"""Hamiltonian dynamics for a batch of chains, and the fixed-length HMC kernel.

Every tensor carries the chains a rank holds as its leading dimension, and each chain has
its own step size and diagonal inverse mass matrix: one leapfrog step advances all chains
with one evaluation of the target, which is what makes many chains nearly as cheap as one
when the target's cost is reading the data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from hpcbnn.mcmc import rng

Target = Callable[[Tensor], tuple[Tensor, Tensor]]
"""theta [chains, dim] -> (log density [chains], its gradient [chains, dim])."""

MAX_DELTA_ENERGY = 1000.0
"""An energy error above this marks a divergent trajectory (Stan's threshold)."""


class Phase:
    """Position, momentum, log density and gradient of every chain, packed in one tensor.

    Packing makes "keep this chain's old phase" a single `torch.where`: the NUTS loop does
    that several times per leapfrog step, for small models the step's dominant cost.
    """

    def __init__(self, data: Tensor) -> None:
        self.data = data
        self.dim = (data.shape[-1] - 1) // 3

    @classmethod
    def of(cls, q: Tensor, p: Tensor, logp: Tensor, grad: Tensor) -> Phase:
        return cls(torch.cat([q, p, grad, logp.unsqueeze(-1)], dim=-1))

    @property
    def q(self) -> Tensor:
        return self.data[:, : self.dim]

    @property
    def p(self) -> Tensor:
        return self.data[:, self.dim : 2 * self.dim]

    @property
    def grad(self) -> Tensor:
        return self.data[:, 2 * self.dim : 3 * self.dim]

    @property
    def logp(self) -> Tensor:
        return self.data[:, -1]

    def where(self, mask: Tensor, other: Phase) -> Phase:
        """This phase for the chains in `mask`, `other` for the rest."""
        return Phase(torch.where(mask.unsqueeze(-1), self.data, other.data))

    def with_momentum(self, p: Tensor) -> Phase:
        return Phase.of(self.q, p, self.logp, self.grad)


@dataclass
class Stats:
    """Per-chain statistics of one transition (Stan's sampler diagnostics)."""

    accept_prob: Tensor
    n_leapfrog: Tensor
    tree_depth: Tensor
    diverging: Tensor
    energy: Tensor


def kinetic(p: Tensor, inv_mass: Tensor) -> Tensor:
    return 0.5 * (inv_mass * p * p).sum(-1)


def draw_momentum(seed: int, chains: Tensor, inv_mass: Tensor, *counters: int) -> Tensor:
    """p ~ N(0, M) with M = diag(1 / inv_mass), from the chains' own streams."""
    z = rng.normal(seed, chains, *counters, n=inv_mass.shape[-1], dtype=inv_mass.dtype)
    return z / inv_mass.sqrt()


def leapfrog(target: Target, z: Phase, step_size: Tensor, inv_mass: Tensor) -> Phase:
    """One velocity-Verlet step of every chain; `step_size` [chains] may be negative."""
    eps = step_size.unsqueeze(-1)
    p = z.p + 0.5 * eps * z.grad
    q = z.q + eps * inv_mass * p
    logp, grad = target(q)
    return Phase.of(q, p + 0.5 * eps * grad, logp, grad)


def energy_error(z: Phase, inv_mass: Tensor, h0: Tensor) -> Tensor:
    """H(z) - H0, with a non-finite energy counted as an infinite error."""
    delta = kinetic(z.p, inv_mass) - z.logp - h0
    return torch.nan_to_num(delta, nan=float("inf"))


def hmc(
    target: Target,
    z: Phase,
    step_size: Tensor,
    inv_mass: Tensor,
    num_steps: int,
    seed: int,
    chains: Tensor,
    iteration: int,
) -> tuple[Phase, Stats]:
    """One Metropolis-corrected HMC transition of `num_steps` leapfrog steps for every chain."""
    p0 = draw_momentum(seed, chains, inv_mass, iteration, rng.Stream.MOMENTUM)
    start = z.with_momentum(p0)
    h0 = kinetic(p0, inv_mass) - z.logp
    end = start
    for _ in range(num_steps):
        end = leapfrog(target, end, step_size, inv_mass)
    delta = energy_error(end, inv_mass, h0)
    log_u = rng.uniform(seed, chains, iteration, rng.Stream.ACCEPT, dtype=delta.dtype)[:, 0].log()
    accept = log_u < -delta
    new = end.where(accept, start)
    n = torch.full_like(chains, num_steps)
    stats = Stats(
        accept_prob=torch.exp(torch.clamp(-delta, max=0.0)),
        n_leapfrog=n,
        tree_depth=torch.zeros_like(chains),
        diverging=delta > MAX_DELTA_ENERGY,
        energy=kinetic(new.p, inv_mass) - new.logp,
    )
    return new, stats
