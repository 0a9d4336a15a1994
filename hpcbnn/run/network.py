"""The configured network for a data set: architecture, pretrained means, Bayesian layers."""

from __future__ import annotations

import pickle
from collections.abc import Mapping

import torch
from torch import nn

from hpcbnn.bnn.bayesianize import bayesianize
from hpcbnn.bnn.mixture import check_samples
from hpcbnn.bnn.models import build_model
from hpcbnn.data import DatasetInfo
from hpcbnn.errors import UsageError
from hpcbnn.run.config import Config


def build_network(cfg: Config, info: DatasetInfo) -> nn.Module:
    """Classification: one logit per class; regression: a Gaussian mean and scale per target."""
    components = cfg.components or cfg.samples
    check_samples(cfg.samples, components, "--samples")
    check_samples(cfg.eval_samples or cfg.samples, components, "--eval_samples")
    outputs = info.num_classes if info.task == "classification" else 2 * info.num_classes
    model = build_model(cfg.model, info.input_shape, outputs, hidden=cfg.hidden)
    if cfg.pretrained:
        load_pretrained(model, cfg.pretrained, cfg.model)
    model = bayesianize(
        model,
        layers=cfg.bayesian_layers,
        prior_scale=cfg.prior_scale,
        init_std=cfg.init_std,
        estimator=cfg.estimator,
        components=components,
        means=cfg.means or ("module" if cfg.pretrained else None),
    )
    return model.to(getattr(torch, cfg.dtype))


def load_pretrained(model: nn.Module, path: str, name: str) -> None:
    """`path`'s state_dict into `model`; a missing, foreign or mismatched file is one UsageError line."""
    try:
        weights = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as exc:
        raise UsageError(f"--pretrained {path}: cannot read it ({exc.strerror})") from None
    except Exception as exc:  # not a torch.save file, truncated, or a pickle of more than tensors
        first = (
            "not a torch file, or a pickle of more than tensors, which weights-only loading refuses"
            if isinstance(exc, pickle.UnpicklingError)
            else (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
        )
        raise UsageError(
            f"--pretrained {path}: not a state_dict saved with torch.save ({first}); save the "
            f"deterministic model's weights with torch.save(model.state_dict(), PATH)"
        ) from None
    if not isinstance(weights, Mapping):
        raise UsageError(f"--pretrained {path}: holds a {type(weights).__name__}, not a state_dict")
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        detail = " ".join(line.strip() for line in str(exc).strip().splitlines()[:2])[:200]
        raise UsageError(f"--pretrained {path}: cannot load it into --model {name}: {detail}") from None
