"""OOD detection and selective prediction on a grid: each data group holds its shard of the
in- and out-of-distribution examples (the ranks of a sample group the same one); the scores
gathered over the data communicator must give the one-process result. Rank 0 prints it as JSON.

    mpirun -np P python tests/programs/ood_reduce.py MODE
"""

import json
import sys

import numpy as np
import torch

from hpcbnn.parallel.grid import ProcessGrid
from hpcbnn.uq import ood

grid = ProcessGrid(sys.argv[1], device="cpu")
g = torch.Generator().manual_seed(5)
probs_in = torch.softmax(4 * torch.randn(6, 53, 7, generator=g, dtype=torch.float64), -1)
probs_out = torch.softmax(torch.randn(6, 29, 7, generator=g, dtype=torch.float64), -1)
labels = torch.randint(0, 7, (53,), generator=g)


def shard(t: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.tensor_split(t, grid.data_size, dim)[grid.data_rank].contiguous()  # uneven shards on purpose


local_in = ood.uncertainty_scores(shard(probs_in, 1))
local_in["correct"] = (shard(probs_in, 1).mean(0).argmax(-1) == shard(labels, 0)).numpy()
inside = ood.gather(local_in, grid.data_comm)
outside = ood.gather(ood.uncertainty_scores(shard(probs_out, 1)), grid.data_comm)
report = ood.ood_detection(inside, outside)
report["selective"] = ood.risk_coverage(inside["maxprob"], inside["correct"])

whole = ood.uncertainty_scores(probs_in)
assert all(np.allclose(np.sort(inside[k]), np.sort(whole[k]), rtol=1e-14, atol=0) for k in whole)  # each example once
if grid.is_root:
    print(json.dumps(report), flush=True)
