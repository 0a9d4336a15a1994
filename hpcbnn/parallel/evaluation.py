"""Metrics of the full S-sample predictive over a whole split, on any grid.

Each data group predicts its rows with all S samples (gathered over its sample
communicator), turns them into additive statistics, and those are summed over the data
communicator: the reported metrics are those of the Bayesian model average over every
example, not an average of per-rank metrics. Ranking metrics (OOD detection, selective
prediction) gather the per-example scores over the data communicator instead, so they
are exact too.

    metrics = evaluate(engine, Loader(path, "test", grid, ...), samples=32, task="classification")
    metrics, ood = evaluate_uncertainty(engine, test_loader, 32, "classification", ood=ood_loader)

The predictor is an `Engine` (the variational posterior's S weight samples) or a
`DrawsPredictor`, whose samples are given weights, e.g. the draws of an MCMC posterior:

    hmc = DrawsPredictor(net, {"1.weight": w [S, 50, 64], ...}, grid)
    metrics, ood = evaluate_uncertainty(hmc, test_loader, S, "classification", ood=ood_loader)
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from hpcbnn.bnn.noise import sampling
from hpcbnn.bnn.objectives import gaussian_params
from hpcbnn.data import DatasetInfo, Loader
from hpcbnn.errors import UsageError
from hpcbnn.parallel.grid import ProcessGrid
from hpcbnn.ppl.tracing import condition
from hpcbnn.uq.metrics import (
    Sums,
    allreduce_sums,
    classification_sums,
    finalize_classification,
    finalize_regression,
    regression_sums,
)
from hpcbnn.uq.ood import gather, ood_detection, risk_coverage, uncertainty_scores


class Predictor(Protocol):
    """What evaluation needs: the model (switched to eval mode), the grid, and the outputs
    of all S samples on this data group's rows (`Engine.predict`)."""

    model: nn.Module
    grid: ProcessGrid

    def predict(self, x: Tensor, rows: slice, global_batch: int, samples: int) -> Tensor: ...


class DrawsPredictor:
    """The predictive whose samples are given weights: `draws` maps each Bayesian layer's
    variable name (`1.weight`, ...) to S values [S, *shape], such as an HMC posterior's.

    Each rank of a sample group evaluates its share of the S samples (the grid's
    `local_samples`), conditioning the network's weights on them; the shares are joined
    over the sample communicator in sample order.
    """

    def __init__(self, model: nn.Module, draws: Mapping[str, Tensor], grid: ProcessGrid) -> None:
        sizes = {len(v) for v in draws.values()}
        if len(sizes) != 1:
            raise ValueError(f"every variable needs the same number of draws, not {sorted(sizes)}")
        self.model, self.draws, self.grid = model, dict(draws), grid
        self.size = sizes.pop()
        self.dtype = next(iter(draws.values())).dtype

    @torch.no_grad()
    def predict(self, x: Tensor, rows: slice, global_batch: int, samples: int) -> Tensor:
        """Outputs [samples, B_local, ...] of the first `samples` draws on this data group's rows."""
        if samples > self.size or samples % self.grid.sample_size:
            raise UsageError(
                f"--samples {samples}: the posterior has {self.size} draws and the K={self.grid.sample_size} "
                f"ranks of a sample group split them evenly; use at most {self.size}, a multiple of K"
            )
        local = self.grid.local_samples(samples)
        k, b = len(local), x.shape[0]
        values = {name: v[local.start : local.stop] for name, v in self.draws.items()}
        with sampling(0, 0, range(k), rows, global_batch), condition(**values):
            out = self.model(x.to(self.dtype).expand(k, *x.shape).reshape(k * b, *x.shape[1:]))
        out = out.view(k, b, *out.shape[1:])
        if self.grid.sample_size == 1:
            return out
        parts = self.grid.sample_comm.allgather(out.cpu().numpy())
        return torch.from_numpy(np.concatenate(parts)).to(out.device)


