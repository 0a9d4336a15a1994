"""Record what every rank's loader yields, per grid layout, for tests/test_data_loader.py.

    mpirun -np P python tests/programs/data_shards.py OUT.json sample data hybrid:2

All ranks first fetch the default data set together (the cache starts empty in the
tests, so this also exercises concurrent first use), then read its training split.
"""

from __future__ import annotations

import hashlib
import json
import sys

from mpi4py import MPI

from hpcbnn.data import Loader, default_dataset
from hpcbnn.errors import entry_point
from hpcbnn.parallel.grid import ProcessGrid

BATCH = 64
CASES = {  # name: (Loader options, epochs)
    "stream": (dict(shuffle=True, drop_last=True, prefetch=2, preload=False), (0, 1)),
    "preload": (dict(shuffle=True, drop_last=True, prefetch=0, preload=True), (0,)),
    "pad": (dict(shuffle=True, drop_last=False, prefetch=1, preload=False), (0,)),
    "ordered": (dict(shuffle=False, drop_last=False, prefetch=2, preload=True), (0,)),
}


def digest(row) -> str:  # noqa: ANN001 - a tensor
    return hashlib.sha1(row.numpy().tobytes()).hexdigest()[:16]


@entry_point("data_shards")
def main() -> None:
    out, layouts = sys.argv[1], sys.argv[2:]
    path = default_dataset(MPI.COMM_WORLD)
    records = {}
    for layout in layouts:
        mode, _, k = layout.partition(":")
        grid = ProcessGrid(mode, int(k) if k else None, device="cpu")
        for name, (options, epochs) in CASES.items():
            with Loader(path, "train", grid, batch_size=BATCH, seed=7, **options) as loader:
                for epoch in epochs:
                    batches = [{"index": b.index.tolist(), "valid": b.valid.tolist(), "y": b.y.tolist(),
                                "x": [digest(row) for row in b.x], "step": b.step}
                               for b in loader.epoch(epoch)]
                    mine = {"rank": grid.rank, "data_rank": grid.data_rank, "sample_rank": grid.sample_rank,
                            "D": grid.data_size, "steps": len(loader),
                            "rows": [loader.rows.start, loader.rows.stop],
                            "batches": batches}
                    gathered = grid.world.gather(mine, root=0)
                    if grid.rank == 0:
                        records[f"{layout}/{name}/{epoch}"] = gathered
    if MPI.COMM_WORLD.Get_rank() == 0:
        with open(out, "w") as f:
            json.dump({"path": str(path), "records": records}, f)


if __name__ == "__main__":
    main()
