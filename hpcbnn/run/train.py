"""`mpirun -np N python -m hpcbnn.train [--config run.yaml] [--key value ...]`

data -> Bayesian model -> objective -> gradient reduction over the grid -> optimizer,
with evaluation of the full S-sample predictive, checkpoints and a run directory.
Exit codes: 0 done, 1 failure, 2 usage error, 75 checkpointed on SIGTERM/SIGUSR1 (requeue).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from mpi4py import MPI

from hpcbnn.bnn.layers import kl_divergence
from hpcbnn.data import augmentation, open_dataset
from hpcbnn.errors import EXIT_REQUEUE, UsageError, entry_point
from hpcbnn.optim import make_optimizer, make_schedule
from hpcbnn.parallel.engine import Engine, StepResult
from hpcbnn.parallel.evaluation import evaluate, evaluate_uncertainty
from hpcbnn.run import plots
from hpcbnn.run.config import parse_config
from hpcbnn.run.job import Job
from hpcbnn.run.progress import Progress
from hpcbnn.run.rundir import RunDir, rng_state, set_rng_state
from hpcbnn.run.signals import StopRequest
from hpcbnn.uq.posterior import sigma_quantiles


@dataclass
class EpochTotals:
    """Sums over an epoch's steps of what metrics.jsonl reports per epoch."""

    loss: float = 0.0
    nll: float = 0.0
    kl: float = 0.0
    compute_s: float = 0.0
    comm_s: float = 0.0
    data_s: float = 0.0
    steps: int = 0

    def add(self, loss: float, result: StepResult, data_s: float) -> None:
        self.loss, self.nll, self.kl = self.loss + loss, self.nll + result.nll, self.kl + result.kl
        self.compute_s, self.comm_s = self.compute_s + result.compute_s, self.comm_s + result.comm_s
        self.data_s, self.steps = self.data_s + data_s, self.steps + 1


