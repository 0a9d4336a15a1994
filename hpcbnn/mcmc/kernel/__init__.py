"""Logistic regression's log density and gradient in one pass over the features, for batched chains.

    sums = logistic_pass(x, half_w)   # x [n, d] float32 CPU, half_w [chains, d]
    if sums is not None:              # None: no AVX2/FMA CPU or no C compiler; use NumPy
        log_cosh, x_tanh = sums       # sum_i |h| - log1p(|tanh h|) [chains], x^T tanh h [chains, d]

with h = x half_w^T. `logistic.c` reads each block of rows once for both products, eight
chains to a register, where two BLAS calls read it twice (docs/performance.md). It runs on
torch.get_num_threads() threads of torch's OpenMP pool; float32 products, float64 sums.
"""

from __future__ import annotations

import ctypes
import functools
import platform
from pathlib import Path

import torch
from torch import Tensor

from hpcbnn import native

__all__ = ["MIN_CHAINS", "available", "logistic_pass"]

_SOURCE = Path(__file__).with_name("logistic.c")
_FLAGS = ["-O3", "-mavx2", "-mfma", "-fPIC", "-shared", "-lm"]
_LANES = 8
MIN_CHAINS = 3
"""Below this, NumPy's two BLAS products are as fast: a group of 8 lanes costs the same for 1 chain as for 8."""


@functools.cache
def available() -> bool:
    """Whether this CPU runs the kernel (x86-64 with AVX2 and FMA) and a C compiler can build it."""
    if platform.machine().lower() not in ("x86_64", "amd64") or not {"avx2", "fma"} <= native.cpu_flags():
        return False
    try:
        _library()
    except native.CompilerNotFound:
        return False
    return True


@functools.cache
def _library() -> ctypes.CDLL:
    lib = native.load(_SOURCE, "logistic-avx2", _FLAGS, (["-fopenmp"], []))
    fn = lib.hpcbnn_logistic_pass_f32
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64]
    fn.argtypes += [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    fn.restype = ctypes.c_int
    return lib


def logistic_pass(x: Tensor, half_w: Tensor) -> tuple[Tensor, Tensor] | None:
    """(sum over rows of |h| - log1p(|t|) [chains], x^T t [chains, d]) in float64, t = tanh(h),
    h = x half_w^T; None where the kernel does not apply (see `available`)."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 2 or not available():
        return None
    chains, d = half_w.shape
    if d != x.shape[1]:
        raise ValueError(f"logistic_pass: weights of {d} features for data of {x.shape[1]}")
    groups = -(-chains // _LANES)
    w = torch.zeros(groups * _LANES, d, dtype=torch.float32)
    w[:chains] = half_w
    w = w.view(groups, _LANES, d).transpose(1, 2).contiguous()  # [groups, d, lanes]: a feature's lanes adjacent
    log_cosh = torch.empty(groups * _LANES, dtype=torch.float64)
    grad = torch.empty(groups, d, _LANES, dtype=torch.float64)
    x = x.contiguous()
    used = _library().hpcbnn_logistic_pass_f32(
        x.data_ptr(), len(x), d, w.data_ptr(), groups, log_cosh.data_ptr(), grad.data_ptr(), torch.get_num_threads()
    )
    if used < 0:
        raise MemoryError("logistic_pass: the kernel could not allocate its per-thread sums")
    return log_cosh[:chains], grad.transpose(1, 2).reshape(groups * _LANES, d)[:chains]
