"""`python -m hpcbnn.evaluate MCMC_DIR`: the predictive of an HMC posterior over a network's weights.

The draws of `python -m hpcbnn.mcmc --model bnn` (MCMC_DIR/draws.h5) are the samples of
the predictive: the network of the run is rebuilt, its weights conditioned on S draws
(all of them by default, else S evenly spaced over the chains), and the metrics are those
of `hpcbnn.parallel.evaluation`, as for a variational run: the same table, the same JSON
in MCMC_DIR/evaluation.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from hpcbnn.data import Loader, open_dataset
from hpcbnn.data.convert import default_dataset, default_ood_dataset
from hpcbnn.data.loader import ood_like
from hpcbnn.errors import UsageError
from hpcbnn.mcmc.models import bnn_network
from hpcbnn.mcmc.results import latents, load
from hpcbnn.parallel.evaluation import DrawsPredictor, evaluate_uncertainty
from hpcbnn.parallel.grid import ProcessGrid
from hpcbnn.uq.ood import SCORES

DRAWS = "draws.h5"
BATCH_PER_DATA_GROUP = 128


def posterior_draws(path: Path, samples: int | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The run's options and its draws per network variable, [S, *shape] float64 (chain-major)."""
    draws, names, _ = load(path)
    with h5py.File(path, "r") as f:
        attrs = {k: v.item() if isinstance(v, np.generic) else v for k, v in f.attrs.items()}
    if attrs.get("model") != "bnn":
        raise UsageError(f"{path}: draws of --model {attrs.get('model')}, not of a network (--model bnn)")
    flat = draws.reshape(-1, draws.shape[-1])
    if samples is not None:
        if not 1 <= samples <= len(flat):
            raise UsageError(f"--samples {samples}: {path} holds {len(flat)} draws; choose 1..{len(flat)}")
        flat = flat[np.linspace(0, len(flat) - 1, samples).round().astype(int)]
    return attrs, {
        name: torch.from_numpy(np.ascontiguousarray(flat[:, cols].reshape(len(flat), *shape)))
        for name, cols, shape in latents(names)
    }


def evaluate_draws(args: argparse.Namespace) -> int:
    """The evaluate command on an MCMC run directory (args as `hpcbnn.run.evaluate` parses them)."""
    run_dir: Path = args.run_dir
    attrs, draws = posterior_draws(run_dir / DRAWS, args.samples)
    samples = len(next(iter(draws.values())))
    grid = ProcessGrid(args.mode, args.sample_group, device="cpu")
    data = Path(attrs["data"])
    info = open_dataset(data, "train", comm=grid.world)
    batch = BATCH_PER_DATA_GROUP * grid.data_size
    loader = Loader(data, args.split, grid, batch, shuffle=False, drop_last=False)
    ood = _ood_loader(args.ood, args.ood_split, loader, grid, batch)
    net = bnn_network(info.input_shape, [int(w) for w in str(attrs["hidden"]).split(",")], _outputs(info))
    predictor = DrawsPredictor(net, draws, grid)
    metrics, ood_metrics = evaluate_uncertainty(predictor, loader, samples, info.task, ood=ood)
    if grid.is_root:
        if ood is not None and ood_metrics is not None:
            ood_metrics = {"file": str(ood.info.path), "split": args.ood_split, **ood_metrics}
        head = {"split": args.split, "samples": samples, "posterior": "hmc", "draws": str(run_dir / DRAWS)}
        (run_dir / "evaluation.json").write_text(json.dumps({**head, **metrics, "ood": ood_metrics}, indent=2) + "\n")
        shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        if "selective" in metrics:
            shown["aurc"] = metrics["selective"]["aurc"]
        if ood_metrics:
            shown.update({f"ood_{m}_{s}": ood_metrics[f"{m}_{s}"] for m in ("auroc", "fpr95") for s in SCORES})
        print(json.dumps({"split": args.split, "samples": samples, "posterior": "hmc", **shown}))
    return 0


def _outputs(info: Any) -> int:
    return int(info.num_classes) * (1 if info.task == "classification" else 2)


def _ood_loader(choice: str | None, split: str, like: Loader, grid: ProcessGrid, batch: int) -> Loader | None:
    """--ood FILE, none, or auto (default): the bundled rotated digits for a run on digits
    (10 classes of [1, 8, 8] inputs), else none."""
    choice = choice or "auto"
    if choice == "none" or like.info.task != "classification":
        return None
    if choice == "auto":
        if like.info.input_shape != (1, 8, 8) or like.info.num_classes != 10:
            return None
        default_dataset(grid.world)  # converts the bundled digits and their rotated copy on first use
        path = default_ood_dataset()
    else:
        path = Path(choice)
    return ood_like(choice, like, lambda: Loader(path, split, grid, batch, shuffle=False, drop_last=False))
