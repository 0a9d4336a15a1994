"""The sampling loop: initialise, warm up (adapting step size and metric), draw.

Everything a chain does is a function of (seed, global chain id) and the target, so the
chains a rank holds may be any subset: run on one rank or spread over a sample
communicator, a chain produces the same draws.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Literal

import torch
from torch import Tensor

from hpcbnn.errors import UsageError
from hpcbnn.mcmc import rng
from hpcbnn.mcmc.adaptation import DualAveraging, WindowVariance, find_step_size, slow_windows
from hpcbnn.mcmc.hmc import Phase, Stats, Target, hmc
from hpcbnn.mcmc.nuts import nuts

Kernel = Literal["nuts", "hmc"]
Progress = Callable[[int, Stats, Tensor], None]


@dataclass
class Draws:
    """What one rank's chains produced: draws [chains, draws, dim] in unconstrained space."""

    chains: Tensor
    theta: Tensor
    stats: dict[str, Tensor]
    step_size: Tensor
    inv_mass: Tensor


def initial_points(
    target: Target,
    seed: int,
    chains: Tensor,
    dim: int,
    radius: float = 2.0,
    dtype: torch.dtype = torch.float64,
    attempts: int = 100,
) -> Phase:
    """Stan's default: uniform in [-radius, radius] per coordinate, redrawn where log p is not finite."""
    q = torch.empty(len(chains), dim, dtype=dtype, device=chains.device)
    bad = torch.ones(len(chains), dtype=torch.bool, device=chains.device)
    logp, grad = torch.empty_like(q[:, 0]), torch.empty_like(q)
    for attempt in range(attempts):
        u = rng.uniform(seed, chains, attempt, rng.Stream.INIT, n=dim, dtype=dtype)
        q = torch.where(bad.unsqueeze(-1), radius * (2 * u - 1), q)
        new_logp, new_grad = target(q)
        logp = torch.where(bad, new_logp, logp)
        grad = torch.where(bad.unsqueeze(-1), new_grad, grad)
        bad = ~(torch.isfinite(logp) & torch.isfinite(grad).all(-1))
        if not bad.any():
            return Phase.of(q, torch.zeros_like(q), logp, grad)
    raise UsageError(
        f"no finite log density at {attempts} random initial points in "
        f"[-{radius}, {radius}]; check the model and its data"
    )


def sample(
    target: Target,
    dim: int,
    chains: Tensor,
    *,
    seed: int,
    num_warmup: int,
    num_draws: int,
    kernel: Kernel = "nuts",
    max_depth: int = 10,
    num_steps: int = 16,
    target_accept: float = 0.8,
    step_size: float | None = None,
    adapt_mass: bool = True,
    init: Tensor | None = None,
    dtype: torch.dtype = torch.float64,
    progress: Progress | None = None,
) -> Draws:
    """Run `len(chains)` chains (global ids `chains`) of `kernel` on `target` in one batch.

    A given `step_size` is used as is (no step-size adaptation); otherwise each chain finds
    its own by dual averaging towards `target_accept` during warm-up. Chains start at
    `init` [chains, dim] (unconstrained) when given, else at Stan's random initial points.
    """
    if init is None:
        z = initial_points(target, seed, chains, dim, dtype=dtype)
    else:
        q = init.to(dtype=dtype, device=chains.device)
        z = Phase.of(q, torch.zeros_like(q), *target(q))
    num = len(chains)
    inv_mass = torch.ones(num, dim, dtype=dtype, device=chains.device)
    if step_size is None:
        eps = find_step_size(target, z, torch.ones_like(z.logp), inv_mass, seed, chains, -1)
        averaging: DualAveraging | None = DualAveraging(eps, target_accept)
    else:
        eps, averaging = torch.full_like(z.logp, step_size), None
    windows = {end - 1: start for start, end in slow_windows(num_warmup)} if adapt_mass else {}
    window_starts = set(windows.values())
    variance: WindowVariance | None = None

    theta = torch.empty(num, num_draws, dim, dtype=dtype, device=chains.device)
    stats: dict[str, Tensor] = {}
    for it in range(num_warmup + num_draws):
        if kernel == "nuts":
            z, st = nuts(target, z, eps, inv_mass, max_depth, seed, chains, it)
        else:
            z, st = hmc(target, z, eps, inv_mass, num_steps, seed, chains, it)
        if it < num_warmup:
            if averaging is not None:
                eps = averaging.update(st.accept_prob)
            if it in window_starts:
                variance = WindowVariance(z.q)
            if variance is not None:
                variance.add(z.q)
            if variance is not None and it in windows:
                inv_mass, variance = variance.inv_mass(), None
                if averaging is not None:
                    eps = find_step_size(target, z, eps, inv_mass, seed, chains, it)
                    averaging.restart(eps)
            if averaging is not None and it == num_warmup - 1:
                eps = averaging.final
        else:
            i = it - num_warmup
            theta[:, i] = z.q
            for f in fields(st):
                value = getattr(st, f.name)
                stats.setdefault(f.name, value.new_empty(num, num_draws))[:, i] = value
        if progress is not None:
            progress(it, st, eps)
    return Draws(chains, theta, stats, eps, inv_mass)
