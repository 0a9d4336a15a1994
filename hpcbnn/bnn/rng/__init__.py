"""Fast counter-based standard normal noise, bit-identical on every CPU, thread count and split.

    fill_normal(out, seeds)     # out: contiguous CPU [k, ...] float32/float64; row j from seeds[j]
    fill_normal(out, seeds, weights=(mu, sigma, w))  # and w[j] = mu + sigma * out[j, :m] in the same pass
    scale_shift(w, eps, sigma, mu)                   # the same weights, later, from draws already made

Element i of row j is a pure function of (seeds[j], i) and the dtype: Philox4x32-10 keyed by the
64-bit seed (the generator of Random123, cuRAND and JAX), Box-Muller with our own polynomials
(normal.c says how they stay bit-exact). So a prefix of a longer row is the shorter row, and
ranks on different nodes that draw the same (seed, sample) get the same weights.

The C kernel is compiled on first use with the system C compiler, one library per code path
(hpcbnn.native: into $HPCBNN_CACHE/kernels, once per node). The code path is the widest the
CPU runs (AVX-512, AVX2, baseline SSE2) unless HPCBNN_RNG_ISA names one; "scalar" (no
vectorisation) exists to check that every path gives the same bits.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import torch

from hpcbnn import native
from hpcbnn.native import CompilerNotFound, cpu_flags

__all__ = ["CompilerNotFound", "Weights", "fill_normal", "isa", "scale_shift"]

_SOURCE = Path(__file__).with_name("normal.c")
# Value-safe flags only: no contraction into FMA, no reassociation (normal.c relies on it).
_COMMON = ["-O3", "-ffp-contract=off", "-fno-fast-math", "-fno-math-errno", "-fPIC", "-shared", "-pthread", "-lm"]
# OpenMP first: the kernel then runs in the pool torch's own ops use (torch's libgomp, loaded
# first, answers to the same soname), whose threads spin awake after each op and would otherwise
# take half the cores from freshly started threads (docs/performance.md); plain pthreads where the
# compiler has no OpenMP.
_THREADING: tuple[list[str], ...] = (["-fopenmp"], [])
_X86 = platform.machine().lower() in ("x86_64", "amd64")
_ISA_FLAGS: dict[str, list[str]] = {
    "scalar": ["-fno-tree-vectorize", "-fno-tree-slp-vectorize"],
    "baseline": [],
    **(
        {"avx2": ["-mavx2", "-mfma"], "avx512": ["-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl", "-mfma"]}
        if _X86
        else {}
    ),
}
_ISA_CPU_FLAGS = {"avx2": {"avx2", "fma"}, "avx512": {"avx512f", "avx512dq", "avx512bw", "avx512vl", "fma"}}


def isa() -> str:
    """The code path fill_normal uses: $HPCBNN_RNG_ISA, else the widest this CPU runs."""
    chosen = os.environ.get("HPCBNN_RNG_ISA")
    if chosen:
        if chosen not in _ISA_FLAGS:
            raise ValueError(f"HPCBNN_RNG_ISA={chosen!r}: expected one of {', '.join(_ISA_FLAGS)}")
        return chosen
    flags = cpu_flags()
    return next(
        (name for name in ("avx512", "avx2") if name in _ISA_FLAGS and _ISA_CPU_FLAGS[name] <= flags), "baseline"
    )


@functools.cache
def _library(name: str) -> ctypes.CDLL:
    """The kernel built for code path `name` (hpcbnn.native builds it once per source and flags)."""
    lib = native.load(_SOURCE, f"normal-{name}", _COMMON + _ISA_FLAGS[name], _THREADING)
    for fn in (lib.hpcbnn_fill_normal_f32, lib.hpcbnn_fill_normal_f64):
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint64, ctypes.c_int]
        fn.argtypes += [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        fn.restype = ctypes.c_int
    lib.hpcbnn_philox4x32_10.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    lib.hpcbnn_philox4x32_10.restype = None
    return lib


Weights = tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor]
"""(mu, sigma, w): a Bayesian layer's means (or None), standard deviations and the [k, ...] weight samples to write."""


