"""Bayesian layers: KL, batched k-sample evaluation, noise determinism, gradients, BatchNorm."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hpcbnn.errors import UsageError
from hpcbnn.bnn.layers import (ESTIMATORS, BayesianConv1d, BayesianConv2d, BayesianLinear,
                               BayesianMultiheadAttention, SampleBatchNorm2d, kl_divergence)
from hpcbnn.bnn.noise import sampling

# attention's projections are Bayesian Linear layers, so one estimator covers it
CASES = [(k, e) for k in ("linear", "conv1d", "conv2d") for e in ESTIMATORS] + [("mha", "reparam")]
D64 = torch.float64


def make(kind: str, estimator: str = "reparam") -> nn.Module:
    torch.manual_seed(0)
    kw = {"estimator": estimator, "init_std": 0.2, "dtype": D64}
    if kind == "linear":
        return BayesianLinear(5, 4, **kw)
    if kind == "conv1d":
        return BayesianConv1d(3, 4, 3, padding=1, **kw)
    if kind == "conv2d":
        return BayesianConv2d(4, 6, 3, stride=2, padding=1, groups=2, **kw)
    return BayesianMultiheadAttention(8, 2, batch_first=True, **kw)


def inputs(kind: str, b: int) -> torch.Tensor:
    shape = {"linear": (b, 3, 5), "conv1d": (b, 3, 7), "conv2d": (b, 4, 6, 6), "mha": (b, 5, 8)}[kind]
    return torch.randn(*shape, dtype=D64, generator=torch.Generator().manual_seed(1))


def run(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, BayesianMultiheadAttention):
        return layer(x, x, x, need_weights=False)[0]
    return layer(x)


def stack(x: torch.Tensor, k: int) -> torch.Tensor:
    return x.repeat(k, *[1] * (x.dim() - 1))


@pytest.mark.parametrize("s", [0.5, 1.0, 3.0])
def test_kl_matches_torch_closed_form(s):
    layer = BayesianLinear(6, 3, prior_scale=s, init_std=0.3, dtype=D64)
    with torch.no_grad():
        layer.weight_mu.normal_()
        layer.weight_rho.normal_()
    want = 0.0
    for mu, rho in [(layer.weight_mu, layer.weight_rho), (layer.bias_mu, layer.bias_rho)]:
        q = torch.distributions.Normal(mu, F.softplus(rho))
        want += torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, s)).sum().item()
    assert layer.kl().item() == pytest.approx(want, rel=1e-12)
    assert kl_divergence(nn.Sequential(layer, nn.ReLU(), BayesianLinear(3, 2))).item() > want


def test_kl_matches_monte_carlo():
    torch.manual_seed(3)
    layer = BayesianLinear(4, 2, bias=False, prior_scale=0.8, init_std=0.5, dtype=D64)
    with torch.no_grad():
        layer.weight_mu.normal_()
    q = torch.distributions.Normal(layer.weight_mu.detach(), F.softplus(layer.weight_rho.detach()))
    w = q.sample((200_000,))
    log_ratio = (q.log_prob(w) - torch.distributions.Normal(0.0, 0.8).log_prob(w)).sum((1, 2))
    stderr = log_ratio.std().item() / math.sqrt(len(log_ratio))
    assert abs(log_ratio.mean().item() - layer.kl().item()) < 4 * stderr


def test_kl_gradient_matches_autograd_of_closed_form():
    layer = BayesianConv2d(2, 3, 3, prior_scale=0.7, init_std=0.4, dtype=D64)
    layer.kl().backward()
    got = [p.grad.clone() for p in (layer.weight_mu, layer.weight_rho)]
    mu, rho = (p.detach().clone().requires_grad_() for p in (layer.weight_mu, layer.weight_rho))
    sigma = F.softplus(rho)
    (torch.log(0.7 / sigma) + (sigma ** 2 + mu ** 2) / (2 * 0.49) - 0.5).sum().backward()
    assert torch.allclose(got[0], mu.grad, rtol=1e-12) and torch.allclose(got[1], rho.grad, rtol=1e-12)


@pytest.mark.parametrize("kind, estimator", CASES)
def test_batched_samples_equal_separate_forwards(kind, estimator):
    layer, x = make(kind, estimator), inputs(kind, 3)
    samples = [7, 2, 11]
    with sampling(seed=5, step=9, samples=samples):
        batched = run(layer, stack(x, 3))
    for j, s in enumerate(samples):
        with sampling(seed=5, step=9, samples=[s]):
            alone = run(layer, x)
        assert torch.allclose(batched[j * 3:(j + 1) * 3], alone, rtol=0, atol=1e-12), f"sample {s}"
    assert not torch.allclose(batched[:3], batched[3:6]), "different samples must use different weights"


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_any_split_of_samples_and_batch_reproduces_the_whole(kind, estimator):
    """Two 'ranks' holding half the samples, or half the examples, see the same numbers."""
    layer, x = make(kind, estimator), inputs(kind, 4)
    with sampling(seed=1, step=3, samples=range(4), global_batch=4):
        whole = run(layer, stack(x, 4)).unflatten(0, (4, 4))
    with sampling(seed=1, step=3, samples=[2, 3], global_batch=4):
        upper = run(layer, stack(x, 2)).unflatten(0, (2, 4))
    with sampling(seed=1, step=3, samples=range(4), batch=slice(1, 3), global_batch=4):
        rows = run(layer, stack(x[1:3], 4)).unflatten(0, (4, 2))
    assert torch.allclose(upper, whole[2:], rtol=0, atol=1e-12)
    assert torch.allclose(rows, whole[:, 1:3], rtol=0, atol=1e-12)


def test_noise_is_a_function_of_seed_step_sample_and_layer():
    a, b, x = make("linear"), make("linear"), inputs("linear", 2)
    b.load_state_dict(a.state_dict())

    def out(layer, seed, step):
        with sampling(seed, step, [0]):
            return layer(x)

    assert torch.equal(out(a, 0, 1), out(a, 0, 1))
    assert not torch.allclose(out(a, 0, 1), out(a, 0, 2)) and not torch.allclose(out(a, 0, 1), out(a, 1, 1))
    b.noise_key = a.noise_key + 1
    assert not torch.allclose(out(a, 0, 1), out(b, 0, 1)), "each layer draws its own noise"


@pytest.mark.parametrize("inside", [True, False])
def test_flipout_signs_are_fair_plus_or_minus_one(inside):
    """Signs come from the fast normal kernel's draws (inside sampling) or torch's (outside)."""
    from contextlib import nullcontext

    from hpcbnn.bnn.noise import example_noise

    with sampling(0, 3, range(2)) if inside else nullcontext():
        signs = example_noise(5, 2 * 500, (100,), torch.float32, torch.device("cpu"), kind="sign")
    assert signs.shape == (1000, 100) and set(signs.unique().tolist()) == {-1.0, 1.0}
    assert abs(signs.mean().item()) < 4 / math.sqrt(signs.numel())  # 4 standard errors of a fair sign


def test_outside_sampling_train_draws_and_eval_is_the_posterior_mean():
    layer, x = make("linear"), inputs("linear", 2)
    assert not torch.allclose(layer(x), layer(x)), "training mode samples from the global RNG"
    layer.eval()
    assert torch.equal(layer(x), F.linear(x, layer.weight_mu, layer.bias_mu))
    with sampling(0, 0, [0]):
        assert not torch.allclose(layer(x), F.linear(x, layer.weight_mu, layer.bias_mu)), "sampling() samples in eval"


@pytest.mark.parametrize("kind, estimator", [c for c in CASES if c[0] != "conv1d"])
def test_gradients_match_finite_differences(kind, estimator):
    layer, x = make(kind, estimator), inputs(kind, 2)
    params = list(layer.parameters())

    def forward(x):
        with sampling(seed=2, step=4, samples=[0, 5]):
            return run(layer, stack(x, 2))

    def f(x, *values):
        with torch.no_grad():
            for p, v in zip(params, values):
                p.copy_(v)
        return forward(x)

    values = [p.detach().clone() for p in params]
    # d out / d x by finite differences through the full sampled forward
    assert torch.autograd.gradcheck(forward, (x.requires_grad_(),), eps=1e-6, atol=1e-5)
    # d sum(out^2) / d params against central differences of the same deterministic function
    out = f(x.detach(), *values)
    grads = torch.autograd.grad(out.square().sum(), params)
    for idx, g in enumerate(grads):
        for i in torch.randperm(g.numel(), generator=torch.Generator().manual_seed(0))[:6].tolist():
            bumped = [v.clone() for v in values]
            bumped[idx].view(-1)[i] += 1e-6
            hi = f(x.detach(), *bumped).square().sum()
            bumped[idx].view(-1)[i] -= 2e-6
            lo = f(x.detach(), *bumped).square().sum()
            fd = (hi - lo).item() / 2e-6
            assert g.view(-1)[i].item() == pytest.approx(fd, rel=1e-5, abs=1e-6)


def test_reparam_linear_gradient_equals_a_loop_over_samples():
    """The fused batched matmul gives autograd's gradients of a per-sample Python loop."""
    layer, x = make("linear"), inputs("linear", 3).requires_grad_()
    with sampling(0, 1, range(4)):
        (layer(stack(x, 4)) ** 3).sum().backward()
        eps_w, eps_b = layer.noise()
    fused = [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
    x.grad = None
    layer.zero_grad()
    sigma_w, sigma_b = F.softplus(layer.weight_rho), F.softplus(layer.bias_rho)
    total = 0
    for s in range(4):
        w = layer.weight_mu + sigma_w * eps_w[s]
        b = layer.bias_mu + sigma_b * eps_b[s]
        total = total + (F.linear(x, w, b) ** 3).sum()
    total.backward()
    loop = [x.grad] + [p.grad for p in layer.parameters()]
    for a, b in zip(fused, loop):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def outputs_and_gradients(layer: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """4 samples of x through the layer: its outputs, then the gradients of sum(out^3) for x and each parameter."""
    xg = stack(x, 4).requires_grad_()
    with sampling(0, 1, range(4)):
        out = layer(xg)
    (out ** 3).sum().backward()
    return [out.detach(), xg.grad] + [p.grad.clone() for p in layer.parameters()]


@pytest.mark.parametrize("shape", [(3, 5), (3, 2, 5)])
def test_flipout_linear_fast_path_equals_the_generic_flipout(shape):
    """BayesianLinear's flipout (perturbation through the fused function) gives the generic
    estimator's outputs and gradients, for inputs with and without a token axis."""
    from hpcbnn.bnn.layers import BayesianModule

    fused, generic = make("linear", "flipout"), make("linear", "flipout")
    generic.load_state_dict(fused.state_dict())
    generic.noise_key = fused.noise_key
    generic.perturbed = lambda t: BayesianModule.perturbed(generic, t)
    x = torch.randn(*shape, dtype=D64, generator=torch.Generator().manual_seed(3))
    results = [outputs_and_gradients(layer, x) for layer in (fused, generic)]
    for a, b in zip(*results):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape,bias", [((3, 5), True), ((3, 2, 5), True), ((3, 5), False)])
def test_local_linear_fast_path_equals_the_generic_local_reparam(shape, bias):
    """BayesianLinear's local reparameterisation (gradients written out, in-place elementwise
    work) gives the generic estimator's outputs and gradients, with a token axis and without a
    bias, where an all-zero input row makes the variance 0: clamped, it passes no gradient."""
    from hpcbnn.bnn.layers import BayesianModule

    torch.manual_seed(0)
    fused = BayesianLinear(5, 4, bias=bias, estimator="local", init_std=0.2, dtype=D64)
    generic = BayesianLinear(5, 4, bias=bias, estimator="local", init_std=0.2, dtype=D64)
    generic.load_state_dict(fused.state_dict())
    generic.noise_key = fused.noise_key
    generic.local_reparam = lambda t: BayesianModule.local_reparam(generic, t)
    x = torch.randn(*shape, dtype=D64, generator=torch.Generator().manual_seed(3))
    x[0] = 0
    results = [outputs_and_gradients(layer, x) for layer in (fused, generic)]
    assert results[0][1].isfinite().all()
    for a, b in zip(*results):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("shared", [False, True])
def test_every_estimator_trains_under_bfloat16_autocast(estimator, shared):
    """`--amp`: the forward in bfloat16, the fused functions' backward in the parameters' float32
    (it runs outside autocast); the gradients match full precision to bfloat16's accuracy, with
    the input's copies declared shared or not."""
    torch.manual_seed(0)
    net = nn.Sequential(BayesianLinear(20, 30, estimator=estimator), nn.ReLU(), BayesianLinear(30, 5, estimator=estimator))
    x = stack(torch.randn(8, 20, generator=torch.Generator().manual_seed(2)), 4)
    grads = []
    for amp in (False, True):
        net.zero_grad()
        with (sampling(0, 1, range(4), shared_input=x if shared else None),
              torch.autocast("cpu", torch.bfloat16, enabled=amp)):
            out = net(x)
        out.float().square().sum().backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in net.parameters()]))
    assert grads[1].dtype == torch.float32 and grads[1].isfinite().all()
    assert (grads[1] - grads[0]).norm() < 0.05 * grads[0].norm()


