"""Likelihoods and objectives: closed forms, and the exactness of the sample-split predictive."""

import pytest
import torch
import torch.nn.functional as F

from hpcbnn.bnn.objectives import categorical_loglik, elbo_loss, gaussian_loglik, predictive_loss

D64 = torch.float64


def test_categorical_loglik_is_minus_cross_entropy_per_sample_and_example():
    logits = torch.randn(3, 5, 4, dtype=D64)
    y = torch.tensor([0, 3, 1, 1, 2])
    got = categorical_loglik(logits, y)
    assert got.shape == (3, 5)
    for s in range(3):
        assert torch.allclose(got[s], -F.cross_entropy(logits[s], y, reduction="none"), rtol=1e-12)


def test_gaussian_loglik_is_the_heteroscedastic_normal_density():
    out = torch.randn(2, 4, 6, dtype=D64)
    y = torch.randn(4, 3, dtype=D64)
    mean, scale = out[..., :3], F.softplus(out[..., 3:]) + 1e-6
    want = torch.distributions.Normal(mean, scale).log_prob(y).sum(-1)
    assert torch.allclose(gaussian_loglik(out, y), want, rtol=1e-12)
    assert gaussian_loglik(out[..., [0, 3]], y[:, 0]).shape == (2, 4), "a 1-d target may come as [B]"


def test_elbo_is_mean_negative_loglik_plus_weighted_kl_per_example():
    loglik = torch.randn(4, 8, dtype=D64)
    kl = torch.tensor(30.0, dtype=D64)
    assert elbo_loss(loglik, kl, n_train=100, kl_weight=1.0).item() == pytest.approx(-loglik.mean().item() + 0.3)
    assert elbo_loss(loglik, kl, n_train=100, kl_weight=0.1).item() == pytest.approx(-loglik.mean().item() + 0.03)


def test_predictive_loss_is_the_log_of_the_sample_averaged_likelihood():
    loglik = torch.randn(5, 7, dtype=D64)
    kl = torch.tensor(2.0, dtype=D64)
    want = -torch.log(loglik.exp().mean(0)).mean() + 2.0 / 50
    assert predictive_loss(loglik, kl, n_train=50, kl_weight=1.0).item() == pytest.approx(want.item(), rel=1e-12)


def test_split_predictive_gradient_is_exact():
    """K ranks with 2 samples each. A rank receives the other ranks' rows as data (detached),
    and the gather's adjoint sends each rank the sum over ranks of the gradient on its own
    row (an allreduce in the real gather). With that adjoint the sum over ranks divided by
    K (the engine's mean) is the single-process gradient; Horovod's averaging adjoint is not."""
    theta = torch.randn(6, 4, dtype=D64, requires_grad=True)
    kl = (theta**2).sum()
    y = torch.randn(4, dtype=D64)
    loglik = -((theta - y) ** 2)  # [S=6 samples, B=4 examples]
    (whole,) = torch.autograd.grad(predictive_loss(loglik, kl, n_train=10), theta, retain_graph=True)
    K = 3
    shares = loglik.split(2)
    rows = [torch.logsumexp(s, 0)[None] for s in shares]  # what each rank contributes to the gather
    received = [[row.detach().requires_grad_() for row in rows] for _ in range(K)]  # rank r's copies

    losses = [
        predictive_loss(shares[r], kl, n_train=10, num_samples=6, gather=lambda t, r=r: torch.cat(received[r]))
        for r in range(K)
    ]
    assert all(loss.item() == pytest.approx(predictive_loss(loglik, kl, 10).item(), rel=1e-12) for loss in losses)
    row_grads = [torch.autograd.grad(loss, received[r], retain_graph=True) for r, loss in enumerate(losses)]
    kl_grad = torch.autograd.grad(sum(losses), theta, retain_graph=True)[0]  # the KL part, on every rank

    def step(adjoint: str) -> torch.Tensor:
        """sum over ranks / K of the gradient, with the gather's backward summing or averaging."""
        total = kl_grad.clone()
        for j in range(K):
            g = sum(row_grads[r][j] for r in range(K))
            g = g / K if adjoint == "mean" else g
            total += torch.autograd.grad(rows[j], theta, g, retain_graph=True)[0]
        return total / K

    assert torch.allclose(step("sum"), whole, rtol=1e-12)
    assert not torch.allclose(step("mean"), whole), "an averaging adjoint scales the predictive term by 1/K"


def test_one_default_kl_weight_for_the_objectives_the_engine_and_the_cli():
    """bayesianize + the ELBO fits the same tempered posterior as hpcbnn.train."""
    import inspect

    from hpcbnn.bnn.objectives import DEFAULT_KL_WEIGHT
    from hpcbnn.parallel.engine import Engine
    from hpcbnn.run.config import Config

    for f in (elbo_loss, predictive_loss, Engine.__init__):
        assert inspect.signature(f).parameters["kl_weight"].default == DEFAULT_KL_WEIGHT
    assert Config().kl_weight == DEFAULT_KL_WEIGHT