def fill_normal(
    out: torch.Tensor,
    seeds: Sequence[int],
    offset: int = 0,
    *,
    weights: Weights | None = None,
    isa_name: str | None = None,
) -> torch.Tensor:
    """Fill each row out[j] (contiguous, k = len(seeds) rows) with standard normal draws from seeds[j].

    Element i of a row is draw `offset + i` of its seed (a 64-bit unsigned int), so a rank can
    draw just its slice of a longer row. Uses torch.get_num_threads() threads, from torch's OpenMP
    pool where the kernel was built with OpenMP (the ctypes call releases the GIL); the values do
    not depend on them. `isa_name` forces a code path (tests).

    With `weights` = (mu, sigma, w), the same pass also writes the weight samples
    w[j] = sigma * out[j, :m] + mu, m = sigma.numel(), while the draws are in cache: see
    `scale_shift`, which gives the same bits from draws already made.
    """
    if out.device.type != "cpu" or not out.is_contiguous() or out.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"fill_normal needs a contiguous CPU float32/float64 tensor, got {out.dtype} on {out.device}")
    k = len(seeds)
    if out.dim() == 0 or out.shape[0] != k:
        raise ValueError(f"fill_normal: {k} seeds for a tensor of shape {tuple(out.shape)} (one seed per row)")
    if not 0 <= offset < 1 << 63:
        raise ValueError(f"fill_normal: offset {offset} out of [0, 2^63)")
    if any(not 0 <= s < 1 << 64 for s in seeds):
        raise ValueError("fill_normal: seeds must be in [0, 2^64)")
    if out.numel() == 0:
        return out
    _run(out, (ctypes.c_uint64 * k)(*seeds), out.numel() // k, offset, weights, isa_name)
    return out


def scale_shift(
    w: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor, mu: torch.Tensor | None = None
) -> torch.Tensor:
    """w[j] = sigma * eps[j] + mu for each of the k rows (mu None: sigma * eps[j]), with one
    rounding per element (a fused multiply-add, as torch.addcmul on FMA hardware), the same bits
    on every code path. eps's rows may be slices of longer rows (a layer's weight part of its noise).
    """
    if eps.dim() == 0 or not eps[0].is_contiguous():
        raise ValueError(f"scale_shift: each row of eps must be contiguous, got strides {eps.stride()}")
    if eps.shape[0] and eps.numel():
        _run(eps, None, eps.stride(0), 0, (mu, sigma, w), None)
    return w


def _run(
    out: torch.Tensor, seeds: ctypes.Array | None, n: int, offset: int, weights: Weights | None, isa_name: str | None
) -> None:
    k = out.shape[0]
    pointers: list[int | None] = [None, None, None, 0]
    if weights is not None:
        mu, sigma, w = weights
        m = sigma.numel()
        parts = [t for t in (mu, sigma, w) if t is not None]
        if (
            any(t.dtype != out.dtype or t.device != out.device or not t.is_contiguous() for t in parts)
            or (mu is not None and mu.numel() != m)
            or w.numel() != k * m
            or m > n
        ):
            raise ValueError(
                f"weights: contiguous {out.dtype} CPU tensors, mu and sigma of one size m <= {n} and w of "
                f"{k} x m elements; got mu {None if mu is None else tuple(mu.shape)}, sigma {tuple(sigma.shape)}, "
                f"w {tuple(w.shape)}"
            )
        pointers = [None if mu is None else mu.data_ptr(), sigma.data_ptr(), w.data_ptr(), m]
    lib = _library(isa_name or isa())
    fn = lib.hpcbnn_fill_normal_f32 if out.dtype == torch.float32 else lib.hpcbnn_fill_normal_f64
    fn(out.data_ptr(), seeds, k, n, offset, torch.get_num_threads(), *pointers)


def _philox4x32_10(counters: torch.Tensor, key: tuple[int, int]) -> torch.Tensor:
    """Philox4x32-10 of each row of `counters` ([m, 4] int32 bit patterns): known-answer tests."""
    counters = counters.to(torch.int32).contiguous()
    out = torch.empty_like(counters)
    k = (ctypes.c_uint32 * 2)(*key)
    _library(isa()).hpcbnn_philox4x32_10(counters.data_ptr(), k, out.data_ptr(), counters.shape[0])
    return out
