"""The posterior's sigma = softplus(rho): wanted on every step by every sample, the KL and the bias.

Two things make it cheap. On the CPU it is computed from vectorised kernels: torch's CPU
softplus goes through a scalar log1p (10 ns an element here), and recomputed four times a step
per layer it was a tenth of a Bayesian MLP step (docs/performance.md). And inside `shared()`
(one loss: its forward and its KL; one prediction) a parameter's softplus is computed once and
reused while the parameter is unchanged; each use still back-propagates on its own.

    >>> rho = torch.nn.Parameter(torch.tensor([-30.0, 0.0, 30.0]))
    >>> torch.allclose(softplus(rho), F.softplus(rho))
    True
    >>> with shared():
    ...     softplus(rho).data_ptr() == softplus(rho).data_ptr()  # one value, computed once
    True

Outside `shared()` nothing is kept: code that writes a parameter behind autograd's back
(`p.data`, a communication library's in-place broadcast) cannot leave a stale value behind.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable


class _Scope(threading.local):
    values: dict[int, tuple[Tensor, tuple[Any, ...], Tensor]] | None = None


_scope = _Scope()


@contextmanager
def shared() -> Iterator[None]:
    """Share each parameter's softplus between its uses inside (nested scopes join the outermost)."""
    if _scope.values is not None:
        yield
        return
    _scope.values = {}
    try:
        yield
    finally:
        _scope.values = None


def softplus(x: Tensor) -> Tensor:
    """log(1 + e^x), equal to F.softplus to an ulp or two, differentiable; never modify it in place."""
    return _Softplus.apply(x)


def _value(x: Tensor) -> Tensor:
    """softplus(x) without autograd; inside `shared()`, kept per parameter (a leaf that requires
    grad) and state (its storage and in-place version)."""
    values = _scope.values
    if values is None or not (x.is_leaf and x.requires_grad):
        return _compute(x)
    key = (x.data_ptr(), x._version, x.dtype, x.shape, x.device)
    hit = values.get(id(x))
    if hit is not None and hit[0] is x and hit[1] == key:
        return hit[2]
    with torch.no_grad():
        value = _compute(x)
    values[id(x)] = (x, key, value)  # holding x keeps its id from being reused inside the scope
    return value


def _compute(x: Tensor) -> Tensor:
    """max(x, 0) + log1p(t), t = e^-|x| in (0, 1], with log1p(t) = log(v) + (t - (v - 1)) / v for
    v = 1 + t rounded: the first-order correction of that rounding, exact to an ulp (and = t
    where v rounds to 1). Off the CPU torch's own kernel is one fused pass."""
    if x.device.type != "cpu":
        return F.softplus(x)
    t = x.abs().neg_().exp_()
    v = t + 1
    t.sub_(v - 1).div_(v).add_(v.log_())
    return t.add_(x.clamp_min(0))


class _Softplus(torch.autograd.Function):
    """The (possibly shared) value, as a view so that each use is its own autograd output;
    the gradient is sigmoid(x)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        value = _value(x)
        return value.view_as(value)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return grad * torch.sigmoid(x)
