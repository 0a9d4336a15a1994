"""Mean-field Gaussian Bayesian layers that evaluate k weight samples in one pass.

Each weight w has a posterior N(mu, sigma^2), sigma = softplus(rho), and the prior is
N(0, prior_scale^2) with a closed-form KL. By default both scale with the layer's fan-in
(`"fan_in"`), from He's sqrt(2 / fan_in), the scale at which a ReLU network's activations
neither blow up nor vanish (a unit prior on a 64-input layer is 8x that). The prior is
PRIOR_FRACTION of it (0.7). The KL pulls the means with kl_weight / (N prior^2) per unit
of weight; a tighter prior spreads a mixture's components further apart off the data but
makes them less confident on it, a trade measured in docs/uq.md. Sigma starts at INIT_FRACTION of
the He std, so the weight noise stays below the components' disagreement; the sigmas' own
learning rate (`make_optimizer(rho_lr_scale=...)`) and a tempered KL (`kl_weight`) let the
data shape them from there. docs/uq.md measures every choice (rounds 4 and 5 for these two).

Inside `hpcbnn.bnn.noise.sampling(...)` an input has k*B rows, sample-major, and a layer
evaluates the k samples together: Linear with one batched matmul on [k, B*, in], Conv
with one grouped convolution (the samples become groups). Estimators:
  reparam  w_s = mu + sigma * eps_s                   (default; k weight copies)
  flipout  mu x + ((x * r_in) (sigma * eps_s)) * r_out, random signs per example
  local    mu x + sqrt(sigma^2 x^2) * eps, output noise per example (no weight copies)
Layers in between (activations, LayerNorm, attention, pooling) see k*B independent rows
and work unchanged; BatchNorm must not mix samples: `SampleBatchNorm*` keeps one set of
batch statistics per sample block.

Under an `hpcbnn.ppl` tracer (tape, condition, log_joint) the weights and biases are
named random variables (hpcbnn.bnn.variables); untraced code pays one check per layer.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from typing import Any, Literal, Union, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn.modules.batchnorm import _BatchNorm

from hpcbnn.bnn.noise import current, example_noise, next_key, weight_noise, weight_samples
from hpcbnn.bnn.rng import Weights
from hpcbnn.bnn.softplus import softplus
from hpcbnn.bnn.variables import traced_forward
from hpcbnn.errors import UsageError
from hpcbnn.ppl.tracing import tracing

Estimator = Literal["reparam", "flipout", "local"]
ESTIMATORS: tuple[Estimator, ...] = get_args(Estimator)
FAN_IN: Literal["fan_in"] = "fan_in"
PRIOR_FRACTION = 0.7  # prior std / He std with prior_scale="fan_in" (docs/uq.md, round 5; round 4: 0.5)
INIT_FRACTION = 0.01  # initial sigma / He std with init_std="fan_in" (docs/uq.md, round 4)
Scale = Union[float, Literal["fan_in"]]
MeanInit = Literal["prior", "module"]  # where bayesianize starts the posterior means (docs/uq.md, round 6)
MEAN_INITS: tuple[MeanInit, ...] = get_args(MeanInit)


def inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


def he_std(weight_shape: Sequence[int]) -> float:
    """sqrt(2 / fan_in), fan_in = the inputs feeding one output (in_features, or in_channels/groups x kernel)."""
    return math.sqrt(2 / max(1, math.prod(weight_shape[1:])))


def resolve_scale(value: Scale, weight_shape: Sequence[int], fraction: float = 1.0) -> float:
    """A float as given; "fan_in" as `fraction` of the layer's He std."""
    if value == FAN_IN:
        return fraction * he_std(weight_shape)
    if isinstance(value, str):
        raise UsageError(f"a prior or initial scale is a positive number or {FAN_IN!r}, not {value!r}")
    return float(value)


class KLTerm(nn.Module):
    """A module with a closed-form KL(q || p) of its own: a Bayesian layer, or a mixture of networks."""

    def kl(self) -> Tensor:
        raise NotImplementedError


