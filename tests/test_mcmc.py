"""MCMC in one process: dynamics, targets, adaptation, and samplers against known posteriors.

Statistical checks compare estimates with the truth in units of their Monte-Carlo
standard error (from the effective sample size), with fixed seeds: a sampler that is off
by more than a few standard errors fails, and the same seed always gives the same verdict.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from hpcbnn.mcmc import diagnostics, kernel, models, rng
from hpcbnn.mcmc.adaptation import DualAveraging, find_step_size, slow_windows
from hpcbnn.mcmc.hmc import Phase, energy_error, kinetic, leapfrog
from hpcbnn.mcmc.sampler import initial_points, sample
from hpcbnn.mcmc.target import ModelTarget
from hpcbnn.ppl.random_variable import HalfNormal, Normal
from hpcbnn.ppl.tracing import log_joint

F64 = torch.float64


def gaussian_target(loc: torch.Tensor, cov: torch.Tensor):
    precision = torch.linalg.inv(cov)

    def target(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        grad = -(q - loc) @ precision
        return 0.5 * ((q - loc) * grad).sum(-1), grad

    return target


def z_scores(x: np.ndarray, mean: np.ndarray, var: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(estimate - truth) / MCSE for the mean and the variance of each parameter of x [chains, draws, dim]."""
    z_mean, z_var = [], []
    for i in range(x.shape[2]):
        xi = x[:, :, i]
        z_mean.append((xi.mean() - mean[i]) / diagnostics.mcse_mean(xi))
        sq = (xi - mean[i]) ** 2
        z_var.append((sq.mean() - var[i]) / diagnostics.mcse_mean(sq))
    return np.array(z_mean), np.array(z_var)


def test_random_streams_depend_on_chain_and_counters_only() -> None:
    both = rng.uniform(7, torch.tensor([3, 5]), 11, 2, n=4)
    alone = rng.uniform(7, torch.tensor([5]), 11, 2, n=4)
    assert torch.equal(both[1:], alone)
    assert not torch.equal(both[0], both[1])
    assert not torch.equal(rng.uniform(7, torch.tensor([5]), 12, 2, n=4), alone)
    z = rng.normal(0, torch.arange(200), 0, n=500).flatten().numpy()
    assert stats.kstest(z, "norm").pvalue > 1e-3


def test_leapfrog_is_reversible_and_nearly_conserves_energy() -> None:
    """Seeded: from a random start the error exceeds 0.05 for about 6% of seeds (stiff direction)."""
    loc, cov = models.gaussian_parameters(4, seed=1)
    target = gaussian_target(loc, cov)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 4, dtype=F64, generator=g)
    logp, grad = target(q)
    inv_mass = torch.rand(3, 4, dtype=F64, generator=g) + 0.5
    start = Phase.of(q, torch.randn(3, 4, dtype=F64, generator=g), logp, grad)
    eps = torch.tensor([0.05, 0.02, 0.01], dtype=F64)
    z = start
    for _ in range(20):
        z = leapfrog(target, z, eps, inv_mass)
    h0 = kinetic(start.p, inv_mass) - start.logp
    assert energy_error(z, inv_mass, h0).abs().max() < 0.05
    for _ in range(20):
        z = leapfrog(target, z, -eps, inv_mass)
    torch.testing.assert_close(z.data, start.data, rtol=0, atol=1e-10)


def test_model_target_is_log_joint_plus_jacobian() -> None:
    """Eight schools: tau > 0 is sampled as log tau, so log p gains log |d tau / d u| = u."""
    problem = models.eight_schools_problem()
    theta = torch.randn(5, problem.dim, dtype=F64)
    logp, grad = problem.local(theta)
    values = {"mu": theta[:, 0], "tau": theta[:, 1].exp(), "theta_tilde": theta[:, 2:]}
    expected = log_joint(models.eight_schools, batch_dims=1)(
        models.EIGHT_SCHOOLS_SIGMA, **values, y=models.EIGHT_SCHOOLS_Y) + theta[:, 1]
    torch.testing.assert_close(logp, expected)
    numeric = torch.func.jacrev(lambda t: problem.local.log_density(t).sum())(theta)
    torch.testing.assert_close(grad, numeric)
    assert problem.names[:3] == ["mu", "tau", "theta_tilde[0]"]


