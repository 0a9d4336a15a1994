"""The configured network for a data set: architecture, pretrained means, Bayesian layers."""

from __future__ import annotations

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
    check_samples(cfg.samples, cfg.components, "--samples")
    check_samples(cfg.eval_samples or cfg.samples, cfg.components, "--eval_samples")
    outputs = info.num_classes if info.task == "classification" else 2 * info.num_classes
    model = build_model(cfg.model, info.input_shape, outputs, hidden=cfg.hidden)
    if cfg.pretrained:
        try:
            model.load_state_dict(torch.load(cfg.pretrained, map_location="cpu", weights_only=True))
        except (OSError, RuntimeError) as exc:
            first = str(exc).strip().splitlines()[0]
            raise UsageError(
                f"--pretrained {cfg.pretrained}: cannot load it into --model {cfg.model}: {first}"
            ) from None
    model = bayesianize(
        model,
        layers=cfg.bayesian_layers,
        prior_scale=cfg.prior_scale,
        init_std=cfg.init_std,
        estimator=cfg.estimator,
        components=cfg.components,
    )
    return model.to(getattr(torch, cfg.dtype))
