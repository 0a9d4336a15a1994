"""Gradient reductions start during backward and end as the grid's average; rank 0 prints
every rank's record as JSON.

    mpirun -np 2 python tests/programs/overlap.py sample 0 horovod world
"""

import json
import sys

import torch
from torch import nn

from hpcbnn.parallel.collectives import make_collectives
from hpcbnn.parallel.grid import ProcessGrid

mode, sample_group, backend, reduction = sys.argv[1], int(sys.argv[2]) or None, sys.argv[3], sys.argv[4]
grid = ProcessGrid(mode, sample_group)
comm = make_collectives(grid, backend)
torch.set_default_dtype(torch.float64)


def gradients(rank: int, model: nn.Module, early: nn.Parameter) -> torch.Tensor:
    """Rank `rank`'s gradient of `early` (a backward before the block) and its loss on the model."""
    (early * (rank + 1)).sum().backward()
    return model(torch.full((5, 4), rank + 1.0)).pow(2).sum()


torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
early = nn.Parameter(torch.ones(2))  # accumulated before the block only: reduced at its exit
frozen = nn.Parameter(torch.ones(3), requires_grad=False)  # no hook, no gradient, no error
params = [*model.parameters(), early, frozen]
trained = params[:-1]

want = [torch.zeros_like(p) for p in trained]
for rank in range(grid.size):
    for p in trained:
        p.grad = None
    gradients(rank, model, early).backward()
    for w, p in zip(want, trained):
        w += p.grad / grid.size

for p in trained:
    p.grad = None
loss = gradients(grid.rank, model, early)
with comm.reducing_gradients(params, reduction == "hierarchical") as started:
    loss.backward()
    during = sorted(started)
error = max((p.grad - w).abs().max().item() for p, w in zip(trained, want))

records = grid.world.gather({"rank": grid.rank, "during": during, "error": error, "frozen": frozen.grad is None})
if grid.is_root:
    print(json.dumps(records))
