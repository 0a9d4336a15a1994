"""The No-U-Turn Sampler, iterative and batched over chains.

Multinomial NUTS with the generalised no-U-turn criterion, as in Stan and NumPyro
(Hoffman & Gelman 2014; Betancourt 2017). Instead of recursion, the trajectory doubles
`max_depth` times at most, and each doubling builds its new subtree leaf by leaf. All
chains advance in lockstep, one batched target evaluation per leapfrog step; a chain
whose tree has stopped (a U-turn or a divergence) keeps its state and waits, masked,
until every chain of the batch has stopped.

Because chains move in lockstep, leaf n of the subtree of depth d is the same leaf for
every chain, so the bookkeeping of NumPyro's iterative subtree (checkpoints of the
momentum and the running momentum sum at the starts of the sub-subtrees that can still
be checked) uses plain Python indices.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hpcbnn.mcmc import rng
from hpcbnn.mcmc.hmc import MAX_DELTA_ENERGY, Phase, Stats, Target, draw_momentum, energy_error, kinetic, leapfrog


def is_turning(p_left: Tensor, p_right: Tensor, rho: Tensor, inv_mass: Tensor) -> Tensor:
    """The generalised criterion for a (sub)trajectory with end momenta and momentum sum rho.

    rho excludes half of each end, as NumPyro does (Betancourt 2017, appendix A.4.2).
    """
    rho = rho - 0.5 * (p_left + p_right)
    return ((inv_mass * p_left * rho).sum(-1) <= 0) | ((inv_mass * p_right * rho).sum(-1) <= 0)


def _checkpoints(n: int) -> tuple[int, int]:
    """Checkpoint slots [lo, hi] of the sub-subtrees that end at leaf n (none when n is even)."""
    hi = bin(n >> 1).count("1")
    trailing_ones = len(bin(n)) - len(bin(n).rstrip("1"))
    return hi - trailing_ones + 1, hi


def nuts(
    target: Target,
    z: Phase,
    step_size: Tensor,
    inv_mass: Tensor,
    max_depth: int,
    seed: int,
    chains: Tensor,
    iteration: int,
) -> tuple[Phase, Stats]:
    """One NUTS transition for every chain (its `z.p` is ignored: momentum is resampled)."""
    num, dim = z.q.shape
    dtype, device = z.q.dtype, z.q.device
    p0 = draw_momentum(seed, chains, inv_mass, iteration, rng.Stream.MOMENTUM)
    start = z.with_momentum(p0)
    h0 = kinetic(p0, inv_mass) - z.logp
    left, right, proposal = start, start, start
    log_w = torch.zeros(num, dtype=dtype, device=device)  # log sum of the tree's weights exp(H0 - H)
    rho = p0.clone()
    active = torch.ones(num, dtype=torch.bool, device=device)
    depth = torch.zeros_like(chains)
    n_leapfrog = torch.zeros_like(chains)
    sum_accept = torch.zeros_like(log_w)
    diverging = torch.zeros_like(active)
    forward = rng.uniform(seed, chains, iteration, rng.Stream.DIRECTION, n=max_depth) < 0.5
    log_u_merge = rng.uniform(seed, chains, iteration, rng.Stream.MERGE, n=max_depth, dtype=dtype).log()
    ckpt_p = torch.zeros(max_depth, num, dim, dtype=dtype, device=device)
    ckpt_rho = torch.zeros_like(ckpt_p)

    for d in range(max_depth):
        if not active.any():
            break
        depth = torch.where(active, d + 1, depth)
        fwd = forward[:, d]
        eps = torch.where(fwd, step_size, -step_size)
        end = right.where(fwd, left)
        sub_proposal = end
        sub_log_w = torch.full_like(log_w, -torch.inf)
        sub_rho = torch.zeros_like(rho)
        building = active.clone()
        log_u_leaf = rng.uniform(seed, chains, iteration, rng.Stream.LEAF, d, n=2**d, dtype=dtype).log()
        for n in range(2**d):
            if not building.any():
                break
            new = leapfrog(target, end, eps, inv_mass)
            p = new.p
            log_weight = -energy_error(new, inv_mass, h0)
            sum_accept += log_weight.clamp(max=0.0).exp() * building
            n_leapfrog += building
            # Progressive uniform sampling of the subtree's proposal. A chain that stopped
            # building never merges this subtree, so its subtree sums need no masking.
            grown = torch.logaddexp(sub_log_w, log_weight)
            sub_proposal = new.where(log_u_leaf[:, n] < log_weight - grown, sub_proposal)
            sub_log_w = grown
            sub_rho = sub_rho + p
            lo, hi = _checkpoints(n)
            if n % 2 == 0:
                ckpt_p[hi], ckpt_rho[hi] = p, sub_rho
            stop = log_weight < -MAX_DELTA_ENERGY
            diverging |= building & stop
            if lo <= hi:
                p_start, rho_start = ckpt_p[lo : hi + 1], ckpt_rho[lo : hi + 1]
                stop |= is_turning(p_start, p, sub_rho - rho_start + p_start, inv_mass).any(0)
            building &= ~stop
            end = new.where(building, end)
        # Biased progressive sampling between the old tree and the completed subtree.
        merge = active & building
        take = merge & (log_u_merge[:, d] < sub_log_w - log_w)
        proposal = sub_proposal.where(take, proposal)
        log_w = torch.where(merge, torch.logaddexp(log_w, sub_log_w), log_w)
        rho = torch.where(merge.unsqueeze(-1), rho + sub_rho, rho)
        right = end.where(merge & fwd, right)
        left = end.where(merge & ~fwd, left)
        active = merge & ~is_turning(left.p, right.p, rho, inv_mass)

    stats = Stats(
        accept_prob=sum_accept / n_leapfrog.clamp(min=1),
        n_leapfrog=n_leapfrog,
        tree_depth=depth,
        diverging=diverging,
        energy=kinetic(proposal.p, inv_mass) - proposal.logp,
    )
    return proposal, stats