def test_two_forwards_before_one_backward_keep_their_own_noise():
    layer, x = make("linear"), inputs("linear", 2)
    with sampling(0, 1, [0, 1]):
        first = layer(stack(x, 2)).sum()
    with sampling(0, 2, [0, 1]):
        second = layer(stack(x, 2)).sum()
    (first + second).backward()
    both = layer.weight_rho.grad.clone()
    layer.zero_grad()
    for step in (1, 2):
        with sampling(0, step, [0, 1]):
            layer(stack(x, 2)).sum().backward()
    assert torch.allclose(both, layer.weight_rho.grad, rtol=1e-12)


def test_sample_batch_norm_never_mixes_samples():
    torch.manual_seed(0)
    bn = SampleBatchNorm2d(3).double()
    refs = [nn.BatchNorm2d(3).double() for _ in range(2)]
    x = torch.randn(2 * 4, 3, 5, 5, dtype=D64) * torch.tensor([1.0, 5.0]).repeat_interleave(4).view(-1, 1, 1, 1)
    with sampling(0, 0, [0, 1]):
        out = bn(x)
    assert torch.allclose(out, torch.cat([refs[0](x[:4]), refs[1](x[4:])]), atol=1e-12)
    for stat in ("running_mean", "running_var"):
        assert torch.allclose(getattr(bn, stat), (getattr(refs[0], stat) + getattr(refs[1], stat)) / 2, atol=1e-12)
    bn.eval()
    with sampling(0, 0, [0, 1]):
        assert torch.allclose(bn(x), F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, eps=bn.eps))


