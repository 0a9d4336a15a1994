"""A run directory: resolved config, metrics as JSON lines, summary, plots, checkpoints.

Rank 0 writes every file and decides (which directory, which checkpoint), then tells the
others; all ranks read the chosen checkpoint. One run at a time: rank 0 holds an exclusive
flock on the directory while the run lives (the kernel drops it when the process dies, so a
killed run leaves no stale lock). Layout:

    RUN_DIR/config.yaml     the resolved configuration (every option, defaults included)
    RUN_DIR/metrics.jsonl   one JSON object per epoch, each epoch once (a resume drops the
                            epochs logged after its checkpoint before it trains them again)
    RUN_DIR/summary.json    test metrics of the final model, OOD detection, posterior health, the run's totals
    RUN_DIR/reliability.png and uncertainty.png, or calibration.png
    RUN_DIR/curves.png      learning curves from metrics.jsonl (python -m hpcbnn.plots RUN_DIR redraws)
    RUN_DIR/evaluation.json written by python -m hpcbnn.evaluate RUN_DIR
    RUN_DIR/checkpoints/step-NNNNNN.pt
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hpcbnn.data import DatasetInfo
from hpcbnn.errors import UsageError
from hpcbnn.parallel.grid import ProcessGrid
from hpcbnn.run.checkpoint import (
    DamagedCheckpoint,
    checkpoints,
    load_checkpoint,
    model_fingerprint,
    save_checkpoint,
    write_atomically,
)
from hpcbnn.run.config import RESUME_FIXED, Config, save_config


class RunDir:
    def __init__(self, cfg: Config, grid: ProcessGrid) -> None:
        self.cfg, self.grid = cfg, grid
        self._lock: int | None = None  # the directory's descriptor, locked while the process lives
        outcome: tuple[str, str | None] = ("", None)
        if grid.is_root:
            path = Path(cfg.run_dir or f"runs/{time.strftime('%Y%m%d-%H%M%S')}").resolve()
            try:
                self._lock = _lock(path)
                if not cfg.resume and checkpoints(path):
                    raise UsageError(
                        f"{path} already holds checkpoints: pass --resume true to continue "
                        f"that run, or choose a new --run_dir"
                    )
                outcome = (str(path), None)
            except UsageError as exc:
                outcome = (str(path), str(exc))
        name, error = grid.bcast(outcome, "rank 0's check of the run directory")
        if error:
            raise UsageError(error)
        self.path = Path(name)

    def write_config(self) -> None:
        """Record the resolved configuration; after a resume is validated, so a refused one changes nothing."""
        if self.grid.is_root:
            save_config(self.cfg, self.path / "config.yaml")

    def log(self, record: dict[str, Any]) -> None:
        if self.grid.is_root:
            with open(self.path / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def keep_epochs(self, epochs: int) -> None:
        """Drop metrics.jsonl's records of the epochs after the first `epochs` (logged by a run that
        died before it checkpointed them), so the resumed run logs each epoch once."""
        path = self.path / "metrics.jsonl"
        if not self.grid.is_root or not path.exists():
            return
        lines = path.read_text().splitlines()
        kept = [line for line in lines if line.strip() and json.loads(line).get("epoch", 0) <= epochs]
        if len(kept) != len(lines):
            write_atomically(path, "".join(line + "\n" for line in kept).encode())

    def write_json(self, name: str, record: dict[str, Any]) -> Path:
        path = self.path / name
        if self.grid.is_root:
            write_atomically(path, (json.dumps(record, indent=2) + "\n").encode())
        return path

    def save(self, step: int, state: dict[str, Any], run: dict[str, Any]) -> None:
        """Checkpoint `state` (written by rank 0, which then tells every rank how that went, so a
        failed write is the same UsageError on all of them and nobody runs ahead of it)."""
        error = None
        if self.grid.is_root:
            try:
                save_checkpoint(self.path, step, state, keep=self.cfg.keep_checkpoints, run=run)
            except UsageError as exc:
                error = str(exc)
        # Gathered, not broadcast: rank 0 knows the write is done only when every rank has heard it.
        error = self.grid.allgather(error, f"the checkpoint of step {step} (written by rank 0)")[0]
        if error:
            raise UsageError(error)

    def load_latest(self, model: nn.Module, run: dict[str, Any]) -> dict[str, Any] | None:
        """The newest valid checkpoint's state, checked against `model` and `run`; None when there is
        none. Rank 0 chooses it; a damaged newer one is skipped with a warning naming both files."""
        choice: tuple[str | None, str | None] = (None, None)
        state = None
        if self.grid.is_root:
            damaged: list[str] = []
            try:
                for path in reversed(checkpoints(self.path)):
                    try:
                        state = load_checkpoint(path, model_fingerprint(model), run=run)
                    except DamagedCheckpoint as exc:
                        damaged.append(str(exc))
                        continue
                    for problem in damaged:
                        print(
                            f"hpcbnn.train: warning: {problem}; resuming from {path}, the newest valid one",
                            file=sys.stderr,
                        )
                    choice = (str(path), None)
                    break
                else:
                    if damaged:
                        choice = (
                            None,
                            damaged[0] if len(damaged) == 1 else f"no valid checkpoint: {'; '.join(damaged)}",
                        )
            except UsageError as exc:
                choice = (None, str(exc))
        path, error = self.grid.bcast(choice, "rank 0's choice of the checkpoint to resume")
        if error:
            raise UsageError(error)
        if path is None or state is not None:
            return state
        try:  # on the CPU: torch.set_rng_state needs it there
            return load_checkpoint(path, model_fingerprint(model), run=run)
        except UsageError as exc:
            raise UsageError(f"{exc} (rank 0 read it)", collective=False) from None


def resume_fingerprint(cfg: Config, data: DatasetInfo) -> dict[str, Any]:
    """The values of the options a resume must not change (`RESUME_FIXED`); the data by the
    identity of its training split, so a copy of the same file elsewhere resumes."""
    values = dataclasses.asdict(cfg)
    fixed = {name: values[name] for name in RESUME_FIXED if name != "data"}
    fixed["data"] = data_identity(data)
    return json.loads(json.dumps(fixed))  # plain lists and numbers: what torch.load(weights_only) reads


def data_identity(info: DatasetInfo) -> str:
    """The training split in words and a digest of what sets it apart: size, shape, task, the
    file's length and its stored normalisation statistics (computed from every example)."""
    parts = [info.n, info.input_shape, info.task, info.num_classes, info.path.stat().st_size]
    parts += [v.tolist() for v in (info.mean, info.std, info.target_mean, info.target_std) if v is not None]
    digest = hashlib.sha256(repr(parts).encode()).hexdigest()[:12]
    return f"{info.n} training examples of shape {list(info.input_shape)} (digest {digest})"


def _lock(path: Path) -> int | None:
    """Lock the directory itself for this process (flock on its descriptor: no file is written, so
    a refused run leaves the directory as it was); None where the file system has no locks."""
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            raise UsageError(
                f"{path} is in use by another run (a live process holds its lock): wait for that run to end, "
                f"or choose another --run_dir"
            ) from None
        print(
            f"hpcbnn.train: warning: cannot lock {path} ({exc.strerror}): a second run on it would not be refused",
            file=sys.stderr,
        )
        return None
    return fd


def rng_state() -> dict[str, torch.Tensor]:
    """Torch's global RNG: training draws its noise from explicit seeds, but user code may not."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
