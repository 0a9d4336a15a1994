"""`python -m hpcbnn.evaluate RUN_DIR`: evaluate a run's latest checkpoint again, on any grid.

The metrics come from `hpcbnn.parallel.evaluation`; this module is the command line and
the run's summary (summary.json and its calibration picture).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from hpcbnn.data import open_dataset
from hpcbnn.errors import UsageError, entry_point
from hpcbnn.parallel.collectives import BACKENDS
from hpcbnn.parallel.engine import Engine
from hpcbnn.parallel.evaluation import evaluate
from hpcbnn.parallel.grid import MODES
from hpcbnn.run.checkpoint import latest_checkpoint, load_checkpoint, model_fingerprint
from hpcbnn.run.config import load_config
from hpcbnn.run.job import Job
from hpcbnn.run.plots import regression_calibration, reliability_diagram
from hpcbnn.run.rundir import RunDir


def plot_and_summarise(run: RunDir, metrics: dict[str, Any], task: str, extra: dict[str, Any]) -> dict[str, Any]:
    """Write summary.json and the calibration picture; return the summary."""
    if task == "classification":
        plot = "reliability.png"
        headline = f"accuracy {metrics['accuracy']:.4f}, NLL {metrics['nll']:.4f}, ECE {metrics['ece']:.4f}"
    else:
        plot = "calibration.png"
        headline = f"RMSE {metrics['rmse']:.4f}, NLL {metrics['nll']:.4f}, CRPS {metrics['crps']:.4f}"
    if run.grid.is_root:
        if task == "classification":
            reliability_diagram(metrics["reliability"], run.path / plot)
        else:
            regression_calibration(metrics["calibration"], run.path / plot)
    summary = {"test": metrics, "headline": headline, "plot": plot, **extra}
    run.write_json("summary.json", summary)
    return summary


@entry_point("hpcbnn.evaluate")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hpcbnn.evaluate",
        description=(
            "Evaluate a run's latest checkpoint on the test split with the full S-sample predictive "
            "(under mpirun with any grid, or in one process); writes RUN_DIR/evaluation.json."
        ),
    )
    parser.add_argument("run_dir", type=Path, help="a run directory written by hpcbnn.train")
    parser.add_argument("--samples", type=int, help="predictive samples (default: the run's eval_samples)")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    parser.add_argument(
        "--mode",
        choices=MODES,
        default="sample",
        help="grid of this evaluation, independent of the training grid (default: sample)",
    )
    parser.add_argument("--sample_group", type=int, help="hybrid: K ranks per sample group")
    parser.add_argument("--backend", choices=BACKENDS, help="collectives (default: the run's)")
    args = parser.parse_args(argv)
    cfg = load_config(args.run_dir / "config.yaml")
    samples = args.samples or cfg.eval_samples or cfg.samples
    job = Job.start(cfg, [samples], mode=args.mode, sample_group=args.sample_group, backend=args.backend)
    info = open_dataset(job.data, "train")
    model = job.network(info)
    path = latest_checkpoint(args.run_dir)
    if path is None:
        raise UsageError(f"{args.run_dir} has no checkpoint to evaluate (checkpoints/ is empty)")
    state = load_checkpoint(path, model_fingerprint(model), map_location=job.grid.device)
    model.load_state_dict(state["model"])
    engine = Engine(
        model, None, job.grid, job.comm, samples=samples, batch_size=cfg.batch_size, n_train=info.n, seed=cfg.seed
    )
    metrics = evaluate(engine, job.loader(args.split), samples, info.task, cfg.ece_bins)
    if job.grid.is_root:
        (args.run_dir / "evaluation.json").write_text(
            json.dumps({"split": args.split, "samples": samples, "step": state["step"], **metrics}, indent=2) + "\n"
        )
        shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        print(json.dumps({"split": args.split, "samples": samples, **shown}))
    return 0
