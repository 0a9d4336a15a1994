"""Random variables: a `torch.distributions` distribution paired with one value of it.

A `RandomVariable` behaves like its value wherever a tensor is expected (arithmetic,
indexing, `torch.*` functions, attributes such as `shape`, `dtype`, `device`), so a model
is written as ordinary tensor code; results of such operations are plain tensors. The
constructors below (`Normal(loc, scale, name="w")`, ...) are `traceable`, which is what
lets `tape`, `condition` and `log_joint` (hpcbnn.ppl.tracing) see and rewrite a program.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import distributions as D

from hpcbnn.ppl.tracing import traceable


def _unwrap(obj: Any) -> Any:
    if isinstance(obj, RandomVariable):
        return obj.value
    if isinstance(obj, (list, tuple)):
        return type(obj)(_unwrap(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _unwrap(v) for k, v in obj.items()}
    return obj


class RandomVariable:
    """A distribution and its value: sampled (reparameterised when possible) unless given.

    A variable of a variational program may carry its `prior`, a random variable with the
    same value under the model's distribution: `distribution` is then the posterior that
    drew the value, and the model's log density (`model_log_prob`, `log_joint`) uses the prior.
    """

    def __init__(
        self,
        distribution: D.Distribution,
        sample_shape: Sequence[int] = (),
        value: Any = None,
        name: str | None = None,
        prior: D.Distribution | None = None,
    ) -> None:
        self.distribution = distribution
        self.sample_shape = torch.Size(sample_shape)
        self.name = name
        if value is None:
            draw = distribution.rsample if distribution.has_rsample else distribution.sample
            value = draw(self.sample_shape)
        self.value: torch.Tensor = torch.as_tensor(_unwrap(value))
        self.prior: RandomVariable | None = (
            None if prior is None else RandomVariable(prior, value=self.value, name=name)
        )

    @classmethod
    def __torch_function__(
        cls, func: Callable[..., Any], types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        return func(*_unwrap(args), **_unwrap(kwargs or {}))

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__") or attr == "value":
            raise AttributeError(attr)
        return getattr(self.value, attr)

    def log_prob(self) -> torch.Tensor:
        """log p(value) under the variable's own distribution."""
        return self.distribution.log_prob(self.value)

    def model_log_prob(self) -> torch.Tensor:
        """log p(value) under the model: the prior's when the variable has one, else `log_prob`."""
        return (self if self.prior is None else self.prior).log_prob()

    def __repr__(self) -> str:
        name = f" {self.name!r}" if self.name else ""
        return f"<RandomVariable{name} {type(self.distribution).__name__} value={self.value!r}>"

    __hash__ = object.__hash__


def _forward(op: str) -> Callable[..., Any]:
    def method(self: RandomVariable, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.value, op)(*args, **kwargs)

    method.__name__ = op
    return method


for _op in (
    "add radd sub rsub mul rmul truediv rtruediv floordiv rfloordiv mod rmod pow rpow "
    "matmul rmatmul and rand or ror xor rxor neg pos abs invert lt le gt ge eq ne "
    "getitem len iter float int bool index array"
).split():
    setattr(RandomVariable, f"__{_op}__", _forward(f"__{_op}__"))


@traceable
def random_variable(
    distribution: D.Distribution, *, sample_shape: Sequence[int] = (), value: Any = None, name: str | None = None
) -> RandomVariable:
    """Wrap any torch distribution (e.g. `Independent`, a transformed one) as a traceable variable."""
    return RandomVariable(distribution, sample_shape, value, name)


def _constructor(dist: type[D.Distribution]) -> Callable[..., RandomVariable]:
    def make(
        *args: Any, sample_shape: Sequence[int] = (), value: Any = None, name: str | None = None, **kwargs: Any
    ) -> RandomVariable:
        return RandomVariable(dist(*args, **kwargs), sample_shape, value, name)

    make.__name__ = make.__qualname__ = dist.__name__
    make.__doc__ = (
        f"A random variable with a `torch.distributions.{dist.__name__}`; arguments as "
        f"there, plus `sample_shape`, `value` and `name`."
    )
    return traceable(make)


Bernoulli = _constructor(D.Bernoulli)
Beta = _constructor(D.Beta)
Binomial = _constructor(D.Binomial)
Categorical = _constructor(D.Categorical)
Cauchy = _constructor(D.Cauchy)
Dirichlet = _constructor(D.Dirichlet)
Exponential = _constructor(D.Exponential)
Gamma = _constructor(D.Gamma)
HalfCauchy = _constructor(D.HalfCauchy)
HalfNormal = _constructor(D.HalfNormal)
InverseGamma = _constructor(D.InverseGamma)
Laplace = _constructor(D.Laplace)
LogNormal = _constructor(D.LogNormal)
MultivariateNormal = _constructor(D.MultivariateNormal)
Normal = _constructor(D.Normal)
Poisson = _constructor(D.Poisson)
StudentT = _constructor(D.StudentT)
Uniform = _constructor(D.Uniform)
