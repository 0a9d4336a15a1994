"""Turn a standard torch.nn / torchvision model into its Bayesian version, in place.

Linear, Conv1d, Conv2d and MultiheadAttention layers become mean-field Gaussian layers
whose posterior means are the layer's current weights (so a pretrained network becomes a
Bayesian one centred on it), and every BatchNorm keeps its statistics per sample. With
`components=K` the posterior is a uniform mixture of K such networks (`hpcbnn.bnn.mixture`),
each starting from its own draw of the prior: off the data, the components disagree as far
apart as they started (docs/uq.md, round 6).

    model = bayesianize(mlp(64, [128, 128], 10), components=8)  # weight means ~ N(0, prior^2)
    model = bayesianize(pretrained, components=8, means="module")  # component 0 keeps its weights
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, Union

from torch import nn

from hpcbnn.bnn.layers import (
    FAN_IN,
    MEAN_INITS,
    SAMPLE_BATCH_NORM,
    BayesianConv1d,
    BayesianConv2d,
    BayesianLinear,
    BayesianModule,
    BayesianMultiheadAttention,
    MeanInit,
    Scale,
)
from hpcbnn.bnn.mixture import Mixture
from hpcbnn.bnn.noise import assign_noise_keys
from hpcbnn.errors import UsageError

CONVERSIONS: dict[type[nn.Module], Any] = {
    nn.MultiheadAttention: BayesianMultiheadAttention,
    nn.Linear: BayesianLinear,
    nn.Conv1d: BayesianConv1d,
    nn.Conv2d: BayesianConv2d,
}

Selection = Union[str, int, Callable[[str, nn.Module], bool]]


def _conversion(module: nn.Module) -> Any:
    for kind, bayesian in CONVERSIONS.items():
        if isinstance(module, kind):
            return bayesian
    return None


def candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers that can become Bayesian, in module order (a MultiheadAttention counts as one)."""
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        inside_attention = any(name.startswith(f"{n}.") for n, m in found if isinstance(m, nn.MultiheadAttention))
        if _conversion(module) is not None and not inside_attention:
            found.append((name, module))
    return found


def _select(found: list[tuple[str, nn.Module]], layers: Selection) -> list[tuple[str, nn.Module]]:
    if layers == "all":
        return found
    if isinstance(layers, int) and not isinstance(layers, bool):
        if not 1 <= layers <= len(found):
            raise UsageError(
                f"bayesian layers {layers}: the model has {len(found)} Bayesian-capable layers; "
                f"choose 1..{len(found)} or 'all'"
            )
        return found[-layers:]
    if callable(layers):
        return [(n, m) for n, m in found if layers(n, m)]
    raise UsageError(f"bayesian layers {layers!r}: give 'all', a number of last layers, or a predicate")


def bayesianize(
    model: nn.Module,
    *,
    layers: Selection = "all",
    prior_scale: Scale = FAN_IN,
    init_std: Scale = FAN_IN,
    estimator: str = "reparam",
    components: int = 1,
    means: MeanInit | None = None,
) -> nn.Module:
    """Make the selected layers of `model` Bayesian and return the model.

    `layers`: "all", n (the last n Bayesian-capable layers, nearest the output), or a
    predicate `f(qualified_name, module) -> bool`. `prior_scale`, `init_std`: numbers, or
    "fan_in" to scale each layer's prior and initial sigma with its fan-in (see
    `hpcbnn.bnn.layers`). Returns a new object only when `model` itself is a single
    convertible layer, or with `components` > 1: then a `Mixture` whose first component
    is `model` and whose others are copies with freshly initialised means.

    `means`: "prior" draws every weight mean from its layer's prior (the default with
    `components` > 1, which spreads the components apart); "module" keeps `model`'s weights
    (the default for a single network, and what a pretrained mixture wants), the copies
    taking torch's initialisation. Both draw from torch's global RNG, in module order.
    """
    if components < 1:
        raise UsageError(f"components {components}: a posterior has at least 1 component")
    means = resolve_means(means, components)
    kw = {"prior_scale": prior_scale, "init_std": init_std, "estimator": estimator}
    if components == 1:
        return draw_prior_means(_convert(model, layers, kw), means)
    copies = [copy.deepcopy(model) for _ in range(components - 1)]
    for c in copies:
        for m in c.modules():
            reset = getattr(m, "reset_parameters", None) or getattr(m, "_reset_parameters", None)
            if callable(reset):
                reset()
    mixture = Mixture([_convert(m, layers, kw) for m in (model, *copies)])
    assign_noise_keys(mixture)
    return draw_prior_means(mixture, means)


def resolve_means(means: MeanInit | None, components: int) -> MeanInit:
    """`means`, or its default: draws of the prior for a mixture, the network's own weights for one component."""
    resolved = means or ("prior" if components > 1 else "module")
    if resolved not in MEAN_INITS:
        raise UsageError(f"means {resolved!r}: choose one of {', '.join(MEAN_INITS)}")
    return resolved


def draw_prior_means(model: nn.Module, means: MeanInit = "prior") -> nn.Module:
    """With means="prior", every Bayesian layer's weight means drawn from its prior, in module order."""
    if means == "prior":
        for m in model.modules():
            if isinstance(m, BayesianModule):
                m.draw_means()
    return model


def _convert(model: nn.Module, layers: Selection, kw: dict[str, Any]) -> nn.Module:
    chosen = _select(candidates(model), layers)
    if not chosen:
        raise UsageError("bayesianize: no layer selected; check the layers= option")
    for name, module in chosen:
        bayesian = _conversion(module).from_module(module, **kw)
        if not name:
            model = bayesian
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, bayesian)
    for module in model.modules():
        if type(module) in SAMPLE_BATCH_NORM:
            module.__class__ = SAMPLE_BATCH_NORM[type(module)]
    assign_noise_keys(model)
    return model
