"""bayesianize on standard networks, and the model builders."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

from hpcbnn.bnn.bayesianize import bayesianize, candidates
from hpcbnn.errors import UsageError
from hpcbnn.bnn.layers import (BayesianConv2d, BayesianLinear, BayesianModule, BayesianMultiheadAttention,
                           SampleBatchNorm2d, kl_divergence)
from hpcbnn.bnn.models import build_model, mlp, resnet_cifar, small_vit, swin_t
from hpcbnn.bnn.noise import sampling


def stack(x, k):
    return x.repeat(k, *[1] * (x.dim() - 1))


def bayesian_layers(model):
    return [m for m in model.modules() if isinstance(m, BayesianModule)]


def test_mlp_becomes_bayesian_centred_on_its_weights():
    torch.manual_seed(0)
    net = mlp(12, [8, 8], 3)
    x = torch.randn(5, 3, 4)
    want = net(x)
    weights = [m.weight.detach().clone() for m in net if isinstance(m, nn.Linear)]
    bayesianize(net, prior_scale=0.5, init_std=1e-2)
    layers = bayesian_layers(net)
    assert len(layers) == 3 and all(isinstance(m, BayesianLinear) for m in layers)
    assert all(torch.equal(m.weight_mu, w) for m, w in zip(layers, weights))
    assert all(torch.allclose(F.softplus(m.weight_rho), torch.tensor(1e-2)) and m.prior_scale == 0.5 for m in layers)
    assert torch.allclose(net.eval()(x), want), "the posterior mean is the deterministic network"
    with sampling(0, 0, [0, 1]):
        noisy = net(stack(x, 2))
    assert 0 < (noisy[:5] - want).abs().max() < 0.2, "a small initial std stays close to the network"


def test_layer_selection():
    def fresh():
        torch.manual_seed(0)
        return mlp(6, [5, 4], 2)

    last = bayesianize(fresh(), layers=1)
    assert [type(m).__name__ for m in last if not isinstance(m, (nn.ReLU, nn.Flatten))] == \
        ["Linear", "Linear", "BayesianLinear"]
    chosen = bayesianize(fresh(), layers=lambda name, m: m.in_features == 6)
    assert isinstance(chosen[1], BayesianLinear) and isinstance(chosen[5], nn.Linear)
    assert isinstance(bayesianize(nn.Linear(3, 2)), BayesianLinear), "a bare layer converts too"
    with pytest.raises(UsageError, match="choose 1..3"):
        bayesianize(fresh(), layers=4)
    with pytest.raises(UsageError, match="no layer selected"):
        bayesianize(fresh(), layers=lambda name, m: False)


def test_noise_keys_come_from_names_so_every_process_draws_the_same_weights():
    x = torch.randn(4, 6)
    outs = []
    for _ in range(2):
        torch.manual_seed(0)
        net = bayesianize(mlp(6, [5], 2))
        with sampling(3, 4, [1, 2]):
            outs.append(net(stack(x, 2)))
    assert torch.equal(outs[0], outs[1])


def check_samples(model, x, k=2, atol=1e-5):
    """Forward and backward with k samples; the batched pass equals one pass per sample."""
    with sampling(0, 1, range(k)):
        out = model(stack(x, k))
    loss = out.square().mean() + kl_divergence(model) / 1000
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for m in bayesian_layers(model) for g in [m.weight_rho.grad])
    b = x.shape[0]
    with torch.no_grad():
        for s in range(k):
            with sampling(0, 1, [s]):
                alone = model(x)
            assert torch.allclose(out[s * b:(s + 1) * b], alone, rtol=1e-4, atol=atol), f"sample {s}"
    return out


def test_resnet18_forward_backward_with_samples():
    torch.manual_seed(0)
    model = bayesianize(resnet_cifar(10))
    assert isinstance(model.conv1, BayesianConv2d) and isinstance(model.fc, BayesianLinear)
    assert isinstance(model.bn1, SampleBatchNorm2d) and isinstance(model.layer1[0].bn2, SampleBatchNorm2d)
    out = check_samples(model, torch.randn(2, 3, 16, 16))
    assert out.shape == (4, 10)


def test_torchvision_vit_forward_backward_with_samples():
    torch.manual_seed(0)
    vit = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                            num_classes=5)
    model = bayesianize(vit)
    attention = model.encoder.layers[0].self_attention
    assert isinstance(attention, BayesianMultiheadAttention)
    assert isinstance(model.conv_proj, BayesianConv2d) and isinstance(model.heads.head, BayesianLinear)
    assert len(candidates(model)) == 0, "nothing convertible is left"
    assert check_samples(model, torch.randn(2, 3, 32, 32)).shape == (4, 5)


def test_small_vit_last_layers_only():
    torch.manual_seed(0)
    model = bayesianize(small_vit(10), layers=2)
    assert isinstance(model.heads.head, BayesianLinear)
    assert isinstance(model.encoder.layers[-1].mlp[3], BayesianLinear)
    assert not isinstance(model.encoder.layers[-1].mlp[0], BayesianLinear)
    check_samples(model, torch.randn(1, 3, 32, 32))


def test_swin_forward_backward_with_samples():
    """torchvision's Swin passes qkv/proj weights to F.linear: the sampled stand-in handles it."""
    torch.manual_seed(0)
    model = bayesianize(swin_t(4))
    assert isinstance(model.features[1][0].attn.qkv, BayesianLinear)
    assert check_samples(model, torch.randn(1, 3, 32, 32)).shape == (2, 4)


