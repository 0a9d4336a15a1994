"""A uniform mixture of K mean-field posteriors over one network: global sample s uses component s mod K.

    model = bayesianize(mlp(64, [128, 128], 10), components=4)
    with sampling(seed=0, step=0, samples=range(8)):
        out = model(x.repeat(8, 1))  # samples 0 and 4 -> component 0, 1 and 5 -> component 1, ...
    kl_divergence(model)             # the mean of the components' KLs

One mean-field Gaussian sits in one mode of the posterior; a deep ensemble's members sit
in several, which is why its out-of-distribution disagreement beats a single BNN's. A
mixture gets both: components start from different means and each is trained by its own
ELBO. The objective is their mean, (1/K) sum_k ELBO_k, a lower bound of the mixture's
ELBO, since KL(mean_k q_k || p) <= mean_k KL(q_k || p). A step evaluates the same S
samples as a single posterior would (S/K per component), so it costs the same; the
parameters are K times as many.

The component of a sample depends on its global index only, so the sample-parallel grid
stays exact: a rank evaluates whichever components its samples belong to. S must be a
multiple of K for the components to weigh equally (checked). Outside a sampling context
the output is the mean of the components' outputs (each as a layer behaves there: one
draw in training mode, the posterior mean in eval mode).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from hpcbnn.bnn.layers import KLTerm, kl_divergence
from hpcbnn.bnn.noise import current, sampling
from hpcbnn.errors import UsageError


class Mixture(KLTerm):
    """K networks of one architecture as the components of a uniform mixture posterior."""

    def __init__(self, components: Sequence[nn.Module]) -> None:
        super().__init__()
        if len(components) < 2:
            raise UsageError("a mixture needs at least 2 components")
        self.components = nn.ModuleList(components)

    def kl(self) -> Tensor:
        return torch.stack([kl_divergence(c) for c in self.components]).mean()

    def forward(self, x: Tensor) -> Tensor:
        ctx = current()
        if ctx is None:
            return torch.stack([c(x) for c in self.components]).mean(0)
        k, n = len(ctx.samples), len(self.components)
        blocks = x.view(k, x.shape[0] // k, *x.shape[1:])
        shared = ctx.shared_rows(x) is not None  # then each component's blocks are copies of one batch too
        order: list[int] = []
        outs: list[Tensor] = []
        for c, component in enumerate(self.components):
            mine = [j for j, s in enumerate(ctx.samples) if s % n == c]
            if not mine:
                continue
            inputs = blocks[mine].reshape(-1, *x.shape[1:])
            samples = [ctx.samples[j] for j in mine]
            with sampling(ctx.seed, ctx.step, samples, ctx.batch, ctx.global_batch, inputs if shared else None):
                out = component(inputs)
            outs.append(out.view(len(mine), -1, *out.shape[1:]))
            order += mine
        out = torch.cat(outs) if len(outs) > 1 else outs[0]
        if order != sorted(order):
            out = out[torch.as_tensor(order).argsort()]
        return out.reshape(-1, *out.shape[2:])


def check_samples(samples: int, components: int, what: str = "samples") -> None:
    """Refuse a sample count that would weigh the components unequally."""
    if components > 1 and samples % components:
        raise UsageError(
            f"{what} {samples} is not a multiple of the {components} mixture components: "
            f"use a multiple of {components}, or fewer components (--components)"
        )


def num_components(model: nn.Module) -> int:
    """K of the mixture at the top of `model`, 1 for a single posterior."""
    return len(model.components) if isinstance(model, Mixture) else 1
