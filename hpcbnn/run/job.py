"""The set-up every command on the grid shares: grid, collectives, data file, network."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hpcbnn.data import DatasetInfo, Loader, default_dataset
from hpcbnn.data.convert import default_ood_dataset
from hpcbnn.data.loader import ood_like
from hpcbnn.errors import UsageError
from hpcbnn.parallel.collectives import Collectives, make_collectives
from hpcbnn.parallel.grid import ProcessGrid
from hpcbnn.run.config import PER_RANK, Config
from hpcbnn.run.network import build_network


@dataclass
class Job:
    """What a command on the grid works with, built in the one order that fails early."""

    cfg: Config
    grid: ProcessGrid
    comm: Collectives
    data: Path

    @classmethod
    def start(
        cls,
        cfg: Config,
        samples: Sequence[int],
        *,
        mode: str | None = None,
        sample_group: int | None = None,
        backend: str | None = None,
    ) -> Job:
        """The grid (checked against every sample count in `samples`), its collectives, the data file.

        First of all, the ranks compare their configurations: ranks started with different options
        (an MPMD launch, a config file edited between nodes) would wait for each other in different
        collectives, or silently train different models.
        """
        grid = ProcessGrid(
            mode or cfg.mode,
            sample_group if mode else cfg.sample_group,
            device=cfg.device,
            timeout=cfg.collective_timeout,
        )
        check_same_config(cfg, grid)
        for s in samples:
            grid.check(s, cfg.batch_size)
        comm = make_collectives(grid, backend or cfg.backend)
        data = Path(cfg.data) if cfg.data else default_dataset(grid.world)
        return cls(cfg, grid, comm, data)

    def loader(self, split: str, path: Path | None = None, **kw: Any) -> Loader:
        """This rank's view of `split` (of the data file, or of `path`); evaluation splits are
        read in order and to the last example."""
        if split != "train":
            kw = {"shuffle": False, "drop_last": False, **kw}
        return Loader(path or self.data, split, self.grid, batch_size=self.cfg.batch_size, seed=self.cfg.seed, **kw)

    def ood_loader(self, like: Loader, choice: str | None = None, split: str = "test") -> Loader | None:
        """The out-of-distribution inputs `choice` (a file, "auto" or "none"; default: the run's
        --ood) to tell apart from `like`'s, or None. Checked now, so a bad file fails before
        any slow work; its inputs get the model's normalisation (`like`'s), not their own file's."""
        choice = self.cfg.ood if choice is None else choice
        if choice == "none" or (choice == "auto" and self.cfg.data):
            return None
        if like.info.task != "classification":
            raise UsageError(f"--ood {choice}: OOD detection needs a classification data set, {like.info.path} is not")
        path = default_ood_dataset() if choice == "auto" else Path(choice)
        return ood_like(choice, like, lambda: self.loader(split, path))

    def network(self, info: DatasetInfo) -> nn.Module:
        """The configured network on this rank's device, its initial weights from `--seed`
        (torch seeds itself randomly; the engine broadcasts rank 0's anyway)."""
        torch.manual_seed(self.cfg.seed)
        return build_network(self.cfg, info).to(self.grid.device)


def check_same_config(cfg: Config, grid: ProcessGrid) -> None:
    """Every rank's resolved configuration is rank 0's (but for `PER_RANK` options), or one
    UsageError line from rank 0 naming the first option that differs and where."""
    values = {k: v for k, v in asdict(cfg).items() if k not in PER_RANK}
    digest = hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()
    digests = grid.allgather(digest, "the comparison of the ranks' configurations")
    if len(set(digests)) == 1:
        return
    other = digests.index(next(d for d in digests if d != digests[0]))
    everyone = grid.allgather(values, "the comparison of the ranks' configurations")
    ours, theirs = everyone[0], everyone[other]
    option = next(k for k in ours if ours[k] != theirs.get(k))
    detail = f"--{option} is {ours[option]!r} on rank 0 but {theirs.get(option)!r} on rank {other}"
    raise UsageError(  # every rank raises it; rank 0 alone prints it
        f"the ranks were started with different configurations ({detail}): launch every rank with the same "
        f"options and --config files"
    )