@entry_point("hpcbnn.train")
def main(argv: list[str] | None = None) -> int:
    # The grid, the data and the network, in the order that fails before any slow work.
    cfg = parse_config(argv)
    eval_samples = cfg.eval_samples or cfg.samples
    job = Job.start(cfg, [cfg.samples, eval_samples])
    grid = job.grid
    train = job.loader("train")
    info = train.info
    val = job.loader("val")
    open_dataset(job.data, "test", comm=grid.world)  # a bad test split fails now, not after the last epoch
    ood = job.ood_loader(train)
    total = min(cfg.max_steps or sys.maxsize, cfg.epochs * len(train))
    model = job.network(info)
    optimizer = make_optimizer(
        model,
        cfg.optimizer,
        cfg.lr,
        weight_decay=cfg.weight_decay,
        momentum=cfg.momentum,
        rho_lr_scale=cfg.rho_lr_scale,
    )
    schedule = make_schedule(optimizer, total, len(train), warmup_epochs=cfg.warmup_epochs, schedule=cfg.schedule)
    engine = Engine(
        model,
        optimizer,
        grid,
        job.comm,
        samples=cfg.samples,
        batch_size=cfg.batch_size,
        n_train=info.n,
        seed=cfg.seed,
        objective=cfg.objective,
        likelihood="categorical" if info.task == "classification" else "gaussian",
        kl_weight=cfg.kl_weight,
        augment=augmentation(cfg.augment),
        augment_mode=cfg.augment_mode,
        hierarchical=cfg.reduction == "hierarchical",
        clip_grad=cfg.clip_grad,
        amp=cfg.amp,
    )

    # Resume from the run directory's latest checkpoint, before the configuration is recorded.
    run = RunDir(cfg, grid)
    step, epoch, skip = 0, 0, 0
    state = run.load_latest(model) if cfg.resume else None
    if state:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        set_rng_state(state["rng"])
        step, epoch, skip = state["step"], state["epoch"], state["batch"]
    run.write_config()

    def checkpoint(epoch: int, batch: int) -> None:
        engine.sync_buffers()
        run.save(
            step,
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(),
                "rng": rng_state(),
                "step": step,
                "epoch": epoch,
                "batch": batch,
            },
        )

    stop = StopRequest()
    progress = Progress(total, grid.is_root, cfg.log_every)
    progress.message(
        f"hpcbnn.train: {grid.describe()}, backend {cfg.backend}; S={cfg.samples} "
        f"({len(engine.local)} per rank), B={cfg.batch_size} ({cfg.batch_size // grid.data_size} "
        f"per data group); {info.n} training examples from {job.data}; run directory {run.path}"
    )
    if state:
        progress.message(
            f"hpcbnn.train: resumed from the checkpoint of step {step} (epoch {epoch + 1}, after {skip} batches)"
        )
    while epoch < cfg.epochs and step < total:
        totals, began, batches = EpochTotals(), time.perf_counter(), iter(train.epoch(epoch))
        for i in range(len(train)):
            # The loader's order is a function of (seed, epoch): a resumed epoch skips what it already did.
            waited = time.perf_counter()
            batch = next(batches)
            if i < skip:
                continue
            waited = time.perf_counter() - waited
            result = engine.step(batch.x.to(grid.device), batch.y.to(grid.device), batch.rows, step)
            schedule.step()
            step += 1
            # One collective agrees on the global loss and on whether any rank was asked to stop.
            agreed = np.array([result.loss, float(stop.requested)])
            grid.world.Allreduce(MPI.IN_PLACE, agreed)
            loss, stopping = agreed[0] / grid.size, agreed[1] > 0
            if not math.isfinite(loss):
                raise UsageError(
                    f"the loss is {loss} at step {step} (epoch {epoch + 1}): lower --lr, set "
                    f"--clip_grad, or check the data for extreme values"
                )
            totals.add(loss, result, waited)
            progress.update(step, epoch, loss)
            if stopping:
                checkpoint(epoch, i + 1)
                progress.message(
                    f"hpcbnn.train: stop signal: checkpoint at step {step} written to "
                    f"{run.path}; exiting with {EXIT_REQUEUE} (requeue to continue with --resume true)"
                )
                return EXIT_REQUEUE
            if step >= total:
                break
        # Validate the S-sample predictive, log the epoch, checkpoint.
        skip, seconds, n = 0, time.perf_counter() - began, max(1, totals.steps)
        epoch += 1
        val_metrics = evaluate(engine, val, eval_samples, info.task, cfg.ece_bins)
        run.log(
            {
                "epoch": epoch,
                "step": step,
                "loss": totals.loss / n,
                "nll": totals.nll / n,
                "kl": totals.kl / n,
                "kl_per_n": totals.kl / n / info.n,
                "lr": schedule.get_last_lr()[0],
                "seconds": seconds,
                "examples_per_s": n * cfg.batch_size / seconds,
                "sample_evals_per_s": n * cfg.batch_size * cfg.samples / seconds,
                "time_compute": totals.compute_s,
                "time_comm": totals.comm_s,
                "time_data": totals.data_s,
                "val": {k: v for k, v in val_metrics.items() if not isinstance(v, (dict, list))},
                "sigma": sigma_quantiles(model) if grid.is_root else {},
            }
        )
        if epoch % cfg.checkpoint_every == 0 or epoch == cfg.epochs or step >= total:
            checkpoint(epoch, 0)

    # The final model on the test split, with the full predictive; OOD detection; pictures.
    test = job.loader("test", verify=False)
    metrics, ood_metrics = evaluate_uncertainty(engine, test, eval_samples, info.task, cfg.ece_bins, ood)
    posterior = {"sigma": sigma_quantiles(model), "kl_per_n": kl_divergence(model).item() / info.n}
    summary = summarise(run, metrics, ood_metrics, posterior, info.task, {"steps": step, "epochs": epoch})
    progress.message(
        f"hpcbnn.train: done. Test {summary['headline']}. Results in {run.path} "
        f"(summary.json, metrics.jsonl, {', '.join(summary['plots'])}, checkpoints/)"
    )
    return 0


def summarise(
    run: RunDir,
    metrics: dict[str, Any],
    ood: dict[str, Any] | None,
    posterior: dict[str, Any],
    task: str,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """Write summary.json and the pictures (rank 0); return the summary with its headline."""
    if task == "classification":
        headline = f"accuracy {metrics['accuracy']:.4f}, NLL {metrics['nll']:.4f}, ECE {metrics['ece']:.4f}"
        if ood:
            headline += (
                f"; mutual information {ood['mi_in']:.3g} in vs {ood['mi_out']:.3g} on OOD inputs "
                f"(MI-AUROC {ood['auroc_mi']:.3f})"
            )
        names = ["reliability.png", "uncertainty.png"]
    else:
        headline = f"RMSE {metrics['rmse']:.4f}, NLL {metrics['nll']:.4f}, CRPS {metrics['crps']:.4f}"
        names = ["calibration.png"]
    summary = {"test": metrics, "ood": ood, "posterior": posterior, "headline": headline, **extra}
    summary["plots"] = [*names, "curves.png"]
    run.write_json("summary.json", summary)
    if run.grid.is_root:
        plots.draw_run(run.path)
    return summary
