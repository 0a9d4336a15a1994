"""Tracing: Edward2's interception stack and the program transformations built on it.

A probabilistic program is ordinary Python that constructs random variables through
`traceable` constructors. While a tracer is on the stack, every traceable call is handed
to it as `tracer(f, *args, **kwargs)` instead of running `f`; the tracer may change the
arguments (e.g. fix `value=`), record the result, and must forward by calling
`traceable(f)(*args, **kwargs)`, which gives the call to the next tracer down. This one
mechanism yields `tape` (record), `condition` (fix values) and `log_joint` (score).
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch

Tracer = Callable[..., Any]


class _Stack(threading.local):
    """Per thread, so that a loader thread building variables sees no foreign tracer."""

    def __init__(self) -> None:
        self.tracers: list[Tracer] = []


_state = _Stack()


@contextmanager
def trace(tracer: Tracer) -> Iterator[None]:
    """Intercept every traceable call made inside the block with `tracer(f, *args, **kwargs)`."""
    _state.tracers.append(tracer)
    try:
        yield
    finally:
        _state.tracers.pop()


def tracing() -> bool:
    """Whether a tracer is active: the one check untraced code pays (Bayesian layers ask it)."""
    return bool(_state.tracers)


def traceable(f: Callable[..., Any]) -> Callable[..., Any]:
    """Make `f` visible to tracers: the innermost tracer runs it (with itself removed)."""

    @functools.wraps(f)
    def traced(*args: Any, **kwargs: Any) -> Any:
        tracers = _state.tracers
        if not tracers:
            return f(*args, **kwargs)
        tracer = tracers.pop()
        try:
            return tracer(f, *args, **kwargs)
        finally:
            tracers.append(tracer)

    return traced


@contextmanager
def tape() -> Iterator[OrderedDict[str, Any]]:
    """Record the named random variables of the block, in order of construction."""
    recorded: OrderedDict[str, Any] = OrderedDict()

    def record(f: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        out = traceable(f)(*args, **kwargs)
        name = kwargs.get("name")
        if name is not None:
            if name in recorded:
                raise ValueError(f"two random variables are named {name!r}; give each a unique name=")
            recorded[name] = out
        return out

    with trace(record):
        yield recorded


@contextmanager
def _fixed(values: Mapping[str, Any]) -> Iterator[None]:
    def fix(f: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        name = kwargs.get("name")
        if name is not None and name in values:
            kwargs["value"] = values[name]
        return traceable(f)(*args, **kwargs)

    with trace(fix):
        yield


def condition(model: Callable[..., Any] | None = None, /, **values: Any) -> Any:
    """Fix the named random variables to `values`.

    `condition(model, y=obs)` returns the conditioned program; `with condition(y=obs):`
    conditions whatever runs inside the block.
    """
    if model is None:
        return _fixed(values)

    @functools.wraps(model)
    def conditioned(*args: Any, **kwargs: Any) -> Any:
        with _fixed(values):
            return model(*args, **kwargs)

    return conditioned


def log_joint(model: Callable[..., Any], batch_dims: int = 0) -> Callable[..., torch.Tensor]:
    """The log density of `model` as a function `f(*model_args, **values) -> Tensor`.

    Every random variable the model builds takes its value from `values` (by name) or its
    own `value=`; each term log p(value | parents) (for a variable with a `prior`, such as a
    Bayesian layer's weight, the prior's: its own distribution is then a variational
    posterior, not part of the model) is summed over all but its first
    `batch_dims` dimensions. With `batch_dims=1` and values carrying a leading chains
    dimension (and model ops that broadcast over it), the result has shape [chains]:
    many MCMC chains are scored in one pass. Each term must then carry those leading dims.
    """

    def log_density(*args: Any, **values: Any) -> torch.Tensor:
        terms: list[torch.Tensor] = []
        seen: set[str] = set()

        def score(f: Callable[..., Any], *f_args: Any, **kwargs: Any) -> Any:
            name = kwargs.get("name")
            if name in values:
                kwargs["value"] = values[name]
            elif kwargs.get("value") is None:
                raise LookupError(f"log_joint: random variable {name!r} has no value; pass {name}=...")
            if name is not None:
                if name in seen:
                    raise ValueError(f"two random variables are named {name!r}; give each a unique name=")
                seen.add(name)
            rv = traceable(f)(*f_args, **kwargs)
            lp = rv.model_log_prob()
            terms.append(lp.sum(tuple(range(batch_dims, lp.dim()))) if lp.dim() > batch_dims else lp)
            return rv

        with trace(score):
            model(*args)
        unknown = values.keys() - seen
        if unknown:
            raise TypeError(f"log_joint: the model has no random variable named {sorted(unknown)}")
        if not terms:
            raise ValueError("log_joint: the model constructed no random variable")
        return functools.reduce(torch.add, terms)

    return log_density
