"""A run directory: resolved config, metrics as JSON lines, summary, plots, checkpoints.

Rank 0 writes every file; all ranks agree on the directory and read checkpoints. Layout:

    RUN_DIR/config.yaml     the resolved configuration (every option, defaults included)
    RUN_DIR/metrics.jsonl   one JSON object per epoch
    RUN_DIR/summary.json    test metrics of the final model, OOD detection, posterior health, the run's totals
    RUN_DIR/reliability.png and uncertainty.png, or calibration.png
    RUN_DIR/curves.png      learning curves from metrics.jsonl (python -m hpcbnn.plots RUN_DIR redraws)
    RUN_DIR/evaluation.json written by python -m hpcbnn.evaluate RUN_DIR
    RUN_DIR/checkpoints/step-NNNNNN.pt
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hpcbnn.errors import UsageError
from hpcbnn.parallel.grid import ProcessGrid
from hpcbnn.run.checkpoint import latest_checkpoint, load_checkpoint, model_fingerprint, save_checkpoint
from hpcbnn.run.config import Config, save_config


class RunDir:
    def __init__(self, cfg: Config, grid: ProcessGrid) -> None:
        self.cfg, self.grid = cfg, grid
        name = cfg.run_dir or (f"runs/{time.strftime('%Y%m%d-%H%M%S')}" if grid.is_root else None)
        self.path = Path(grid.world.bcast(name, root=0)).resolve()
        if not cfg.resume and latest_checkpoint(self.path):
            raise UsageError(
                f"{self.path} already holds checkpoints: pass --resume true to continue "
                f"that run, or choose a new --run_dir"
            )
        if grid.is_root:
            self.path.mkdir(parents=True, exist_ok=True)
        grid.world.Barrier()

    def write_config(self) -> None:
        """Record the resolved configuration; after a resume is validated, so a refused one changes nothing."""
        if self.grid.is_root:
            save_config(self.cfg, self.path / "config.yaml")

    def log(self, record: dict[str, Any]) -> None:
        if self.grid.is_root:
            with open(self.path / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def write_json(self, name: str, record: dict[str, Any]) -> Path:
        path = self.path / name
        if self.grid.is_root:
            path.write_text(json.dumps(record, indent=2) + "\n")
        return path

    def save(self, step: int, state: dict[str, Any]) -> None:
        """Checkpoint `state` (written by rank 0; every rank waits so nobody runs ahead of it)."""
        if self.grid.is_root:
            save_checkpoint(self.path, step, state, keep=self.cfg.keep_checkpoints)
        self.grid.world.Barrier()

    def load_latest(self, model: nn.Module) -> dict[str, Any] | None:
        """The newest checkpoint's state, validated against `model`; None when there is none."""
        path = latest_checkpoint(self.path)
        if path is None:
            return None
        return load_checkpoint(path, model_fingerprint(model))  # on the CPU: torch.set_rng_state needs it there


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