def test_sampled_weights_refuse_other_uses():
    layer = bayesianize(nn.Linear(3, 2))
    assert layer.weight.shape == (2, 3)
    with pytest.raises(TypeError, match="only F.linear"):
        torch.matmul(torch.ones(1, 3), layer.weight)


def test_build_model_dispatch_and_errors():
    assert isinstance(build_model("mlp", (1, 4, 4), 3, hidden=[7])[1], nn.Linear)
    assert build_model("mlp", (24,), 2)(torch.randn(5, 24)).shape == (5, 2)
    vit = build_model("vit", (1, 16, 16), 3, hidden=[7])
    assert vit.image_size == 16 and vit.conv_proj.in_channels == 1
    assert build_model("resnet", (1, 8, 8), 2).conv1.in_channels == 1
    with pytest.raises(UsageError, match="unknown model"):
        build_model("lenet", (1, 4, 4), 3)
    with pytest.raises(UsageError, match="square"):
        build_model("vit", (3, 16, 32), 3)
    with pytest.raises(UsageError, match="use --model mlp"):
        build_model("resnet", (24,), 3)


def test_default_prior_and_initial_sigma_follow_fan_in():
    """PRIOR_FRACTION of the He std sqrt(2/fan_in) for the prior, INIT_FRACTION of it for the initial sigma
    (bias included)."""
    from hpcbnn.bnn.layers import INIT_FRACTION, PRIOR_FRACTION

    model = bayesianize(nn.Sequential(nn.Linear(64, 8), nn.Conv2d(3, 4, 3, groups=1)))
    for layer, fan_in in zip(bayesian_layers(model), (64, 27)):
        he = (2 / fan_in) ** 0.5
        assert layer.prior_scale == pytest.approx(PRIOR_FRACTION * he)
        for rho in (layer.weight_rho, layer.bias_rho):
            assert torch.allclose(F.softplus(rho), torch.tensor(INIT_FRACTION * he))
    with pytest.raises(UsageError, match="fan_in"):
        bayesianize(nn.Linear(3, 2), prior_scale="fan_out")


def test_sigma_parameters_get_their_own_step_and_no_weight_decay():
    from hpcbnn.optim import make_optimizer

    model = bayesianize(mlp(6, [5], 2))
    opt = make_optimizer(model, "adamw", 1e-3, weight_decay=0.1, rho_lr_scale=4.0)
    means, sigmas = opt.param_groups
    assert means["lr"] == 1e-3 and means["weight_decay"] == 0.1
    assert sigmas["lr"] == 4e-3 and sigmas["weight_decay"] == 0.0
    assert {id(p) for p in sigmas["params"]} == {id(p) for n, p in model.named_parameters() if n.endswith("_rho")}