def evaluate(engine: Predictor, loader: Loader, samples: int, task: str, bins: int = 15) -> dict[str, Any]:
    """Metrics of the `samples`-sample predictive on every example of `loader`'s split."""
    return _evaluate(engine, loader, samples, task, bins, scores=False)[0]


def evaluate_uncertainty(
    engine: Predictor, loader: Loader, samples: int, task: str, bins: int = 15, ood: Loader | None = None
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """`evaluate`'s metrics plus, for classification, selective prediction (metrics["selective"]:
    risk-coverage curve and AURC), and OOD detection of `ood`'s examples against `loader`'s
    (`hpcbnn.uq.ood.ood_detection`; None without `ood`)."""
    metrics, inside = _evaluate(engine, loader, samples, task, bins, scores=task == "classification")
    if inside is None:
        if ood is not None:
            raise ValueError("OOD detection needs a classification model")
        return metrics, None
    metrics["selective"] = risk_coverage(inside["maxprob"], inside.pop("correct") > 0)
    if ood is None:
        return metrics, None
    local: dict[str, list[np.ndarray]] = {}
    for out, _ in _predictions(engine, ood, samples):
        for key, value in uncertainty_scores(out.softmax(-1)).items():
            local.setdefault(key, []).append(value)
    outside = gather({k: np.concatenate(v) for k, v in local.items()}, engine.grid.data_comm)
    return metrics, ood_detection(inside, outside)


def _evaluate(
    engine: Predictor, loader: Loader, samples: int, task: str, bins: int, scores: bool
) -> tuple[dict[str, Any], dict[str, np.ndarray] | None]:
    """The finalized metrics and, with `scores`, every example's uncertainty scores and
    correctness, gathered over the data communicator."""
    totals: Sums | None = None
    local: dict[str, list[np.ndarray]] = {}
    for out, y in _predictions(engine, loader, samples):
        if task == "classification":
            probs = out.softmax(-1)
            sums = classification_sums(probs, y, bins)
            if scores:
                for key, value in uncertainty_scores(probs).items():
                    local.setdefault(key, []).append(value)
                correct = probs.mean(0).argmax(-1) == y
                local.setdefault("correct", []).append(correct.to(torch.float64).cpu().numpy())
        else:
            sums = regression_sums(*original_units(*gaussian_params(out), y, loader.info))
        totals = sums if totals is None else {k: totals[k] + sums[k] for k in totals}
    assert totals is not None, "a validated split has at least one batch"
    totals = allreduce_sums(totals, engine.grid.data_comm)
    metrics = finalize_classification(totals) if task == "classification" else finalize_regression(totals)
    if not scores:
        return metrics, None
    return metrics, gather({k: np.concatenate(v) for k, v in local.items()}, engine.grid.data_comm)


@torch.no_grad()
def _predictions(engine: Predictor, loader: Loader, samples: int) -> Iterator[tuple[Tensor, Tensor]]:
    """The S-sample outputs [S, n, ...] and targets of this data group's rows, batch by batch,
    without the fill-up rows of a last batch (every example counts once)."""
    engine.model.eval()
    try:
        for batch in loader.epoch(0):
            out = engine.predict(batch.x.to(engine.grid.device), batch.rows, loader.batch_size, samples)
            keep = batch.valid.to(out.device)
            yield out[:, keep], batch.y.to(out.device)[keep]
    finally:
        engine.model.train()


def original_units(
    mean: torch.Tensor, std: torch.Tensor, y: torch.Tensor, info: DatasetInfo
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Undo the training split's target normalisation, so RMSE and CRPS are in the data's units."""
    shift, scale = (
        torch.as_tensor(v, dtype=mean.dtype, device=mean.device) for v in (info.target_mean, info.target_std)
    )
    y = y.reshape(mean.shape[1:]).to(mean.dtype)
    return mean * scale + shift, std * scale, y * scale + shift