def test_analytic_logistic_regression_equals_the_traced_program() -> None:
    x, y = models.covertype_shaped(100, 700, seed=3, dtype=F64)
    traced = ModelTarget(models.logistic_regression, x, observed={"y": y})
    fast = models.LogisticRegression(x, y)
    theta = 0.3 * torch.randn(4, x.shape[1], dtype=F64)
    for a, b in zip(traced(theta), fast(theta)):
        torch.testing.assert_close(a, b)
    likelihood_only = models.LogisticRegression(x, y, prior=False)(theta)[0]
    prior = torch.distributions.Normal(0.0, 1.0).log_prob(theta).sum(-1)
    torch.testing.assert_close(likelihood_only + prior, fast(theta)[0])


@pytest.mark.parametrize("chains", [1, 3])
def test_logistic_regression_blocks_match_autograd_in_float64(chains: int) -> None:
    """Both passes (NumPy on the CPU, torch on accelerators), blocks that do not divide the
    rows, and logits in the hundreds (exp overflows float32 past 88): autograd's value and gradient."""
    x, y = models.covertype_shaped(100, 777, seed=3, dtype=F64)
    fast = models.LogisticRegression(x, y, block_logits=150)
    theta = 10.0 * torch.randn(chains, x.shape[1], dtype=F64, generator=torch.Generator().manual_seed(0))
    theta_ = theta.clone().requires_grad_(True)
    z = theta_ @ x.T
    expected = (y * z - torch.logaddexp(torch.zeros_like(z), z)).sum(-1) - 0.5 * (theta_**2).sum(-1)
    expected = expected - 0.5 * x.shape[1] * math.log(2 * math.pi)
    (grad,) = torch.autograd.grad(expected.sum(), theta_)
    assert z.abs().max() > 200
    lp, g = fast(theta)
    torch.testing.assert_close(lp, expected.detach(), rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(g, grad, rtol=1e-12, atol=1e-9)
    for a, b in zip(fast.numpy_pass(0.5 * theta), fast.torch_pass(0.5 * theta)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-9)


def _float64_sums(x: torch.Tensor, half_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    h = x.double() @ half_w.double().T
    t = h.tanh()
    return (h.abs() - t.abs().log1p()).sum(0), t.T @ x.double()


needs_kernel = pytest.mark.skipif(not kernel.available(), reason="needs x86-64 with AVX2 and FMA, and a C compiler")


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("rows, chains, scale", [(0, 8, 0.3), (5, 3, 0.3), (1237, 11, 0.3), (20000, 16, 0.3),
                                                 (3001, 8, 30.0)])
def test_fused_logistic_pass_equals_its_sums_in_float64(rows: int, chains: int, scale: float, threads: int) -> None:
    """The one-pass kernel against the same sums in float64 from the same float32 features:
    rows that fill no block of 8, chains that fill no group of 8, several groups and threads,
    and logits in the hundreds (tanh saturates and exp(-2|h|) is below float32's range)."""
    x, _ = models.covertype_shaped(0, rows, seed=2)
    half_w = scale * torch.randn(chains, x.shape[1], generator=torch.Generator().manual_seed(rows))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fused = kernel.logistic_pass(x, half_w)
    finally:
        torch.set_num_threads(previous)
    assert fused is not None
    log_cosh, x_tanh = fused
    want_log_cosh, want_x_tanh = _float64_sums(x, half_w)
    assert log_cosh.shape == (chains,) and x_tanh.shape == (chains, x.shape[1]) and log_cosh.dtype == F64
    scale_lc = want_log_cosh.abs().max().item() if rows else 1.0
    scale_g = want_x_tanh.abs().max().item() if rows else 1.0
    torch.testing.assert_close(log_cosh, want_log_cosh, rtol=0, atol=1e-5 * scale_lc)
    torch.testing.assert_close(x_tanh, want_x_tanh, rtol=0, atol=1e-5 * scale_g)


def test_fused_logistic_pass_leaves_float64_features_to_numpy() -> None:
    x, _ = models.covertype_shaped(0, 100, dtype=F64)
    assert kernel.logistic_pass(x, torch.zeros(8, x.shape[1], dtype=F64)) is None


@needs_kernel
def test_float32_logistic_regression_through_the_kernel_matches_autograd() -> None:
    """8 chains on float32 features take the kernel: the log density and gradient of the float64
    program on the same features, to float32 accuracy."""
    x, y = models.covertype_shaped(0, 5000, seed=4)
    theta = 0.2 * torch.randn(8, x.shape[1], dtype=F64, generator=torch.Generator().manual_seed(1))
    theta_ = theta.clone().requires_grad_(True)
    z = theta_ @ x.double().T
    expected = (y.double() * z - torch.logaddexp(torch.zeros_like(z), z)).sum(-1) - 0.5 * (theta_**2).sum(-1)
    expected = expected - 0.5 * x.shape[1] * math.log(2 * math.pi)
    (grad,) = torch.autograd.grad(expected.sum(), theta_)
    lp, g = models.LogisticRegression(x, y)(theta)
    torch.testing.assert_close(lp, expected.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(g, grad, rtol=0, atol=1e-5 * grad.abs().max().item())


def test_covertype_shaped_data_is_the_same_whatever_the_split() -> None:
    x, y = models.covertype_shaped(5000, 30000, seed=1)
    parts = [models.covertype_shaped(*models.shard_rows(25000, r, 3), seed=1)
             for r in range(3)]
    assert torch.equal(torch.cat([p[0] for p in parts]), models.covertype_shaped(0, 25000, seed=1)[0])
    assert x.shape == (25000, models.COVERTYPE_FEATURES + 1) and x.dtype == torch.float32
    assert torch.equal(x[:, -1], torch.ones(25000))
    assert 0.2 < y.mean() < 0.8


def test_stan_warmup_windows() -> None:
    assert slow_windows(1000) == [(75, 100), (100, 150), (150, 250), (250, 450), (450, 950)]
    assert slow_windows(100) == [(15, 90)]
    assert slow_windows(10) == []


def test_dual_averaging_finds_the_step_size_of_the_target_acceptance() -> None:
    """With acceptance exp(-step) the fixed point of the averaging is step = log(1/0.8)."""
    averaging = DualAveraging(torch.tensor([1.0, 0.001], dtype=F64), target_accept=0.8)
    step = torch.tensor([1.0, 0.001], dtype=F64)
    for _ in range(2000):
        step = averaging.update(torch.exp(-step))
    torch.testing.assert_close(averaging.final, torch.full((2,), math.log(1 / 0.8), dtype=F64),
                               rtol=0.02, atol=0)


def test_step_size_search_brackets_acceptance_0_8() -> None:
    scale = torch.tensor([0.01, 1.0, 100.0], dtype=F64)
    target = gaussian_target(torch.zeros(1, dtype=F64), torch.eye(1, dtype=F64))
    chains = torch.arange(3)

    def scaled(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # chain c has sd scale[c]
        logp, grad = target(q / scale[:, None])
        return logp, grad / scale[:, None]

    z = initial_points(scaled, 0, chains, 1)
    step = find_step_size(scaled, z, torch.ones(3, dtype=F64), torch.ones(3, 1, dtype=F64), 0, chains, 0)
    ratio = step / scale
    assert ((ratio > 0.1) & (ratio < 10)).all(), ratio


def test_nuts_samples_a_dense_gaussian() -> None:
    loc, cov = models.gaussian_parameters(6, seed=0)
    draws = sample(gaussian_target(loc, cov), 6, torch.arange(32), seed=0, num_warmup=150,
                   num_draws=100)
    z_mean, z_var = z_scores(draws.theta.numpy(), loc.numpy(), cov.diag().numpy())
    assert np.abs(z_mean).max() < 4 and np.abs(z_var).max() < 4, (z_mean, z_var)
    correlation = np.corrcoef(draws.theta.reshape(-1, 6).T.numpy())
    expected = (cov / torch.outer(cov.diag().sqrt(), cov.diag().sqrt())).numpy()
    assert np.abs(correlation - expected).max() < 0.05
    assert not draws.stats["diverging"].any()
    # the learnt metric takes out most of the hundredfold spread of the posterior variances
    ratio = draws.inv_mass.mean(0) / cov.diag()
    assert ratio.max() / ratio.min() < 10, ratio


def test_hmc_samples_a_dense_gaussian() -> None:
    loc, cov = models.gaussian_parameters(4, seed=2)
    draws = sample(gaussian_target(loc, cov), 4, torch.arange(32), seed=1, num_warmup=150,
                   num_draws=150, kernel="hmc", num_steps=8)
    z_mean, z_var = z_scores(draws.theta.numpy(), loc.numpy(), cov.diag().numpy())
    assert np.abs(z_mean).max() < 4 and np.abs(z_var).max() < 4, (z_mean, z_var)
    assert (draws.stats["n_leapfrog"] == 8).all()


def test_nuts_matches_the_conjugate_linear_regression_posterior() -> None:
    problem = models.linear_problem(0, 1, rows=200, features=3, seed=4)
    x, y = models.linear_data(200, 3, seed=4)
    mean, cov = models.linear_regression_posterior(x, y)
    draws = sample(problem.local, problem.dim, torch.arange(16), seed=2, num_warmup=100,
                   num_draws=100)
    z_mean, z_var = z_scores(draws.theta.numpy(), mean.numpy(), cov.diag().numpy())
    assert np.abs(z_mean).max() < 4 and np.abs(z_var).max() < 4, (z_mean, z_var)


def normal_model(n: int) -> None:
    """mu ~ N(0, 1), sigma ~ HalfNormal(1), y_1..n ~ N(mu, sigma): small, with a positive parameter."""
    mu = Normal(torch.tensor(0.0, dtype=F64), 1.0, name="mu")
    sigma = HalfNormal(torch.tensor(1.0, dtype=F64), name="sigma")
    Normal(mu[..., None], sigma[..., None], sample_shape=(n,), name="y")


def sbc_ranks(target_class: type[ModelTarget], replications: int = 256, thin: int = 2,
              kept: int = 19) -> np.ndarray:
    """Simulation-based calibration: each chain samples the posterior of its own simulated
    data set, so one batched run holds all replications. Returns the rank (0..kept) of each
    true (mu, sigma) among `kept` thinned draws. The tree depth is capped to keep the
    lockstep batch cheap; that changes the mixing per draw, not the stationary law."""
    g = torch.Generator().manual_seed(11)
    mu = torch.randn(replications, generator=g, dtype=F64)
    sigma = torch.randn(replications, generator=g, dtype=F64).abs()
    y = mu[:, None] + sigma[:, None] * torch.randn(replications, 3, generator=g, dtype=F64)
    target = target_class(normal_model, 3, observed={"y": y})
    draws = sample(target, target.dim, torch.arange(replications), seed=5, num_warmup=60,
                   num_draws=thin * kept, max_depth=4)
    values, _ = target.layout.constrain(draws.theta.reshape(-1, 2))
    thinned = {k: v.reshape(replications, -1)[:, ::thin] for k, v in values.items()}
    return np.stack([(thinned[k] < truth[:, None]).sum(1).numpy()
                     for k, truth in (("mu", mu), ("sigma", sigma))], 1)


class WithoutJacobian(ModelTarget):
    """A plausible bug: forgetting the log-Jacobian of the map to sigma > 0."""

    def log_density(self, theta: torch.Tensor) -> torch.Tensor:
        return super().log_density(theta) - theta[:, 1]


@pytest.mark.parametrize("target_class, calibrated", [(ModelTarget, True), (WithoutJacobian, False)])
def test_simulation_based_calibration(target_class: type[ModelTarget], calibrated: bool) -> None:
    """Ranks of the truth among posterior draws are uniform iff the sampler is right (Talts et al.)."""
    ranks = sbc_ranks(target_class)
    p_values = [stats.chisquare(np.bincount(r // 2, minlength=10)).pvalue for r in ranks.T]
    assert (min(p_values) > 1e-3) == calibrated, p_values


def test_chains_do_not_depend_on_their_batch() -> None:
    """The P = 1 / P = 2 property in one process: chains 2 and 3 alone equal chains 2, 3 of 0..3."""
    loc, cov = models.gaussian_parameters(3, seed=0)
    target = gaussian_target(loc, cov)
    together = sample(target, 3, torch.arange(4), seed=9, num_warmup=30, num_draws=20)
    apart = sample(target, 3, torch.tensor([2, 3]), seed=9, num_warmup=30, num_draws=20)
    torch.testing.assert_close(apart.theta, together.theta[2:], rtol=0, atol=1e-12)
    for key in ("tree_depth", "n_leapfrog", "diverging"):
        assert torch.equal(apart.stats[key], together.stats[key][2:])


def test_divergences_are_counted() -> None:
    """A step size far beyond the stability limit of a narrow Gaussian makes every trajectory diverge."""
    target = gaussian_target(torch.zeros(2, dtype=F64), torch.diag(torch.tensor([1e-4, 1.0], dtype=F64)))
    draws = sample(target, 2, torch.arange(4), seed=0, num_warmup=0, num_draws=10, step_size=1.0,
                   adapt_mass=False)
    assert draws.stats["diverging"].all()
    assert (draws.stats["tree_depth"] == 1).all()
