"""The bundled examples: traced programs, their data, and the logistic-regression hot path.

Programs follow the random-variable core's batching rule: latent values may carry a
leading chains dimension, so every operation indexes from the right (`mu[..., None]`,
`einsum("...d,nd->...n")`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hpcbnn.bnn.bayesianize import bayesianize
from hpcbnn.bnn.layers import BayesianModule
from hpcbnn.bnn.models import mlp
from hpcbnn.bnn.noise import current
from hpcbnn.bnn.objectives import gaussian_params
from hpcbnn.errors import UsageError
from hpcbnn.mcmc import kernel, rng
from hpcbnn.mcmc.hmc import Target
from hpcbnn.mcmc.target import ModelTarget, NetworkTarget
from hpcbnn.ppl.random_variable import Bernoulli, Categorical, HalfCauchy, MultivariateNormal, Normal

COVERTYPE_ROWS = 581_012
COVERTYPE_FEATURES = 54  # 10 quantitative, 4 wilderness areas, 40 soil types; plus an intercept
_BLOCK = 8192  # rows generated from one (seed, block) stream


def gaussian(loc: Tensor, cov: Tensor) -> None:
    """x ~ N(loc, cov): a posterior known exactly."""
    MultivariateNormal(loc, covariance_matrix=cov, name="x")


def linear_regression(x: Tensor, noise_scale: float = 1.0, prior_scale: float = 1.0) -> None:
    """w ~ N(0, prior_scale^2 I), y ~ N(x w, noise_scale^2): conjugate, so the posterior is known."""
    w = Normal(torch.zeros(x.shape[-1], dtype=x.dtype), prior_scale, name="w")
    Normal(torch.einsum("...d,nd->...n", w, x), noise_scale, name="y")


def linear_regression_posterior(
    x: Tensor, y: Tensor, noise_scale: float = 1.0, prior_scale: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Mean and covariance of w given (x, y) under `linear_regression`."""
    precision = x.T @ x / noise_scale**2 + torch.eye(x.shape[1], dtype=x.dtype) / prior_scale**2
    cov = torch.linalg.inv(precision)
    return cov @ (x.T @ y) / noise_scale**2, cov


def eight_schools(sigma: Tensor) -> None:
    """Rubin's eight schools, non-centred: the classic hierarchical example (tau is positive)."""
    mu = Normal(torch.tensor(0.0, dtype=sigma.dtype), 5.0, name="mu")
    tau = HalfCauchy(torch.tensor(5.0, dtype=sigma.dtype), name="tau")
    theta_tilde = Normal(torch.zeros(len(sigma), dtype=sigma.dtype), 1.0, name="theta_tilde")
    Normal(mu.value[..., None] + tau.value[..., None] * theta_tilde.value, sigma, name="y")


EIGHT_SCHOOLS_Y = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0], dtype=torch.float64)
EIGHT_SCHOOLS_SIGMA = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0], dtype=torch.float64)


def logistic_regression(x: Tensor, prior_scale: float = 1.0) -> None:
    """w ~ N(0, prior_scale^2 I), y ~ Bernoulli(sigmoid(x w)) (x includes an intercept column)."""
    w = Normal(torch.zeros(x.shape[-1], dtype=torch.float64), prior_scale, name="w")
    Bernoulli(logits=torch.einsum("...d,nd->...n", w, x.to(torch.float64)), name="y")


