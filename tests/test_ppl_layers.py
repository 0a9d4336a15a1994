"""Bayesian layers' weights as random variables: tape, condition and log_joint over a network."""

import math

import pytest
import torch
from torch import nn

from hpcbnn.bnn.bayesianize import bayesianize
from hpcbnn.bnn.layers import BayesianLinear
from hpcbnn.bnn.noise import current, sampling
from hpcbnn.errors import UsageError
from hpcbnn.ppl.random_variable import Categorical
from hpcbnn.ppl.tracing import condition, log_joint, tape

K, B = 3, 6


def network() -> nn.Module:
    torch.manual_seed(0)
    return bayesianize(nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Sequential(nn.Linear(5, 3))))


def stacked(x: torch.Tensor, k: int) -> torch.Tensor:
    return x.expand(k, *x.shape).reshape(k * x.shape[0], *x.shape[1:])


def test_tape_records_each_weight_as_a_named_variable_with_the_posterior_and_the_prior():
    net, x = network(), torch.randn(B, 4)
    with sampling(1, 2, range(K)):
        untraced = net(stacked(x, K))
    with sampling(1, 2, range(K)), tape() as rvs:
        traced = net(stacked(x, K))
    assert list(rvs) == ["0.weight", "0.bias", "2.0.weight", "2.0.bias"]
    assert torch.equal(traced, untraced)  # the same noise, the same numbers: tracing changes nothing
    layer = net[2][0]
    w = rvs["2.0.weight"]
    assert w.value.shape == (K, 3, 5) and w.name == "2.0.weight"
    assert torch.equal(w.distribution.mean, layer.weight_mu)
    assert torch.allclose(w.distribution.stddev, nn.functional.softplus(layer.weight_rho))
    assert w.prior is not None and w.prior.distribution.stddev == layer.prior_scale
    assert torch.equal(w.prior.value, w.value)
    # the k values are the weights the forward used: recompute the output from them by hand
    h = torch.relu(
        torch.einsum("kbi,koi->kbo", x.expand(K, B, 4), rvs["0.weight"].value) + rvs["0.bias"].value[:, None]
    )
    by_hand = torch.einsum("kbi,koi->kbo", h, w.value) + rvs["2.0.bias"].value[:, None]
    assert torch.allclose(traced.view(K, B, 3), by_hand, atol=1e-6)


def test_tape_gradients_reach_the_posterior_parameters():
    net, x = network(), torch.randn(B, 4)
    with sampling(0, 0, range(K)), tape():
        net(stacked(x, K)).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


def test_condition_fixes_weights_to_the_posterior_mean_a_sample_or_an_intervention():
    net, x = network(), torch.randn(B, 4)
    with sampling(0, 0, range(K)), tape() as rvs:
        net(stacked(x, K))
    mean = {name: rv.distribution.mean for name, rv in rvs.items()}
    net.eval()
    deterministic = net(x)
    with sampling(0, 0, range(K)), condition(**mean):
        at_mean = net(stacked(x, K)).view(K, B, 3)
    assert torch.allclose(at_mean, deterministic.expand(K, B, 3), atol=1e-6)
    # one given sample: the conditioned network reproduces the recorded forward of that sample
    with sampling(5, 1, range(K)), tape() as drawn:
        sampled = net(stacked(x, K)).view(K, B, 3)
    one = {name: rv.value[1] for name, rv in drawn.items()}
    assert torch.allclose(condition(net, **one)(x), sampled[1], atol=1e-6)
    # an intervention on one bias: zero it, the rest stays the posterior's (eval: the mean)
    cut = condition(net, **{"2.0.bias": torch.zeros(3)})(x)
    assert torch.allclose(cut, deterministic - net[2][0].bias_mu, atol=1e-6)
    with pytest.raises(UsageError, match=r"0\.weight: a value of shape"):
        condition(net, **{"0.weight": torch.zeros(2, 2)})(x)


def test_log_joint_of_a_network_is_its_prior_plus_its_likelihood():
    net, x = network(), torch.randn(B, 4, dtype=torch.float64)
    net.double()
    y = torch.randint(0, 3, (B,))

    def program(x: torch.Tensor) -> None:
        k = len(current().samples)
        logits = net(stacked(x, k)).view(k, B, 3)
        Categorical(logits=logits, name="y")

    with sampling(0, 0, range(K)), tape() as rvs:
        net(stacked(x, K))
    weights = {name: rv.value.detach() for name, rv in rvs.items()}
    with sampling(0, 0, range(K)):
        lp = log_joint(program, batch_dims=1)(x, y=y, **weights)
    assert lp.shape == (K,)
    for j in range(K):
        prior = 0.0
        for name, w in weights.items():
            s = net[0].prior_scale if name.startswith("0.") else net[2][0].prior_scale
            prior += (-0.5 * (w[j] / s) ** 2 - math.log(s) - 0.5 * math.log(2 * math.pi)).sum()
        h = torch.relu(x @ weights["0.weight"][j].T + weights["0.bias"][j])
        logits = h @ weights["2.0.weight"][j].T + weights["2.0.bias"][j]
        likelihood = logits.log_softmax(-1).gather(1, y[:, None]).sum()
        assert torch.allclose(lp[j], prior + likelihood, rtol=1e-12)


def test_a_layer_without_a_qualified_name_says_how_to_get_one():
    layer = BayesianLinear(3, 2)
    with pytest.raises(UsageError, match="bayesianize"), tape():
        layer(torch.randn(2, 3))