def test_rows_not_divisible_by_samples_is_a_clear_error():
    layer = make("linear")
    with sampling(0, 0, [0, 1, 2]), pytest.raises(UsageError, match="multiple of the 3 samples"):
        layer(torch.zeros(4, 5, dtype=D64))
    with pytest.raises(UsageError, match="estimator"):
        BayesianLinear(2, 2, estimator="mc-dropout")


def test_attention_masks_and_weights_follow_nn_multihead_attention():
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(8, 2, batch_first=False).double()
    layer = BayesianMultiheadAttention.from_module(ref).eval()
    q, kv = torch.randn(4, 3, 8, dtype=D64), torch.randn(6, 3, 8, dtype=D64)
    pad = torch.zeros(3, 6, dtype=torch.bool)
    pad[1, -2:] = True
    causal = torch.ones(4, 6, dtype=torch.bool).triu(1)
    for args in [dict(), dict(key_padding_mask=pad), dict(attn_mask=causal, key_padding_mask=pad)]:
        want, want_w = ref.eval()(q, kv, kv, **args)
        got, got_w = layer(q, kv, kv, **args)
        assert torch.allclose(got, want, atol=1e-12) and torch.allclose(got_w, want_w, atol=1e-12)
        got_fast, _ = layer(q, kv, kv, need_weights=False, **args)
        assert torch.allclose(got_fast, want, atol=1e-12)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_every_estimator_has_the_posterior_predictive_moments(estimator):
    """Over many samples, y = x W^T + b has mean x mu^T + mu_b and variance x^2 sigma^2 + sigma_b^2."""
    torch.manual_seed(0)
    layer = BayesianLinear(3, 2, estimator=estimator, init_std=0.5, dtype=D64)
    x = torch.tensor([[1.0, -2.0, 0.5]], dtype=D64)
    k = 4000
    with sampling(0, 0, range(k)), torch.no_grad():
        y = layer(stack(x, k))
    sigma_w, sigma_b = F.softplus(layer.weight_rho), F.softplus(layer.bias_rho)
    mean = F.linear(x, layer.weight_mu, layer.bias_mu)[0]
    var = (F.linear(x.square(), sigma_w.square()) + sigma_b.square())[0]
    assert torch.allclose(y.mean(0), mean, atol=4 * (var / k).sqrt().max().item())
    assert torch.allclose(y.var(0), var, rtol=0.1)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_a_1x1_convolution_is_the_linear_layer(estimator):
    """The estimators are written once over each layer's op: a Conv1d with a 1-wide kernel and
    the Linear layer holding the same posterior (and noise key) give the same samples."""
    linear = BayesianLinear(5, 4, estimator=estimator, init_std=0.2, dtype=D64)
    conv = BayesianConv1d(5, 4, 1, estimator=estimator, init_std=0.2, dtype=D64)
    with torch.no_grad():
        for name in ("weight_mu", "weight_rho", "bias_mu", "bias_rho"):
            getattr(conv, name).copy_(getattr(linear, name).view_as(getattr(conv, name)))
    conv.noise_key = linear.noise_key
    x = torch.randn(6, 5, dtype=D64, generator=torch.Generator().manual_seed(2))
    with sampling(seed=3, step=1, samples=[4, 0, 9]):
        want = linear(x)
        got = conv(x.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(got, want, rtol=0, atol=1e-12)


def shared_and_copied(layer: nn.Module, x: torch.Tensor, k: int = 4) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Outputs and parameter gradients of k samples on copies of x, with the copies declared
    shared (sampling's shared_input) and not."""
    results = []
    for shared in (True, False):
        layer.zero_grad()
        xk = stack(x, k)
        with sampling(0, 1, range(k), shared_input=xk if shared else None):
            out = layer(xk)
        (out**3).sum().backward()
        results.append([out.detach()] + [p.grad.clone() for p in layer.parameters()])
    return results[0], results[1]


def product_rows(layer: nn.Module, x: torch.Tensor, k: int = 4) -> set[int]:
    """The row counts of the matrix products (and convolutions' batch sizes) a shared-input forward runs."""
    xk = stack(x, k)
    with torch.profiler.profile(record_shapes=True) as prof, sampling(0, 1, range(k), shared_input=xk):
        layer(xk)
    ops = ("aten::mm", "aten::addmm", "aten::convolution")
    return {e.input_shapes[0 if e.key != "aten::addmm" else 1][0] for e in prof.key_averages(group_by_input_shape=True)
            if e.key in ops and e.input_shapes}


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d"])
@pytest.mark.parametrize("estimator", ["flipout", "local"])
def test_a_shared_input_gives_the_same_outputs_and_gradients(kind, estimator):
    """Copies of one batch declared shared: the mean (and local's variance) products run on one
    block, and the outputs and gradients equal those of the copies taken one by one."""
    layer = make(kind, estimator)
    x = inputs(kind, 3)
    shared, copied = shared_and_copied(layer, x)
    for a, b in zip(shared, copied):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    rows = 3 * math.prod(x.shape[1:-1]) if kind == "linear" else 3
    assert rows in product_rows(layer, x)


def test_a_shared_input_is_not_shared_once_changed_in_place_or_when_it_needs_its_gradient():
    x = stack(torch.randn(3, 5, dtype=D64), 4)
    with sampling(0, 1, range(4), shared_input=x) as ctx:
        assert torch.equal(ctx.shared_rows(x), x[:3]) and torch.equal(ctx.shared_rows(x.view(4, 15)), x.view(4, 15)[:1])
        assert ctx.shared_rows(x.view(2, 30)) is None  # rows that are not the k blocks
        assert ctx.shared_rows(x.clone()) is None and ctx.shared_rows(x[:6]) is None
        assert ctx.shared_rows(x.detach().requires_grad_()) is None
        x[0, 0] += 1.0  # the rows are no longer copies
        assert ctx.shared_rows(x) is None
    with pytest.raises(UsageError, match="shared_input"):
        with sampling(0, 1, range(4), shared_input=torch.zeros(6, 5)):
            pass


def test_a_mixture_passes_a_shared_input_to_its_components():
    from hpcbnn.bnn.mixture import Mixture

    torch.manual_seed(0)
    model = Mixture([BayesianLinear(5, 4, estimator="local", init_std=0.2, dtype=D64) for _ in range(2)])
    x = torch.randn(3, 5, dtype=D64)
    shared, copied = shared_and_copied(model, x, k=8)
    for a, b in zip(shared, copied):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert 3 in product_rows(model, x, k=8)