class LogisticRegression:
    """The log posterior of `logistic_regression` on one data shard, with an analytic gradient.

    The likelihood is written symmetrically, y z - softplus(z) = (y - 1/2) z - log(2 cosh(z/2)),
    so X^T (y - 1/2) is precomputed and each row needs only h = z/2 and t = tanh(h):
    log(2 cosh h) = |h| + log 2 - log1p(|t|), stable for any h, and its derivative is t.

    The cost is the two products with x, so all chains share them and each block of rows is
    multiplied twice (h = x_b w/2, then x_b^T t) while it is still in cache: x streams from
    memory once per evaluation whatever the number of chains. On the CPU, float32 features
    with 3 or more chains go through hpcbnn.mcmc.kernel, which does both products and the
    elementwise work on a block of 8 rows in registers (1.6x faster than NumPy at 8 chains);
    otherwise the blocks go through NumPy: its OpenBLAS runs these skinny products twice as
    fast as torch's MKL, and its tanh and log1p are vectorised where torch's are not
    (docs/performance.md). Products run in x's dtype (float32 features, as in NumPyro, give
    log densities correct to about 1e-7 relative); sums over blocks in float64.
    """

    def __init__(
        self, x: Tensor, y: Tensor, prior_scale: float = 1.0, prior: bool = True, block_logits: int = 16384
    ) -> None:
        self.x, self.prior_scale, self.prior, self.block_logits = x, prior_scale, prior, block_logits
        self.xty = x.T.to(torch.float64) @ (y.to(torch.float64) - 0.5)
        self.log2_rows = len(x) * math.log(2)
        self.dim = x.shape[1]

    def block_rows(self, chains: int) -> int:
        """Rows per block: [rows, chains] = 16384 logits (64 KB in float32) keep the temporaries
        in L1/L2 and, for 8 chains, the 2048-row block of x (450 KB) in L2 between its two
        products; fewer chains take longer blocks, as each NumPy call costs ~1 us (measured
        best for 1 to 16 chains, docs/performance.md)."""
        return max(1, self.block_logits // chains)

    def __call__(self, theta: Tensor) -> tuple[Tensor, Tensor]:
        half_w = 0.5 * theta.to(self.x.dtype)
        cpu = self.x.device.type == "cpu"
        fused = kernel.logistic_pass(self.x, half_w) if cpu and len(half_w) >= kernel.MIN_CHAINS else None
        log_cosh, x_tanh = fused or (self.numpy_pass(half_w) if cpu else self.torch_pass(half_w))
        lp = theta @ self.xty - log_cosh.to(theta) - self.log2_rows
        grad = self.xty - 0.5 * x_tanh.to(theta)
        if self.prior:
            var = self.prior_scale**2
            lp = lp - 0.5 * (theta * theta).sum(-1) / var - 0.5 * self.dim * math.log(2 * math.pi * var)
            grad = grad - theta / var
        return lp, grad

    def numpy_pass(self, half_w: Tensor) -> tuple[Tensor, Tensor]:
        """sum over rows of |h| - log1p(|t|) [chains] and x^T t [chains, dim], float64, on the CPU."""
        w = half_w.T.contiguous().numpy()
        rows = self.block_rows(w.shape[1])
        shape = (rows, w.shape[1])
        h_buf, a_buf, m_buf = np.empty(shape, w.dtype), np.empty(shape, w.dtype), np.empty(shape, w.dtype)
        ones = np.ones(rows, w.dtype)
        log_cosh, x_tanh = np.zeros(w.shape[1]), np.zeros(w.shape)
        x = self.x.numpy()
        for start in range(0, len(x), rows):
            xb = x[start : start + rows]
            n = len(xb)
            h, a, m = h_buf[:n], a_buf[:n], m_buf[:n]
            np.matmul(xb, w, out=h)
            np.abs(h, out=a)
            np.tanh(h, out=h)
            np.log1p(np.abs(h, out=m), out=m)
            log_cosh += ones[:n] @ np.subtract(a, m, out=a)
            x_tanh += xb.T @ h
        return torch.from_numpy(log_cosh), torch.from_numpy(x_tanh.T)

    def torch_pass(self, half_w: Tensor) -> tuple[Tensor, Tensor]:
        """`numpy_pass` in torch, for x on an accelerator."""
        log_cosh = torch.zeros(len(half_w), dtype=torch.float64, device=half_w.device)
        x_tanh = torch.zeros(half_w.shape, dtype=torch.float64, device=half_w.device)
        for xb in self.x.split(self.block_rows(len(half_w))):
            h = half_w @ xb.T
            t = h.tanh()
            log_cosh += (h.abs() - t.abs().log1p()).sum(1)
            x_tanh += t @ xb
        return log_cosh, x_tanh


def covertype_shaped(start: int, stop: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Rows [start, stop) of a synthetic data set shaped like covertype, plus an intercept.

    Each block of rows comes from its own (seed, block) stream, so a data rank generates
    only its own rows and any split reproduces the same data set. Columns: 10 Gaussian
    quantities, a one-hot wilderness area (4) and soil type (40), standardised with their
    known moments, then a column of ones; labels from a fixed logistic model.
    """
    if stop <= start:
        return torch.empty(0, COVERTYPE_FEATURES + 1, dtype=dtype), torch.empty(0, dtype=dtype)
    meta = np.random.default_rng([seed, 2**32])
    wilderness_p = meta.dirichlet(np.full(4, 2.0))
    soil_p = meta.dirichlet(np.full(40, 0.5))
    w_true = meta.normal(0.0, 0.5, COVERTYPE_FEATURES + 1)
    p = np.concatenate([wilderness_p, soil_p])
    first, last = start // _BLOCK, -(-stop // _BLOCK)
    xs, ys = [], []
    for b in range(first, last):
        g = np.random.default_rng([seed, b])
        quantities = g.standard_normal((_BLOCK, 10))
        onehot = np.concatenate(
            [np.eye(4)[g.choice(4, _BLOCK, p=wilderness_p)], np.eye(40)[g.choice(40, _BLOCK, p=soil_p)]], 1
        )
        x = np.concatenate([quantities, (onehot - p) / np.sqrt(p * (1 - p)), np.ones((_BLOCK, 1))], 1)
        xs.append(x)
        ys.append(g.random(_BLOCK) < 1 / (1 + np.exp(-x @ w_true)))
    rows = slice(start - first * _BLOCK, stop - first * _BLOCK)
    features = torch.from_numpy(np.concatenate(xs)[rows]).to(dtype).contiguous()
    return features, torch.from_numpy(np.concatenate(ys)[rows]).to(dtype)


def shard_rows(n: int, rank: int, size: int) -> tuple[int, int]:
    """The contiguous rows [start, stop) of data rank `rank` out of `size`: sizes differ by <= 1."""
    return rank * n // size, (rank + 1) * n // size


@dataclass
class Problem:
    """A bundled example made ready for the sampler on this data rank."""

    local: Target
    """This rank's part of the log density: its data shard (and the prior on data rank 0)."""
    dim: int
    names: list[str]
    constrain: Callable[[Tensor], Tensor]
    """theta [n, dim] -> the named parameters [n, len(names)] in their own space."""
    splittable: bool
    """Whether the likelihood can be split over data ranks (a model with data rows)."""
    init: Callable[[int, Tensor], Tensor] | None = None
    """(seed, chains) -> initial theta [chains, dim]; None: the sampler's default."""


def _traced(
    model: Callable[..., None], *args: Any, observed: Mapping[str, Tensor], prior: bool, splittable: bool
) -> Problem:
    target = ModelTarget(model, *args, observed=observed, prior=prior)
    layout = target.layout
    return Problem(
        target, target.dim, layout.names(), lambda theta: layout.flatten(layout.constrain(theta)[0]), splittable
    )


def gaussian_problem(dim: int = 10, seed: int = 0) -> Problem:
    """A dense, correlated Gaussian whose scales span two orders of magnitude."""
    loc, cov = gaussian_parameters(dim, seed)
    return _traced(gaussian, loc, cov, observed={}, prior=True, splittable=False)


def gaussian_parameters(dim: int, seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    corr = a @ a.T + dim * torch.eye(dim, dtype=torch.float64)
    scale = torch.logspace(-1, 1, dim, dtype=torch.float64).sqrt()
    corr = corr / torch.outer(corr.diag().sqrt(), corr.diag().sqrt())
    return torch.linspace(-1, 1, dim, dtype=torch.float64), corr * torch.outer(scale, scale)


def linear_data(rows: int, features: int, seed: int, start: int = 0, stop: int | None = None) -> tuple[Tensor, Tensor]:
    """Rows [start, stop) of a deterministic regression data set (x [n, features], y [n])."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(features, generator=g, dtype=torch.float64)
    x = torch.randn(rows, features, generator=g, dtype=torch.float64)
    y = x @ w + torch.randn(rows, generator=g, dtype=torch.float64)
    return x[start:stop], y[start:stop]


def linear_problem(data_rank: int, data_size: int, rows: int = 1000, features: int = 5, seed: int = 0) -> Problem:
    start, stop = shard_rows(rows, data_rank, data_size)
    x, y = linear_data(rows, features, seed, start, stop)
    return _traced(linear_regression, x, observed={"y": y}, prior=data_rank == 0, splittable=True)


def eight_schools_problem() -> Problem:
    return _traced(eight_schools, EIGHT_SCHOOLS_SIGMA, observed={"y": EIGHT_SCHOOLS_Y}, prior=True, splittable=False)


def covertype_problem(
    data_rank: int,
    data_size: int,
    rows: int = COVERTYPE_ROWS,
    seed: int = 0,
    path: str | None = None,
    positive_class: int = 1,
    comm: Any = None,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
) -> Problem:
    """Bayesian logistic regression on covertype: the HDF5 file at `path` in hpcbnn's data
    format (features standardised with the file's statistics, `positive_class` against the
    rest), or the covertype-shaped synthetic set; this data rank's rows only."""
    if path is None:
        start, stop = shard_rows(rows, data_rank, data_size)
        x, y = covertype_shaped(start, stop, seed, dtype)
    else:
        x, y = _covertype_file(path, data_rank, data_size, positive_class, comm, dtype)
    target = LogisticRegression(x.to(device), y.to(device), prior=data_rank == 0)
    return Problem(target, target.dim, [f"w[{i}]" for i in range(target.dim)], lambda theta: theta, True)


def _covertype_file(
    path: str, data_rank: int, data_size: int, positive_class: int, comm: Any, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    from hpcbnn.data import open_dataset
    from hpcbnn.data.format import open_h5

    info = open_dataset(path, "train", comm=comm)
    if info.task != "classification" or len(info.input_shape) != 1:
        raise UsageError(
            f"{path}: logistic regression needs a classification set of feature "
            f"vectors, not {info.task} inputs of shape {info.input_shape}"
        )
    if not 0 <= positive_class < info.num_classes:
        raise UsageError(f"--positive_class {positive_class} is not a class of {path} (0..{info.num_classes - 1})")
    start, stop = shard_rows(info.n, data_rank, data_size)
    with open_h5(path) as f:
        x = np.asarray(f["train/x"][start:stop], dtype=np.float64)
        labels = np.asarray(f["train/y"][start:stop])
    std = np.where(info.std > 0, info.std, 1.0)
    x = np.concatenate([(x - info.mean) / std, np.ones((len(x), 1))], axis=1)
    y = torch.from_numpy(labels == positive_class).to(dtype)
    return torch.from_numpy(x).to(dtype).contiguous(), y


def bnn(net: torch.nn.Module, x: Tensor, task: str) -> None:
    """y | x, w: a Bayesian network's likelihood, for every weight sample of the context.

    Classification: y ~ Categorical(logits); regression: the heteroscedastic Gaussian head
    of the variational BNN (`gaussian_params`), so HMC and VI fit the same model. The
    weights are the network's random variables, with its layers' priors.
    """
    k = len(current().samples)  # type: ignore[union-attr]
    out = net(x.expand(k, *x.shape).reshape(k * x.shape[0], *x.shape[1:])).view(k, x.shape[0], -1)
    if task == "classification":
        Categorical(logits=out, name="y")
    else:
        Normal(*gaussian_params(out), name="y")


def bnn_network(input_shape: tuple[int, ...], hidden: list[int], outputs: int) -> torch.nn.Module:
    """The MLP of `python -m hpcbnn.mcmc --model bnn`, Bayesian, float64, its posterior
    parameters frozen (the sampler moves the weights, nothing trains the posterior)."""
    torch.manual_seed(0)
    net = bayesianize(mlp(math.prod(input_shape), hidden, outputs)).double()
    return net.requires_grad_(False)


def bnn_problem(
    path: str, hidden: list[int], data_rank: int, data_size: int, comm: Any = None, rows: int | None = None
) -> Problem:
    """HMC over the weights of a Bayesian MLP on the train split of the HDF5 file at `path`
    (inputs standardised per channel, regression targets as the loader normalises them;
    the first `rows` examples when given), this data rank's rows only. Chains start at a
    draw from the prior."""
    from hpcbnn.data import open_dataset

    info = open_dataset(path, "train", comm=comm)
    outputs = info.num_classes * (1 if info.task == "classification" else 2)
    net = bnn_network(info.input_shape, hidden, outputs)
    n = min(rows or info.n, info.n)
    if n < data_size:
        raise UsageError(f"{path}: {n} training rows are fewer than the D={data_size} data groups")
    x, y = bnn_rows(info, *shard_rows(n, data_rank, data_size))
    target = NetworkTarget(bnn, net, x, info.task, observed={"y": y}, prior=data_rank == 0)
    layout = target.layout
    scales = torch.cat(
        [torch.full((v.size,), _layer_of(net, v.name).prior_scale, dtype=torch.float64) for v in layout.latents]
    )

    def init(seed: int, chains: Tensor) -> Tensor:
        return rng.normal(seed, chains, 0, rng.Stream.INIT, n=layout.dim) * scales

    return Problem(
        target, target.dim, layout.names(), lambda theta: layout.flatten(layout.constrain(theta)[0]), True, init
    )


def bnn_rows(info: Any, start: int, stop: int) -> tuple[Tensor, Tensor]:
    """Rows [start, stop) of a split as float64 inputs standardised as the loader does, and targets."""
    from hpcbnn.data.format import open_h5

    with open_h5(info.path) as f:
        x = np.asarray(f[info.split]["x"][start:stop], dtype=np.float64)
        y = np.asarray(f[info.split]["y"][start:stop])
    shape = (1, -1) + (1,) * (len(info.input_shape) - 1)
    x = (x - info.mean.reshape(shape)) / info.std.reshape(shape)
    if info.task == "classification":
        return torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
    y = (y - info.target_mean) / info.target_std
    return torch.from_numpy(x), torch.from_numpy(y.astype(np.float64)).reshape(len(y), -1)


def _layer_of(net: torch.nn.Module, variable: str) -> BayesianModule:
    layer = net.get_submodule(variable.rpartition(".")[0])
    assert isinstance(layer, BayesianModule)
    return layer
