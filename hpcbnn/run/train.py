"""`mpirun -np N python -m hpcbnn.train [--config run.yaml] [--key value ...]`

data -> Bayesian model -> objective -> gradient reduction over the grid -> optimizer,
with evaluation of the full S-sample predictive, checkpoints and a run directory.
Exit codes: 0 done, 1 failure (also a collective that timed out), 2 usage error, 75 stopped
on SIGTERM/SIGUSR1 (requeue: the latest checkpoint continues the run).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

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
from hpcbnn.run.rundir import RunDir, resume_fingerprint, rng_state, set_rng_state
from hpcbnn.run.signals import Stopping, StopRequest
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
    seconds: float = 0.0  # of the epoch's steps before a resume, when it continues one

    def add(self, loss: float, result: StepResult, data_s: float) -> None:
        self.loss, self.nll, self.kl = self.loss + loss, self.nll + result.nll, self.kl + result.kl
        self.compute_s, self.comm_s = self.compute_s + result.compute_s, self.comm_s + result.comm_s
        self.data_s, self.steps = self.data_s + data_s, self.steps + 1


@entry_point("hpcbnn.train")
def main(argv: list[str] | None = None) -> int:
    stop = StopRequest()  # before any slow start-up work: a warning during it is kept, not fatal
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
        sample_chunk=cfg.sample_chunk,
    )

    # Resume from the run directory's newest valid checkpoint, before the configuration is recorded.
    run = RunDir(cfg, grid)
    fixed = resume_fingerprint(cfg, info)
    step, epoch, skip, resumed = 0, 0, 0, EpochTotals()
    state = run.load_latest(model, fixed) if cfg.resume else None
    if state:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        set_rng_state(state["rng"])
        step, epoch, skip = state["step"], state["epoch"], state["batch"]
        resumed = EpochTotals(**state.get("totals", {}))
    run.keep_epochs(epoch)  # epochs logged after the checkpoint are trained, and logged, again
    run.write_config()

    def checkpoint(epoch: int, batch: int, totals: EpochTotals) -> None:
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
                # Plain numbers (no numpy scalars), as torch.load(weights_only=True) reads them.
                "totals": {
                    k: float(v) if isinstance(v, float) else int(v) for k, v in dataclasses.asdict(totals).items()
                },
            },
            fixed,
        )

    def stop_checkpoint(epoch: int, batch: int, totals: EpochTotals, during: str) -> int:
        """Checkpoint where the stop request found the run and exit 75, also if that write fails."""
        try:
            checkpoint(epoch, batch, totals)
        except UsageError as exc:
            progress.message(
                f"hpcbnn.train: stop signal {during}: {exc}; the run continues from the previous checkpoint "
                f"on requeue; exiting with {EXIT_REQUEUE}"
            )
            return EXIT_REQUEUE
        progress.message(
            f"hpcbnn.train: stop signal {during}: checkpoint at step {step} written to "
            f"{run.path}; exiting with {EXIT_REQUEUE} (requeue to continue with --resume true)"
        )
        return EXIT_REQUEUE

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
    if stop.agreed(grid):  # a warning during the start-up: nothing new to checkpoint
        progress.message(
            f"hpcbnn.train: stop signal before training started: nothing new to checkpoint; exiting with "
            f"{EXIT_REQUEUE} (requeue to continue with --resume true)"
        )
        return EXIT_REQUEUE
    for loader in (val, ood):
        if loader is not None:
            loader.between_batches = lambda: stop.raise_if_agreed(grid)
    # A resume may find an epoch trained but not yet validated (skip == len(train)): it validates it.
    while epoch < cfg.epochs and (step < total or skip):
        totals, batches = resumed, iter(train.epoch(epoch))
        began, resumed = time.perf_counter() - totals.seconds, EpochTotals()
        for i in range(len(train)):
            # The loader's order is a function of (seed, epoch): a resumed epoch skips what it already did.
            waited = time.perf_counter()
            batch = next(batches)
            if i < skip:
                continue
            if step >= total:
                break
            waited = time.perf_counter() - waited
            result = engine.step(batch.x.to(grid.device), batch.y.to(grid.device), batch.rows, step)
            schedule.step()
            step += 1
            # One collective agrees on the global loss and on whether any rank was asked to stop.
            agreed = grid.allreduce(np.array([result.loss, float(stop.requested)]), f"the loss of step {step}")
            loss, stopping = agreed[0] / grid.size, agreed[1] > 0
            if not math.isfinite(loss):
                raise UsageError(
                    f"the loss is {loss} at step {step} (epoch {epoch + 1}): lower --lr, set "
                    f"--clip_grad, or check the data for extreme values"
                )
            totals.add(loss, result, waited)
            progress.update(step, epoch, loss)
            if stopping:
                totals.seconds = time.perf_counter() - began
                return stop_checkpoint(epoch, i + 1, totals, "during training")
            if step >= total:
                break
        # Validate the S-sample predictive, log the epoch, checkpoint.
        skip, seconds, n = 0, time.perf_counter() - began, max(1, totals.steps)
        try:
            val_metrics = evaluate(engine, val, eval_samples, info.task, cfg.ece_bins)
        except Stopping:
            totals.seconds = seconds  # the epoch's training is done: the resume validates and logs it
            return stop_checkpoint(epoch, len(train), totals, "during validation")
        epoch += 1
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
            checkpoint(epoch, 0, EpochTotals())

    # The final model on the test split, with the full predictive; OOD detection; pictures.
    test = job.loader("test", verify=False)
    test.between_batches = lambda: stop.raise_if_agreed(grid)
    try:
        metrics, ood_metrics = evaluate_uncertainty(engine, test, eval_samples, info.task, cfg.ece_bins, ood)
    except Stopping:
        progress.message(
            f"hpcbnn.train: stop signal during the final evaluation: the last checkpoint (step {step}) in "
            f"{run.path} holds the trained model; exiting with {EXIT_REQUEUE} (requeue: --resume true evaluates it)"
        )
        return EXIT_REQUEUE
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
