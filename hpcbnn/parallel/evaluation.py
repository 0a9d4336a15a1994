"""Metrics of the full S-sample predictive over a whole split, on any grid.

Each data group predicts its rows with all S samples (gathered over its sample
communicator), turns them into additive statistics, and those are summed over the data
communicator: the reported metrics are those of the Bayesian model average over every
example, not an average of per-rank metrics.

    metrics = evaluate(engine, Loader(path, "test", grid, ...), samples=32, task="classification")
"""

from __future__ import annotations

from typing import Any

import torch

from hpcbnn.bnn.objectives import gaussian_params
from hpcbnn.data import DatasetInfo, Loader
from hpcbnn.parallel.engine import Engine
from hpcbnn.uq.metrics import (
    Sums,
    allreduce_sums,
    classification_sums,
    finalize_classification,
    finalize_regression,
    regression_sums,
)


@torch.no_grad()
def evaluate(engine: Engine, loader: Loader, samples: int, task: str, bins: int = 15) -> dict[str, Any]:
    """Metrics of the `samples`-sample predictive on every example of `loader`'s split."""
    engine.model.eval()
    totals: Sums | None = None
    for batch in loader.epoch(0):
        out = engine.predict(batch.x.to(engine.grid.device), batch.rows, loader.batch_size, samples)
        keep = batch.valid.to(out.device)  # the fill-up rows of a last batch are not counted
        out, y = out[:, keep], batch.y.to(out.device)[keep]
        if task == "classification":
            sums = classification_sums(out.softmax(-1), y, bins)
        else:
            sums = regression_sums(*original_units(*gaussian_params(out), y, loader.info))
        totals = sums if totals is None else {k: totals[k] + sums[k] for k in totals}
    engine.model.train()
    assert totals is not None, "a validated split has at least one batch"
    totals = allreduce_sums(totals, engine.grid.data_comm)
    return finalize_classification(totals) if task == "classification" else finalize_regression(totals)


def original_units(
    mean: torch.Tensor, std: torch.Tensor, y: torch.Tensor, info: DatasetInfo
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Undo the training split's target normalisation, so RMSE and CRPS are in the data's units."""
    shift, scale = (
        torch.as_tensor(v, dtype=mean.dtype, device=mean.device) for v in (info.target_mean, info.target_std)
    )
    y = y.reshape(mean.shape[1:]).to(mean.dtype)
    return mean * scale + shift, std * scale, y * scale + shift
