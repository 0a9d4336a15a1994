"""Warm-up: dual-averaging step size and a diagonal mass matrix learnt in windows (Stan's scheme).

Each chain adapts its own step size and metric, so a chain's warm-up depends on nothing
but its own draws and stays the same however the chains are spread over ranks.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from hpcbnn.mcmc import rng
from hpcbnn.mcmc.hmc import Phase, Target, draw_momentum, energy_error, kinetic, leapfrog


def slow_windows(
    num_warmup: int, init_buffer: int = 75, term_buffer: int = 50, base_window: int = 25
) -> list[tuple[int, int]]:
    """Iterations [start, end) whose draws estimate the metric; each window doubles the last.

    The first `init_buffer` iterations only find the typical set and a step size, the last
    `term_buffer` only tune the step size to the final metric; short warm-ups scale the
    buffers to 15% / 75% / 10% as Stan does, and below 20 iterations the metric stays put.
    """
    if num_warmup < 20:
        return []
    if init_buffer + base_window + term_buffer > num_warmup:
        init_buffer, term_buffer = int(0.15 * num_warmup), int(0.1 * num_warmup)
        base_window = num_warmup - init_buffer - term_buffer
    last = num_warmup - term_buffer
    windows, start, size = [], init_buffer, base_window
    while start < last:
        end = start + size
        if end + 2 * size > last:
            end = last
        windows.append((start, end))
        start, size = end, 2 * size
    return windows


class DualAveraging:
    """Nesterov dual averaging of log step size towards a target acceptance (Hoffman & Gelman 2014)."""

    def __init__(
        self, step_size: Tensor, target_accept: float = 0.8, gamma: float = 0.05, t0: float = 10.0, kappa: float = 0.75
    ) -> None:
        self.target_accept, self.gamma, self.t0, self.kappa = target_accept, gamma, t0, kappa
        self.restart(step_size)

    def restart(self, step_size: Tensor) -> None:
        self.mu = torch.log(10 * step_size)
        self.count = 0
        self.s_bar = torch.zeros_like(step_size)
        self.x_bar = torch.zeros_like(step_size)

    def update(self, accept_prob: Tensor) -> Tensor:
        """Feed one transition's mean acceptance; returns the step size for the next one."""
        self.count += 1
        eta = 1.0 / (self.count + self.t0)
        self.s_bar = (1 - eta) * self.s_bar + eta * (self.target_accept - accept_prob.clamp(max=1.0))
        x = self.mu - self.s_bar * math.sqrt(self.count) / self.gamma
        weight = self.count**-self.kappa
        self.x_bar = (1 - weight) * self.x_bar + weight * x
        return torch.exp(x)

    @property
    def final(self) -> Tensor:
        """The averaged step size that sampling uses after warm-up."""
        return torch.exp(self.x_bar)


class WindowVariance:
    """Welford's running variance of every chain's draws, regularised towards 1e-3 (Stan)."""

    def __init__(self, like: Tensor) -> None:
        self.n = 0
        self.mean = torch.zeros_like(like)
        self.m2 = torch.zeros_like(like)

    def add(self, q: Tensor) -> None:
        self.n += 1
        delta = q - self.mean
        self.mean += delta / self.n
        self.m2 += delta * (q - self.mean)

    def inv_mass(self) -> Tensor:
        n = self.n
        var = self.m2 / max(n - 1, 1)
        return (n / (n + 5.0)) * var + 1e-3 * (5.0 / (n + 5.0))


def find_step_size(
    target: Target,
    z: Phase,
    step_size: Tensor,
    inv_mass: Tensor,
    seed: int,
    chains: Tensor,
    iteration: int,
    max_rounds: int = 100,
) -> Tensor:
    """Stan's heuristic: double or halve each chain's step until one leapfrog step's
    acceptance crosses 0.8, so that dual averaging starts from a sensible scale."""
    log_target = math.log(0.8)
    step_size = step_size.clone()
    direction = None
    pending = torch.ones_like(step_size, dtype=torch.bool)
    for r in range(max_rounds):
        p = draw_momentum(seed, chains, inv_mass, iteration, rng.Stream.STEP_SEARCH, r)
        h0 = kinetic(p, inv_mass) - z.logp
        delta = energy_error(leapfrog(target, z.with_momentum(p), step_size, inv_mass), inv_mass, h0)
        up = -delta > log_target
        if direction is None:
            direction = up
        pending &= up == direction
        if not pending.any():
            break
        step_size = torch.where(pending, torch.where(direction, 2 * step_size, 0.5 * step_size), step_size)
    return step_size
