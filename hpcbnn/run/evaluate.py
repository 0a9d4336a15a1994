"""`python -m hpcbnn.evaluate RUN_DIR [--ood FILE.h5]`: evaluate a run's latest checkpoint again, on any grid.

The metrics come from `hpcbnn.parallel.evaluation`; this module is the command line. It
writes RUN_DIR/evaluation.json: the split's metrics, selective prediction and, with an OOD
set (by default the run's --ood), AUROC and FPR at 95% TPR by each uncertainty score.
An MCMC run directory (draws.h5 of `python -m hpcbnn.mcmc --model bnn`) is evaluated by
`hpcbnn.mcmc.evaluate`: its draws are the predictive's samples.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hpcbnn.data import open_dataset
from hpcbnn.errors import UsageError, entry_point
from hpcbnn.parallel.collectives import BACKENDS
from hpcbnn.parallel.engine import Engine
from hpcbnn.parallel.evaluation import evaluate_uncertainty
from hpcbnn.parallel.grid import MODES
from hpcbnn.run.checkpoint import latest_checkpoint, load_checkpoint, model_fingerprint, write_atomically
from hpcbnn.run.config import load_config
from hpcbnn.run.job import Job
from hpcbnn.uq.ood import SCORES


@entry_point("hpcbnn.evaluate")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hpcbnn.evaluate",
        description=(
            "Evaluate a run's latest checkpoint on the test split with the full S-sample predictive "
            "(under mpirun with any grid, or in one process); writes RUN_DIR/evaluation.json."
        ),
    )
    parser.add_argument(
        "run_dir", type=Path, help="a run directory written by hpcbnn.train, or by hpcbnn.mcmc --model bnn"
    )
    parser.add_argument("--samples", type=int, help="predictive samples (default: the run's eval_samples)")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    parser.add_argument(
        "--ood",
        help="out-of-distribution inputs: an hpcbnn HDF5 file, auto (the bundled digits rotated, for a run "
        "on them) or none (default: the run's --ood)",
    )
    parser.add_argument("--ood_split", default="test", choices=("train", "val", "test"), help="split of --ood")
    parser.add_argument(
        "--mode",
        choices=MODES,
        default="sample",
        help="grid of this evaluation, independent of the training grid (default: sample)",
    )
    parser.add_argument("--sample_group", type=int, help="hybrid: K ranks per sample group")
    parser.add_argument("--backend", choices=BACKENDS, help="collectives (default: the run's)")
    args = parser.parse_args(argv)
    if (args.run_dir / "draws.h5").is_file():
        from hpcbnn.mcmc.evaluate import evaluate_draws

        return evaluate_draws(args)
    cfg = load_config(args.run_dir / "config.yaml")
    samples = args.samples or cfg.eval_samples or cfg.samples
    job = Job.start(cfg, [samples], mode=args.mode, sample_group=args.sample_group, backend=args.backend)
    info = open_dataset(job.data, "train")
    loader = job.loader(args.split)
    ood = job.ood_loader(loader, args.ood, args.ood_split)
    model = job.network(info)
    path = latest_checkpoint(args.run_dir)
    if path is None:
        raise UsageError(f"{args.run_dir} has no checkpoint to evaluate (checkpoints/ is empty)")
    state = load_checkpoint(path, model_fingerprint(model), map_location=job.grid.device)
    model.load_state_dict(state["model"])
    engine = Engine(
        model,
        None,
        job.grid,
        job.comm,
        samples=samples,
        batch_size=cfg.batch_size,
        n_train=info.n,
        seed=cfg.seed,
        sample_chunk=cfg.sample_chunk,
    )
    metrics, ood_metrics = evaluate_uncertainty(engine, loader, samples, info.task, cfg.ece_bins, ood)
    if job.grid.is_root:
        if ood is not None and ood_metrics is not None:
            ood_metrics = {"file": str(ood.info.path), "split": args.ood_split, **ood_metrics}
        head = {"split": args.split, "samples": samples, "step": state["step"]}
        write_atomically(
            args.run_dir / "evaluation.json",
            (json.dumps({**head, **metrics, "ood": ood_metrics}, indent=2) + "\n").encode(),
        )
        shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        if "selective" in metrics:
            shown["aurc"] = metrics["selective"]["aurc"]
        if ood_metrics:
            shown.update({f"ood_{m}_{s}": ood_metrics[f"{m}_{s}"] for m in ("auroc", "fpr95") for s in SCORES})
            shown.update({f"ood_{k}": ood_metrics[k] for k in ("mi_in", "mi_out")})
        print(json.dumps({"split": args.split, "samples": samples, **shown}))
    return 0
