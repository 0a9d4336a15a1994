"""The mixture posterior: components by global sample index, split-invariant, mean KL."""

import pytest
import torch

from hpcbnn.bnn.bayesianize import bayesianize
from hpcbnn.bnn.layers import BayesianLinear, kl_divergence
from hpcbnn.bnn.mixture import Mixture, check_samples, num_components
from hpcbnn.bnn.models import mlp
from hpcbnn.bnn.noise import sampling
from hpcbnn.errors import UsageError


def mixture(k=4):
    torch.manual_seed(0)
    return bayesianize(mlp(6, [8], 3), components=k)


def test_components_start_as_draws_of_the_prior_on_every_rank_alike():
    def draw() -> Mixture:
        torch.manual_seed(5)
        return bayesianize(mlp(64, [128], 10), components=3)

    model = draw()
    for c in model.components:
        for layer in (c[1], c[3]):  # torch's default init has std 0.58 / sqrt(fan_in), the prior 0.99 / sqrt(fan_in)
            torch.testing.assert_close(float(layer.weight_mu.detach().std()), layer.prior_scale, rtol=0.05, atol=0)
    first, second = model.components[0][1].weight_mu, model.components[1][1].weight_mu
    assert not torch.allclose(first, second)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), draw().state_dict().values()))


def test_a_single_network_keeps_its_weights_unless_asked_to_draw():
    torch.manual_seed(0)
    net = mlp(6, [8], 3)
    kept = net[1].weight.detach().clone()
    assert torch.equal(bayesianize(net)[1].weight_mu, kept)
    drawn = bayesianize(mlp(64, [128], 3), means="prior")[1]
    torch.testing.assert_close(float(drawn.weight_mu.detach().std()), drawn.prior_scale, rtol=0.05, atol=0)
    with pytest.raises(UsageError, match="means 'zero': choose one of prior, module"):
        bayesianize(mlp(6, [8], 3), components=2, means="zero")  # type: ignore[arg-type]


def test_with_means_module_the_first_component_is_the_given_network():
    torch.manual_seed(0)
    net = mlp(6, [8], 3)
    first = net[1].weight.detach().clone()
    model = bayesianize(net, components=3, means="module")
    assert isinstance(model, Mixture) and num_components(model) == 3 and num_components(net) == 1
    means = [c[1].weight_mu for c in model.components]
    assert all(isinstance(c[1], BayesianLinear) for c in model.components)
    assert torch.equal(means[0], first)
    assert not torch.allclose(means[0], means[1]) and not torch.allclose(means[1], means[2])
    keys = {m.noise_key for m in model.modules() if isinstance(m, BayesianLinear)}
    assert len(keys) == 6, "every layer of every component has its own noise"


def test_sample_s_uses_component_s_mod_k():
    model = mixture(4)
    x = torch.randn(5, 6)
    with sampling(1, 2, range(8)):
        out = model(x.repeat(8, 1)).view(8, 5, 3)
    for s in range(8):
        with sampling(1, 2, [s]):
            alone = model.components[s % 4](x)
        torch.testing.assert_close(out[s], alone, rtol=0, atol=1e-6)


def test_any_split_of_the_samples_gives_the_same_outputs_and_gradients():
    """What the sample-parallel grid relies on: a rank's samples evaluate as they would among all."""
    model = mixture(4)
    x = torch.randn(5, 6)
    weights = torch.randn(8, 5, 3)

    def run(parts):
        model.zero_grad()
        outs = []
        for part in parts:
            with sampling(3, 0, part):
                out = model(x.repeat(len(part), 1)).view(len(part), 5, 3)
            (out * weights[list(part)]).sum().backward()
            outs.append(out.detach())
        return torch.cat(outs), [p.grad.clone() for p in model.parameters()]

    whole, grads = run([range(8)])
    for parts in ([range(0, 4), range(4, 8)], [[0, 1], [2, 3], [4, 5], [6, 7]], [[s] for s in range(8)]):
        out, got = run(parts)
        torch.testing.assert_close(out, whole, rtol=0, atol=1e-6)
        for g, want in zip(got, grads):
            torch.testing.assert_close(g, want, rtol=1e-6, atol=1e-6)


def test_kl_is_the_mean_of_the_components():
    model = mixture(3)
    want = torch.stack([kl_divergence(c) for c in model.components]).mean()
    torch.testing.assert_close(kl_divergence(model), want)
    assert kl_divergence(model) < sum(kl_divergence(c) for c in model.components)


def test_outside_sampling_the_posterior_means_are_averaged():
    model = mixture(2).eval()
    x = torch.randn(4, 6)
    torch.testing.assert_close(model(x), (model.components[0](x) + model.components[1](x)) / 2)


def test_unequal_weighting_is_refused():
    check_samples(8, 4)
    check_samples(3, 1)
    with pytest.raises(UsageError, match="not a multiple of the 4 mixture components"):
        check_samples(6, 4)
    with pytest.raises(UsageError, match="at least 1 component"):
        bayesianize(mlp(6, [8], 3), components=0)


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_weight_decay_pulls_a_component_as_it_pulls_a_single_network(name):
    """The mean of K ELBOs gives each component 1/K of its gradient: Adam's L2 is divided by K to match."""
    from hpcbnn.bnn.objectives import categorical_loglik, elbo_loss
    from hpcbnn.optim import make_optimizer

    def train(k: int) -> torch.nn.Module:
        torch.manual_seed(0)
        model = bayesianize(mlp(6, [8], 3), init_std=1e-9, components=k, means="module")  # sigma ~ 0: one surface
        opt = make_optimizer(model, name, 1e-2, weight_decay=0.5)
        g = torch.Generator().manual_seed(1)
        for step in range(5):
            x, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
            with sampling(0, step, range(k)):
                loglik = categorical_loglik(model(x.repeat(k, 1)).view(k, 16, 3), y)
            opt.zero_grad()
            elbo_loss(loglik, kl_divergence(model), 100, kl_weight=0.0).backward()
            opt.step()
        return model if k == 1 else model.components[0]

    single, component = train(1), train(4)
    means = [(n, p) for n, p in single.named_parameters() if n.endswith("_mu")]  # rho's step follows its noise
    for (name_, a), b in zip(means, (p for n, p in component.named_parameters() if n.endswith("_mu"))):
        assert torch.allclose(a, b, atol=1e-6), f"{name_}: component 0 of the mixture moved unlike the single network"