class BayesianModule(KLTerm):
    """Posterior N(weight_mu, softplus(weight_rho)^2) per weight (and bias), prior N(0, prior_scale^2).

    `prior_scale` and `init_std` are numbers or "fan_in" (PRIOR_FRACTION, resp. INIT_FRACTION of
    the He std); the layer keeps the resolved numbers, which the bias shares. `variable_name`,
    the qualified name (set by `assign_noise_keys`), names its weights' random variables.
    """

    variable_name: str | None = None

    def __init__(
        self,
        weight_shape: Sequence[int],
        bias_size: int | None,
        *,
        prior_scale: Scale = FAN_IN,
        init_std: Scale = FAN_IN,
        estimator: str = "reparam",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if estimator not in ESTIMATORS:
            raise UsageError(f"unknown estimator {estimator!r}: choose one of {', '.join(ESTIMATORS)}")
        prior_scale = resolve_scale(prior_scale, weight_shape, PRIOR_FRACTION)
        init_std = resolve_scale(init_std, weight_shape, INIT_FRACTION)
        if prior_scale <= 0 or init_std <= 0:
            raise UsageError(f"prior_scale ({prior_scale}) and init_std ({init_std}) must be positive")
        kw: dict[str, Any] = {"dtype": dtype, "device": device}
        self.weight_mu = nn.Parameter(torch.empty(*weight_shape, **kw))
        self.weight_rho = nn.Parameter(torch.empty(*weight_shape, **kw))
        if bias_size is None:
            self.register_parameter("bias_mu", None)
            self.register_parameter("bias_rho", None)
        else:
            self.bias_mu = nn.Parameter(torch.empty(bias_size, **kw))
            self.bias_rho = nn.Parameter(torch.empty(bias_size, **kw))
        self.prior_scale = prior_scale
        self.init_std = init_std
        self.estimator = estimator
        self.noise_key = next_key()
        self._eps: Tensor | None = None
        self._lease: object | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Means as torch initialises the deterministic layer; standard deviations `init_std`."""
        nn.init.kaiming_uniform_(self.weight_mu, a=math.sqrt(5))
        nn.init.constant_(self.weight_rho, inverse_softplus(self.init_std))
        if self.bias_mu is not None:
            fan_in, _ = nn.init._calculate_fan_in_and_fan_out(self.weight_mu)
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
            nn.init.uniform_(self.bias_mu, -bound, bound)
            nn.init.constant_(self.bias_rho, inverse_softplus(self.init_std))

    def draw_means(self) -> None:
        """Weight means drawn from the prior N(0, prior_scale^2); the biases keep torch's initialisation."""
        with torch.no_grad():
            self.weight_mu.normal_(0.0, self.prior_scale)

    def load_means(self, weight: Tensor, bias: Tensor | None) -> None:
        """Centre the posterior on deterministic weights (e.g. pretrained ones)."""
        with torch.no_grad():
            self.weight_mu.copy_(weight)
            if self.bias_mu is not None and bias is not None:
                self.bias_mu.copy_(bias)

    def _pairs(self) -> list[tuple[Tensor, Tensor]]:
        pairs: list[tuple[Tensor, Tensor]] = [(self.weight_mu, self.weight_rho)]
        if self.bias_mu is not None:
            pairs.append((self.bias_mu, self.bias_rho))
        return pairs

    def kl(self) -> Tensor:
        """KL(q || p) = sum log(s/sigma) + (sigma^2 + mu^2) / (2 s^2) - 1/2, in closed form."""
        total = self.weight_mu.new_zeros(())
        for mu, rho in self._pairs():
            total = total + _GaussianKL.apply(mu, rho, self.prior_scale)
        return total

    def samples_here(self) -> int:
        """k, the number of weight samples this forward evaluates; 0 means the posterior mean."""
        ctx = current()
        if ctx is not None:
            return len(ctx.samples)
        return 1 if self.training else 0

    def noise(self, reuse: bool = False, weights: Weights | None = None) -> tuple[Tensor, Tensor | None]:
        """eps for the k samples: [k, *weight] and [k, bias] (or None), drawn together.

        With `reuse`, the previous step's buffer is refilled unless a graph that has not
        been back-propagated yet still holds it (see `_ReparamLinear`): fresh large
        allocations cost page faults on every step. `weights` = (mu, sigma, w) also writes
        the weight samples w_s = mu + sigma * eps_s in the same pass (`weight_noise`).
        """
        mu_w = self.weight_mu
        nw = mu_w.numel()
        nb = 0 if self.bias_mu is None else self.bias_mu.numel()
        spare = self._eps if reuse and self._lease is None else None
        eps = weight_noise(self.noise_key, (nw + nb,), mu_w.dtype, mu_w.device, reuse=spare, weights=weights)
        if reuse:
            self._eps = eps
        k = eps.shape[0]
        return eps[:, :nw].view(k, *mu_w.shape), (None if self.bias_mu is None else eps[:, nw:])

    def sample_bias(self, eps_b: Tensor | None) -> Tensor | None:
        if self.bias_mu is None or eps_b is None:
            return None
        return torch.addcmul(self.bias_mu, softplus(self.bias_rho), eps_b)

    def sample(self) -> tuple[Tensor, Tensor | None]:
        """k weight samples [k, *weight] and bias samples [k, bias]."""
        eps_w, eps_b = self.noise()
        return torch.addcmul(self.weight_mu, softplus(self.weight_rho), eps_w), self.sample_bias(eps_b)

    def perturbed(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """x through the k weight perturbations sigma * eps_s (Flipout's second op), and the k sampled biases."""
        eps_w, eps_b = self.noise()
        return self.batched_op(x, softplus(self.weight_rho) * eps_w, None), self.sample_bias(eps_b)

    # The estimators, each written once: a layer supplies its deterministic `op` and the
    # `batched_op` that applies k weight samples in one call, the estimators compose them.

    channel_dim = 1
    """The channel axis of an input: 1 for a convolution's [N, C, ...], -1 for Linear's [N, ..., in]."""

    def op(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        """The deterministic layer with weight w [*weight] and bias b [out]."""
        raise NotImplementedError

    def batched_op(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        """k weight samples w [k, *weight], biases b [k, out] on a sample-major x [k*B, ...], in one call."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        k = self.samples_here()
        if tracing():
            return traced_forward(self, x, k)
        if k == 0:
            return self.op(x, self.weight_mu, self.bias_mu)
        _check_rows(x, k, self)
        if self.estimator == "reparam":
            return self.reparam(x)
        if self.estimator == "local":
            return self.local_reparam(x)
        return self.flipout(x)

    def reparam(self, x: Tensor) -> Tensor:
        """w_s = mu + sigma * eps_s: k weight copies through the batched op."""
        w, b = self.sample()
        return self.batched_op(x, w, b)

    def local_reparam(self, x: Tensor) -> Tensor:
        """The pre-activation's Gaussian mu x + sqrt(sigma^2 x^2) * eps: noise per example, no weight
        copies. On a shared input (`Sampling.shared_rows`) mean and variance are one block's."""
        rows = _shared_rows(x)
        block = x if rows is None else rows
        mean = self.op(block, self.weight_mu, self.bias_mu)
        var = self.op(
            block.square(),
            softplus(self.weight_rho).square(),
            None if self.bias_rho is None else softplus(self.bias_rho).square(),
        )
        std = var.clamp_min(torch.finfo(var.dtype).tiny).sqrt()
        noise = example_noise(self.noise_key, x.shape[0], mean.shape[1:], mean.dtype, mean.device)
        if rows is None:
            return torch.addcmul(mean, std, noise)
        return torch.addcmul(mean, std, _sample_major(noise, x.shape[0] // rows.shape[0])).view(noise.shape)

    def flipout(self, x: Tensor) -> Tensor:
        """mu x + ((x * r_in) (sigma * eps_s)) * r_out with random signs r per example: the k
        perturbations decorrelate over the rows at the cost of a second (batched) op."""
        d = self.channel_dim % x.dim()
        n_in, n_out = x.shape[d], self.weight_mu.shape[0]
        shape = [1] * (x.dim() - 1)
        shape[d - 1] = n_in + n_out
        signs = example_noise(self.noise_key, x.shape[0], shape, x.dtype, x.device, kind="sign")
        s_in, s_out = signs.split([n_in, n_out], dim=d)
        dy, b = self.perturbed(x * s_in)
        rows = _shared_rows(x)
        if rows is None:
            out = torch.addcmul(self.op(x, self.weight_mu, None), dy, s_out)
        else:  # the mean's product on one block of a shared input, for all k samples
            k = x.shape[0] // rows.shape[0]
            out = torch.addcmul(self.op(rows, self.weight_mu, None), _sample_major(dy, k), _sample_major(s_out, k))
            out = out.view(dy.shape)
        return out if b is None else _add_sample_bias(out, b, channel_dim=d)

    def extra_repr(self) -> str:
        return f"prior_scale={self.prior_scale}, init_std={self.init_std}, estimator={self.estimator!r}"


class _GaussianKL(torch.autograd.Function):
    """KL(N(mu, softplus(rho)^2) || N(0, s^2)) summed, with its analytic gradient:
    dKL/dmu = mu / s^2, dKL/drho = (sigma / s^2 - 1 / sigma) * sigmoid(rho).
    Sums of squares are dot products: few parameter-sized temporaries, one softplus."""

    @staticmethod
    def forward(ctx: Any, mu: Tensor, rho: Tensor, s: float) -> Tensor:
        sigma = softplus(rho)
        flat, m = sigma.view(-1), mu.reshape(-1)
        quadratic = (torch.dot(flat, flat) + torch.dot(m, m)) / (2 * s * s)
        ctx.save_for_backward(mu, rho, sigma)
        ctx.s = s
        return mu.numel() * (math.log(s) - 0.5) - flat.log().sum() + quadratic

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        mu, rho, sigma = ctx.saved_tensors
        s2 = ctx.s * ctx.s
        dsigma = sigma.reciprocal().neg_().add_(sigma, alpha=1 / s2)
        return mu * (grad / s2), dsigma.mul_(torch.sigmoid(rho)).mul_(grad), None


def _shared_rows(x: Tensor) -> Tensor | None:
    """x's one block of rows when the k samples share it (`Sampling.shared_rows`), else None."""
    ctx = current()
    return None if ctx is None else ctx.shared_rows(x)


def _sample_major(t: Tensor, k: int) -> Tensor:
    """[k*B, ...] -> [k, B, ...]"""
    return t.reshape(k, t.shape[0] // k, *t.shape[1:])


def _check_rows(x: Tensor, k: int, layer: nn.Module) -> None:
    if x.shape[0] % k:
        raise UsageError(
            f"{type(layer).__name__}: input has {x.shape[0]} rows, not a multiple of the {k} "
            f"samples being evaluated; stack the batch once per sample (sample-major)"
        )


class BayesianLinear(BayesianModule):
    """y_s = x_s w_s^T + b_s for the k samples, as one batched matmul over [k, B*, in]."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, **kw: Any) -> None:
        self.in_features, self.out_features = in_features, out_features
        super().__init__((out_features, in_features), out_features if bias else None, **kw)

    @classmethod
    def from_module(cls, m: nn.Linear, **kw: Any) -> BayesianLinear:
        layer = cls(
            m.in_features, m.out_features, m.bias is not None, dtype=m.weight.dtype, device=m.weight.device, **kw
        )
        layer.load_means(m.weight, m.bias)
        return layer

    @property
    def weight(self) -> SampledOperand:
        return SampledOperand(self, "weight")

    @property
    def bias(self) -> SampledOperand | None:
        return None if self.bias_mu is None else SampledOperand(self, "bias")

    channel_dim = -1

    def op(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        return F.linear(x, w, b)

    def batched_op(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        return batched_linear(x, w, b)

    def reparam(self, x: Tensor) -> Tensor:
        """The fast path: `_ReparamLinear` keeps neither the k weight copies nor their gradients."""
        return self._sampled_linear(x, with_mu=True)[0]

    def _sampled_linear(self, x: Tensor, with_mu: bool) -> tuple[Tensor, Tensor | None]:
        """x_s w_s^T + b_s through `_ReparamLinear` with w_s = mu + sigma * eps_s, or, for flipout's
        perturbation, x_s (sigma * eps_s)^T and the bias samples b_s apart. The draws and the
        weight samples are written in one pass."""
        mu, sigma = self.weight_mu if with_mu else None, softplus(self.weight_rho)
        w = _workspace((self.samples_here(), *self.weight_mu.shape), sigma.dtype, sigma.device)
        eps_w, eps_b = self.noise(reuse=True, weights=(mu, sigma, w))
        k, bias = eps_w.shape[0], self.sample_bias(eps_b)
        y = _ReparamLinear.apply(
            x.reshape(k, -1, self.in_features),
            mu,
            sigma,
            eps_w,
            bias if with_mu else None,
            self if torch.is_grad_enabled() else None,
            w,
        )
        return y.reshape(*x.shape[:-1], self.out_features), None if with_mu else bias

    def local_reparam(self, x: Tensor) -> Tensor:
        """The fast path: `_LocalLinear` does the elementwise work in place and in few passes."""
        rows = x.reshape(-1, self.in_features)
        noise = example_noise(self.noise_key, x.shape[0], (*x.shape[1:-1], self.out_features), x.dtype, x.device)
        shared = _shared_rows(x)
        y = _LocalLinear.apply(
            rows if shared is None else shared.reshape(-1, self.in_features),
            self.weight_mu,
            softplus(self.weight_rho),
            self.bias_mu,
            None if self.bias_rho is None else softplus(self.bias_rho),
            noise.view(rows.shape[0], self.out_features),
        )
        return y.view(*x.shape[:-1], self.out_features)

    def perturbed(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Flipout's second op through `_ReparamLinear` with mu = None: the k perturbations
        sigma * eps_s are neither kept nor reduced by autograd."""
        return self._sampled_linear(x, with_mu=False)


def _add_sample_bias(out: Tensor, b: Tensor, channel_dim: int) -> Tensor:
    """out [k*B, ...] + each sample's bias b [k, C] along out's (non-negative) `channel_dim`."""
    k, c = b.shape
    shape = [k] + [1] * out.dim()
    shape[channel_dim + 1] = c
    return (_sample_major(out, k) + b.view(shape)).view_as(out)


def batched_linear(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """x [k*B, ..., in], w [k, out, in], b [k, out] -> [k*B, ..., out]: one bmm for all samples."""
    k, out_features, in_features = w.shape
    x3 = x.reshape(k, -1, in_features)
    if b is None:
        y = torch.bmm(x3, w.transpose(1, 2))
    else:
        y = torch.baddbmm(b.unsqueeze(1), x3, w.transpose(1, 2))
    return y.reshape(*x.shape[:-1], out_features)


class _ReparamLinear(torch.autograd.Function):
    """y_s = x_s (mu + sigma * eps_s)^T + b_s, one bmm for all k samples, lean in memory and passes
    (mu = None: the perturbation x_s (sigma * eps_s)^T alone, as flipout needs it).

    Autograd would keep the k weight copies and eps and reduce the broadcast gradient with
    out-of-place products; here only eps is saved, the weights are rebuilt in backward in
    a workspace shared by all layers, and d/dmu, d/dsigma are sums over the k samples of
    dW_s and dW_s * eps_s, taken one sample at a time (`_sample_sums`). While a graph (built with grad
    enabled) holds eps the layer carries a lease, so its next forward does not refill it.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x3: Tensor,
        mu: Tensor | None,
        sigma: Tensor,
        eps: Tensor,
        bias: Tensor | None,
        layer: BayesianModule | None,
        w: Tensor,
    ) -> Tensor:
        wt = w.transpose(1, 2)
        y = torch.bmm(x3, wt) if bias is None else torch.baddbmm(bias.unsqueeze(1), x3, wt)
        ctx.save_for_backward(x3, mu, sigma, eps)
        ctx.has_mu, ctx.has_bias = mu is not None, bias is not None
        ctx.layer, ctx.lease = layer, object()
        if layer is not None:
            layer._lease = ctx.lease
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x3, mu, sigma, eps = ctx.saved_tensors
        grad, x3 = _parameter_dtype(sigma, grad, x3)
        grad_x = None
        if ctx.needs_input_grad[0]:
            w = weight_samples(eps, sigma, mu if ctx.has_mu else None, _workspace(eps.shape, eps.dtype, eps.device))
            grad_x = torch.bmm(grad, w)
        grad_mu, grad_sigma = _sample_sums(grad, x3, eps, ctx.has_mu)
        grad_bias = grad.sum(1) if ctx.has_bias else None
        if ctx.layer is not None and ctx.layer._lease is ctx.lease:
            ctx.layer._lease = None
        return grad_x, grad_mu, grad_sigma, None, grad_bias, None, None


class _LocalLinear(torch.autograd.Function):
    """y = x mu^T + b + sqrt(x^2 (sigma^2)^T + s_b^2) * noise, the local reparameterisation of a
    Linear layer, with the gradients written out: autograd would keep and allocate a tensor of
    the output's size for each of the eight elementwise steps, here four are done in place.
    A variance below the smallest normal float is clamped to it and passes no gradient, as
    `BayesianModule.local_reparam` does. With noise of k times x's rows, x is the one block
    of a shared input: mean and std are computed once and broadcast over the k samples."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, mu: Tensor, sigma: Tensor, b: Tensor | None, s_b: Tensor | None, noise: Tensor
    ) -> Tensor:
        x2 = x.square()
        sigma2 = sigma.square()
        var = torch.mm(x2, sigma2.t()) if s_b is None else torch.addmm(s_b.square(), x2, sigma2.t())
        tiny = torch.finfo(var.dtype).tiny
        # A bias's variance keeps var >= tiny (checked on [out] numbers): then nothing is clamped
        clamped = var < tiny if s_b is None or s_b.square().min() < tiny else None
        std = var.clamp_min_(tiny).sqrt_()
        mean = torch.mm(x, mu.t()) if b is None else torch.addmm(b, x, mu.t())
        ctx.save_for_backward(x, x2, mu, sigma, sigma2, s_b, std, noise, clamped)
        k = noise.shape[0] // x.shape[0]
        if k == 1:
            return mean.addcmul_(std, noise)
        return torch.addcmul(mean, std, noise.view(k, *mean.shape)).view(noise.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, x2, mu, sigma, sigma2, s_b, std, noise, clamped = ctx.saved_tensors
        grad, x, x2, std, noise = _parameter_dtype(sigma, grad, x, x2, std, noise)
        need = ctx.needs_input_grad
        k = noise.shape[0] // x.shape[0]
        if k == 1:
            grad_std = torch.mul(grad, noise)
        else:  # sums over the k samples that share mean and std, one [rows, out] block at a time
            grad, noise = grad.view(k, *std.shape), noise.view(k, *std.shape)
            grad_std = torch.mul(grad[0], noise[0])
            for s in range(1, k):
                grad_std.addcmul_(grad[s], noise[s])
            grad = grad.sum(0)
        grad_var = grad_std.div_(std).mul_(0.5)  # d sqrt(v) / dv = 1 / (2 sqrt(v))
        if clamped is not None:
            grad_var.masked_fill_(clamped, 0)
        grad_x = None
        if need[0]:
            grad_x = torch.mm(grad, mu).addcmul_(x, torch.mm(grad_var, sigma2), value=2)
        grad_mu = torch.mm(grad.t(), x) if need[1] else None
        grad_sigma = torch.mm(grad_var.t(), x2).mul_(sigma).mul_(2) if need[2] else None
        grad_b = grad.sum(0) if need[3] else None
        grad_s_b = grad_var.sum(0).mul_(s_b).mul_(2) if s_b is not None and need[4] else None
        return grad_x, grad_mu, grad_sigma, grad_b, grad_s_b, None


def _parameter_dtype(like: Tensor, *tensors: Tensor) -> tuple[Tensor, ...]:
    """The tensors in the parameters' dtype: under autocast the forward ran in bfloat16 and the
    backward of a custom Function runs outside it, so the gradients are taken in full precision."""
    return tuple(t.to(like.dtype) for t in tensors)


def _sample_sums(grad: Tensor, x3: Tensor, eps: Tensor, with_mu: bool) -> tuple[Tensor | None, Tensor]:
    """sum_s dW_s (None without mu) and sum_s dW_s * eps_s over the k samples, dW_s = grad_s^T x_s.

    Sample by sample: each dW_s is made in a cache-sized buffer and added at once to the two
    running sums, so only eps streams from memory; the k dW_s never exist together, and the
    sums take no matrix-vector products (docs/performance.md)."""
    dw = torch.mm(grad[0].t(), x3[0])
    grad_mu = dw.clone() if with_mu else None
    grad_sigma = torch.mul(dw, eps[0])
    for s in range(1, eps.shape[0]):
        torch.mm(grad[s].t(), x3[s], out=dw)
        grad_sigma.addcmul_(dw, eps[s])
        if grad_mu is not None:
            grad_mu.add_(dw)
    return grad_mu, grad_sigma


class _Workspace(threading.local):
    def __init__(self) -> None:
        self.buffers: dict[tuple[torch.device, torch.dtype], Tensor] = {}


_work = _Workspace()


def _workspace(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Scratch of this shape, shared by the layers (used only inside one forward or backward)."""
    key, n = (device, dtype), math.prod(shape)
    buf = _work.buffers.get(key)
    if buf is None or buf.numel() < n:
        buf = _work.buffers[key] = torch.empty(n, dtype=dtype, device=device)
    return buf[:n].view(shape)


class SampledOperand:
    """What `BayesianLinear.weight` / `.bias` are: a stand-in that makes code calling
    `F.linear(x, m.weight, m.bias)` on a Bayesian `m` (torchvision's Swin attention does)
    evaluate m's samples. Any other use is an error, since there is no single weight."""

    def __init__(self, layer: BayesianLinear, part: str) -> None:
        self.layer, self.part = layer, part
        self.shape = (layer.weight_mu if part == "weight" else layer.bias_mu).shape
        self.dtype, self.device = layer.weight_mu.dtype, layer.weight_mu.device

    @classmethod
    def __torch_function__(
        cls, func: Callable[..., Any], types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        params = [*args, *(kwargs or {}).values()]
        if func is F.linear and len(params) in (2, 3) and isinstance(params[1], cls):
            x, w, *rest = params
            bias = rest[0] if rest else None
            own_bias = None if w.layer.bias_mu is None else w.layer
            if w.part == "weight" and (bias.layer if isinstance(bias, cls) else bias) is own_bias:
                return w.layer(x)
        name = getattr(func, "__name__", str(func))
        raise TypeError(
            f"{name} on the weights of a Bayesian layer: they are sampled per Monte-Carlo sample "
            f"and only F.linear(x, layer.weight, layer.bias) can use them"
        )


class _BayesianConvNd(BayesianModule):
    """Convolution with sampled kernels; k samples run as one convolution with k times the groups."""

    dims = 0
    _conv: Callable[..., Tensor]

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        stride: Any = 1,
        padding: Any = 0,
        dilation: Any = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        **kw: Any,
    ) -> None:
        if padding_mode != "zeros":
            raise UsageError(f"Bayesian convolution supports padding_mode='zeros' only, not {padding_mode!r}")
        ks = (kernel_size,) * self.dims if isinstance(kernel_size, int) else tuple(kernel_size)
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, ks
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        super().__init__((out_channels, in_channels // groups, *ks), out_channels if bias else None, **kw)

    @classmethod
    def from_module(cls, m: nn.Conv1d | nn.Conv2d, **kw: Any) -> _BayesianConvNd:
        layer = cls(
            m.in_channels,
            m.out_channels,
            m.kernel_size,
            m.stride,
            m.padding,
            m.dilation,
            m.groups,
            m.bias is not None,
            m.padding_mode,
            dtype=m.weight.dtype,
            device=m.weight.device,
            **kw,
        )
        layer.load_means(m.weight, m.bias)
        return layer

    def _convolve(self, x: Tensor, w: Tensor, b: Tensor | None, groups: int) -> Tensor:
        return type(self)._conv(x, w, b, self.stride, self.padding, self.dilation, groups)

    def op(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        return self._convolve(x, w, b, self.groups)

    def batched_op(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        """x [k*B, C, ...] with kernels w [k, O, C/g, ...] -> [k*B, O, ...] in one convolution."""
        k = w.shape[0]
        if k == 1:
            return self.op(x, w[0], None if b is None else b[0])
        xs = _sample_major(x, k).transpose(0, 1).reshape(x.shape[0] // k, k * x.shape[1], *x.shape[2:])
        y = self._convolve(
            xs, w.reshape(k * w.shape[1], *w.shape[2:]), None if b is None else b.reshape(-1), k * self.groups
        )
        y = y.view(y.shape[0], k, self.out_channels, *y.shape[2:]).transpose(0, 1)
        return y.reshape(x.shape[0], self.out_channels, *y.shape[3:])


class BayesianConv1d(_BayesianConvNd):
    dims = 1
    _conv = staticmethod(F.conv1d)


class BayesianConv2d(_BayesianConvNd):
    dims = 2
    _conv = staticmethod(F.conv2d)


class BayesianMultiheadAttention(nn.Module):
    """`nn.MultiheadAttention` (same call signature) with Bayesian input and output projections.

    Masks follow the stacked batch (k*B rows). Self-attention (query is key is value)
    projects once; otherwise each of q, k, v goes through the packed projection.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        batch_first: bool = False,
        **kw: Any,
    ) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise UsageError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads, self.dropout, self.batch_first = embed_dim, num_heads, dropout, batch_first
        self.in_proj = BayesianLinear(embed_dim, 3 * embed_dim, bias, **kw)
        self.out_proj = BayesianLinear(embed_dim, embed_dim, bias, **kw)
        nn.init.xavier_uniform_(self.in_proj.weight_mu)
        if bias:
            nn.init.zeros_(self.in_proj.bias_mu)
            nn.init.zeros_(self.out_proj.bias_mu)

    @classmethod
    def from_module(cls, m: nn.MultiheadAttention, **kw: Any) -> BayesianMultiheadAttention:
        if not m._qkv_same_embed_dim or m.bias_k is not None or m.add_zero_attn:
            raise UsageError(
                "bayesianize: nn.MultiheadAttention with kdim/vdim, add_bias_kv or add_zero_attn "
                "is not supported; exclude it with layers=..."
            )
        w = m.in_proj_weight
        layer = cls(
            m.embed_dim,
            m.num_heads,
            m.dropout,
            m.in_proj_bias is not None,
            m.batch_first,
            dtype=w.dtype,
            device=w.device,
            **kw,
        )
        layer.in_proj.load_means(w, m.in_proj_bias)
        layer.out_proj.load_means(m.out_proj.weight, m.out_proj.bias)
        return layer

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        self_attention = query is key and key is value
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        e, h = self.embed_dim, self.num_heads
        if self_attention:
            q, k, v = self.in_proj(query).chunk(3, dim=-1)
        else:
            q, k, v = (self.in_proj(t)[..., i * e : (i + 1) * e] for i, t in enumerate((query, key, value)))
        n, lq, ls = q.shape[0], q.shape[1], k.shape[1]
        q, k, v = (t.reshape(n, -1, h, e // h).transpose(1, 2) for t in (q, k, v))
        mask = _additive_mask(attn_mask, key_padding_mask, n, h, lq, ls, q.dtype)
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(e // h)
            if mask is not None:
                scores = scores + mask
            elif is_causal:
                scores = scores.masked_fill(
                    torch.ones(lq, ls, dtype=torch.bool, device=q.device).triu(1), float("-inf")
                )
            weights = scores.softmax(-1)
            out = F.dropout(weights, p, self.training) @ v
            weights = weights.mean(1) if average_attn_weights else weights
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=p, is_causal=is_causal and mask is None
            )
        out = self.out_proj(out.transpose(1, 2).reshape(n, lq, e))
        return (out if self.batch_first else out.transpose(0, 1)), weights


def _additive_mask(
    attn_mask: Tensor | None, key_padding_mask: Tensor | None, n: int, h: int, lq: int, ls: int, dtype: torch.dtype
) -> Tensor | None:
    """nn.MultiheadAttention's masks (bool: True = masked out; float: added) as one additive mask."""

    def additive(m: Tensor) -> Tensor:
        return torch.zeros_like(m, dtype=dtype).masked_fill(m, float("-inf")) if m.dtype == torch.bool else m.to(dtype)

    mask = None
    if attn_mask is not None:
        mask = additive(attn_mask)
        mask = mask.view(n, h, lq, ls) if mask.dim() == 3 else mask.view(1, 1, lq, ls)
    if key_padding_mask is not None:
        pad = additive(key_padding_mask).view(n, 1, 1, ls)
        mask = pad if mask is None else mask + pad
    return mask


class _SampleStats:
    """BatchNorm whose batch statistics are computed per sample block of a k*B batch."""

    def forward(self: Any, x: Tensor) -> Tensor:
        ctx = current()
        k = len(ctx.samples) if ctx is not None else 1
        batch_stats = self.training or self.running_mean is None
        if k == 1 or not batch_stats:
            return super().forward(x)  # type: ignore[misc]
        _check_rows(x, k, self)
        xv = x.reshape(k, x.shape[0] // k, x.shape[1], -1)
        var, mean = torch.var_mean(xv, dim=(1, 3), correction=0)
        if self.training and self.track_running_stats:
            self._track(mean, var, xv.shape[1] * xv.shape[3])
        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight
        shift = -mean * scale
        if self.bias is not None:
            shift = shift + self.bias
        return torch.addcmul(shift[:, None, :, None], xv, scale[:, None, :, None]).view_as(x)

    def _track(self: Any, mean: Tensor, var: Tensor, n: int) -> None:
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            self.running_mean.lerp_(mean.mean(0), m)
            self.running_var.lerp_(var.mean(0) * (n / max(n - 1, 1)), m)


class SampleBatchNorm1d(_SampleStats, nn.BatchNorm1d):
    pass


class SampleBatchNorm2d(_SampleStats, nn.BatchNorm2d):
    pass


class SampleBatchNorm3d(_SampleStats, nn.BatchNorm3d):
    pass


SAMPLE_BATCH_NORM: dict[type[nn.Module], type[_BatchNorm]] = {
    nn.BatchNorm1d: SampleBatchNorm1d,
    nn.BatchNorm2d: SampleBatchNorm2d,
    nn.BatchNorm3d: SampleBatchNorm3d,
}


def kl_divergence(model: nn.Module) -> Tensor:
    """The closed-form KL(q || p) of `model`: the sum over its outermost KL terms (layers, mixtures)."""

    def terms_of(m: nn.Module) -> list[Tensor]:
        return [m.kl()] if isinstance(m, KLTerm) else [t for c in m.children() for t in terms_of(c)]

    terms = terms_of(model)
    if not terms:
        raise UsageError("the model has no Bayesian layer: bayesianize it first")
    return torch.stack(terms).sum()
