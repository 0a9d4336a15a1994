"""Evaluation of the full S-sample predictive; also `python -m hpcbnn.evaluate RUN_DIR`.

Each data group predicts its rows with all S samples (gathered over its sample
communicator), turns them into additive statistics, and those are summed over the data
communicator: the reported metrics are those of the Bayesian model average over every
test example, not an average of per-rank metrics.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from hpcbnn.checkpoint import latest_checkpoint, load_checkpoint, model_fingerprint
from hpcbnn.collectives import BACKENDS, make_collectives
from hpcbnn.config import load_config
from hpcbnn.data import DatasetInfo, Loader, default_dataset, open_dataset
from hpcbnn.engine import Engine
from hpcbnn.errors import UsageError, entry_point
from hpcbnn.grid import MODES, ProcessGrid
from hpcbnn.metrics import (Sums, allreduce_sums, classification_sums, finalize_classification,
                            finalize_regression, regression_sums)
from hpcbnn.objectives import gaussian_params
from hpcbnn.network import build_network
from hpcbnn.plots import regression_calibration, reliability_diagram


@torch.no_grad()
def evaluate(engine: Engine, loader: Any, samples: int, task: str, bins: int) -> dict[str, Any]:
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


def original_units(mean: torch.Tensor, std: torch.Tensor, y: torch.Tensor,
                   info: DatasetInfo) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Undo the training split's target normalisation, so RMSE and CRPS are in the data's units."""
    shift, scale = (torch.as_tensor(v, dtype=mean.dtype, device=mean.device)
                    for v in (info.target_mean, info.target_std))
    y = y.reshape(mean.shape[1:]).to(mean.dtype)
    return mean * scale + shift, std * scale, y * scale + shift


def plot_and_summarise(run: Any, metrics: dict[str, Any], task: str, extra: dict[str, Any]) -> dict[str, Any]:
    """Write summary.json and the calibration picture; return the summary."""
    if task == "classification":
        plot = "reliability.png"
        headline = f"accuracy {metrics['accuracy']:.4f}, NLL {metrics['nll']:.4f}, ECE {metrics['ece']:.4f}"
        draw = lambda: reliability_diagram(metrics["reliability"], run.path / plot)  # noqa: E731
    else:
        plot = "calibration.png"
        headline = f"RMSE {metrics['rmse']:.4f}, NLL {metrics['nll']:.4f}, CRPS {metrics['crps']:.4f}"
        draw = lambda: regression_calibration(metrics["calibration"], run.path / plot)  # noqa: E731
    if run.grid.is_root:
        draw()
    summary = {"test": metrics, "headline": headline, "plot": plot, **extra}
    run.write_json("summary.json", summary)
    return summary


@entry_point("hpcbnn.evaluate")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hpcbnn.evaluate", description=(
        "Evaluate a run's latest checkpoint on the test split with the full S-sample predictive "
        "(under mpirun with any grid, or in one process); writes RUN_DIR/evaluation.json."))
    parser.add_argument("run_dir", type=Path, help="a run directory written by hpcbnn.train")
    parser.add_argument("--samples", type=int, help="predictive samples (default: the run's eval_samples)")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    parser.add_argument("--mode", choices=MODES, default="sample",
                        help="grid of this evaluation, independent of the training grid (default: sample)")
    parser.add_argument("--sample_group", type=int, help="hybrid: K ranks per sample group")
    parser.add_argument("--backend", choices=BACKENDS, help="collectives (default: the run's)")
    args = parser.parse_args(argv)
    cfg = load_config(args.run_dir / "config.yaml")
    grid = ProcessGrid(args.mode, args.sample_group, device=cfg.device)
    samples = args.samples or cfg.eval_samples or cfg.samples
    grid.check(samples, cfg.batch_size)
    comm = make_collectives(grid, args.backend or cfg.backend)
    data = Path(cfg.data) if cfg.data else default_dataset(grid.world)
    info = open_dataset(data, "train")
    model = build_network(cfg, info).to(grid.device)
    path = latest_checkpoint(args.run_dir)
    if path is None:
        raise UsageError(f"{args.run_dir} has no checkpoint to evaluate (checkpoints/ is empty)")
    state = load_checkpoint(path, model_fingerprint(model), map_location=grid.device)
    model.load_state_dict(state["model"])
    engine = Engine(model, torch.optim.SGD(model.parameters(), lr=0.0), grid, comm, samples=samples,
                    batch_size=cfg.batch_size, n_train=info.n, seed=cfg.seed)
    loader = Loader(data, args.split, grid, batch_size=cfg.batch_size, seed=cfg.seed, shuffle=False,
                    drop_last=False)
    metrics = evaluate(engine, loader, samples, info.task, cfg.ece_bins)
    if grid.is_root:
        (args.run_dir / "evaluation.json").write_text(json.dumps(
            {"split": args.split, "samples": samples, "step": state["step"], **metrics}, indent=2) + "\n")
        shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        print(json.dumps({"split": args.split, "samples": samples, **shown}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
