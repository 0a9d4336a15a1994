"""Build the grid and exercise every collective; rank 0 prints every rank's record as JSON."""

import json
import sys

import torch

from hpcbnn.parallel.collectives import make_collectives
from hpcbnn.parallel.grid import ProcessGrid

mode, backend = sys.argv[1], sys.argv[2]
sample_group = int(sys.argv[3]) or None
grid = ProcessGrid(mode, sample_group)
comm = make_collectives(grid, backend)
r = float(grid.rank)

sums = {}
for axis in ("sample", "data", "world"):
    t = torch.tensor([r, 1.0], dtype=torch.float64)
    u = torch.full((3,), r * r, dtype=torch.float64)
    comm.allreduce_([t, u], axis, average=False)
    sums[axis] = [t.tolist(), u.tolist()]
mean = torch.tensor([r])
comm.allreduce_([mean], "world")

b = torch.full((2,), r + 10)
comm.broadcast_([b], root=grid.size - 1)

x = torch.tensor([[r, 2 * r]], dtype=torch.float64, requires_grad=True)
gathered = comm.allgather(x, "sample")
weights = torch.arange(1.0, gathered.numel() + 1, dtype=torch.float64).view_as(gathered)
(gathered * weights).sum().backward()

record = {
    "rank": grid.rank, "data_rank": grid.data_rank, "sample_rank": grid.sample_rank,
    "K": grid.sample_size, "D": grid.data_size, "local_rank": grid.local_rank,
    "sample_members": grid.sample_comm.allgather(grid.rank),
    "data_members": grid.data_comm.allgather(grid.rank),
    "sums": sums, "mean": mean.item(), "broadcast": b.tolist(),
    "gathered": gathered.detach().tolist(), "gather_grad": x.grad.tolist(),
    "device": str(grid.device),
}
records = grid.world.gather(record, root=0)
if grid.is_root:
    print(json.dumps(records), flush=True)
