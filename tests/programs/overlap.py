"""Gradient reductions start during backward and end as the grid's average; rank 0 prints
every rank's record as JSON.

    mpirun -np 2 python tests/programs/overlap.py sample 0 horovod world

Two parameters of one shape, u and v, enter each rank's loss in a rank-dependent order, so
backward finishes their gradients in a different order on odd and even ranks (as a mixture's
components, used by different ranks' samples, do): a backend that pairs collectives by
their order (Gloo) would sum one rank's u with another's v unless the order is fixed. A
gather over the sample ranks enters the loss before u and v on even ranks and after them on
odd ones, so its adjoint's allreduce, issued inside backward, comes before their reductions
on some ranks and after them on others (hierarchical mode reduces over those same ranks).
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

torch.manual_seed(0)
early = nn.Parameter(torch.ones(2))  # accumulated before the block only: reduced at its exit
frozen = nn.Parameter(torch.ones(3), requires_grad=False)  # no hook, no gradient, no error
model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
u, v = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))
params = [early, frozen, *model.parameters(), u, v]  # reversed, `early` is last: it holds back nothing
trained = [p for p in params if p.requires_grad]


g = nn.Parameter(torch.ones(1, 3))  # feeds the gather; not in `params`, its gradient is not checked


def loss_of(rank: int, gather: bool) -> torch.Tensor:
    """Rank `rank`'s gradient of `early` (a backward before the block) and its loss on the rest."""
    (early * (rank + 1)).sum().backward()
    gathered = lambda: comm.allgather(g * (rank + 1), "sample").sum() if gather else torch.zeros(())  # noqa: E731
    terms = [lambda: (u * (rank + 1)).pow(2).sum(), lambda: (v * (rank + 2)).pow(3).sum()]
    terms = [*terms, gathered] if rank % 2 else [gathered, *terms[::-1]]  # created, hence finished, per rank
    first, second, third = (t() for t in terms)
    return model(torch.full((5, 4), rank + 1.0)).pow(2).sum() + first + second + third


want = [torch.zeros_like(p) for p in trained]
for rank in range(grid.size):
    for p in trained:
        p.grad = None
    loss_of(rank, gather=False).backward()  # the gather's term touches only g
    for w, p in zip(want, trained):
        w += p.grad / grid.size

for p in trained:
    p.grad = None
loss = loss_of(grid.rank, gather=True)
with comm.reducing_gradients(params, reduction == "hierarchical") as started:
    loss.backward()
    during = sorted(started)
error = max((p.grad - w).abs().max().item() for p, w in zip(trained, want))

records = grid.world.gather({"rank": grid.rank, "during": during, "error": error, "frozen": frozen.grad is None})
if grid.is_root:
    print(json.dumps(records))
