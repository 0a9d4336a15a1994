"""Counter-based random numbers: each draw is a pure function of (seed, chain, counters).

A chain's randomness must not depend on which rank holds it or on how many chains share
its batch, or P = 1 and P = 2 ranks would sample different chains. A stateful generator
per chain would do, but would be advanced in a Python loop over chains; hashing the
counters instead (SplitMix64's finaliser, as counter-based generators such as Philox do
with a cipher) gives every chain's numbers for a step in one vectorised call, and needs no
state to checkpoint.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np
import torch


class Stream(IntEnum):
    """What a draw is for: the counter after the iteration, so no two uses share numbers."""

    INIT = 0
    MOMENTUM = 1
    ACCEPT = 2
    DIRECTION = 3
    MERGE = 4
    LEAF = 5
    STEP_SEARCH = 6


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(z: np.ndarray) -> np.ndarray:
    z = (z + _GOLDEN) & np.uint64(0xFFFFFFFFFFFFFFFF)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _bits(seed: int, chains: torch.Tensor, counters: tuple[int, ...], n: int) -> np.ndarray:
    """64 random bits for each of `chains` x `n`, keyed by (seed, chain, *counters, index)."""
    with np.errstate(over="ignore"):
        h = _mix(np.full((), seed & 0xFFFFFFFFFFFFFFFF, dtype=np.uint64))
        h = _mix(h ^ chains.cpu().numpy().astype(np.uint64)[:, None])
        for c in counters:
            h = _mix(h ^ np.uint64(c & 0xFFFFFFFFFFFFFFFF))
        return _mix(h ^ np.arange(n, dtype=np.uint64)[None, :])


def uniform(
    seed: int,
    chains: torch.Tensor,
    *counters: int,
    n: int = 1,
    dtype: torch.dtype = torch.float64,
    device: torch.device | None = None,
) -> torch.Tensor:
    """U(0, 1) draws of shape [len(chains), n], never exactly 0 or 1."""
    u = ((_bits(seed, chains, counters, n) >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53
    return torch.from_numpy(u).to(dtype=dtype, device=device or chains.device)


def normal(
    seed: int,
    chains: torch.Tensor,
    *counters: int,
    n: int = 1,
    dtype: torch.dtype = torch.float64,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Standard normal draws of shape [len(chains), n] (inverse CDF of `uniform`)."""
    return torch.special.ndtri(uniform(seed, chains, *counters, n=n, device=device)).to(dtype)
