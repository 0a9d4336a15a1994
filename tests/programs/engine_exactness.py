"""Train 5 steps in float64 on this grid and save the parameters (rank 0) for comparison.

usage: engine_exactness.py MODE K BACKEND OUT.pt [REDUCTION]
For an MLP and a small CNN (with per-sample flip augmentation), each with the ELBO and the
predictive objective, on fixed digits batches: S=4 samples, B=8 examples per step.
"""

import sys

import torch
from sklearn.datasets import load_digits
from torch import nn

from hpcbnn.bnn.bayesianize import bayesianize
from hpcbnn.parallel.collectives import make_collectives
from hpcbnn.data import augmentation
from hpcbnn.parallel.engine import Engine
from hpcbnn.parallel.grid import ProcessGrid

S, B, STEPS, SEED = 4, 8, 5, 7
mode, k, backend, out = sys.argv[1], int(sys.argv[2]) or None, sys.argv[3], sys.argv[4]
hierarchical = len(sys.argv) > 5 and sys.argv[5] == "hierarchical"
torch.set_default_dtype(torch.float64)
grid = ProcessGrid(mode, k)
comm = make_collectives(grid, backend)
digits = load_digits()
x_all = torch.tensor(digits.images[: B * STEPS] / 16.0).unsqueeze(1)
y_all = torch.tensor(digits.target[: B * STEPS])


def network(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "mlp":
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    else:
        model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 8, 3), nn.ReLU(),
                              nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    return bayesianize(model, init_std=0.05)


results = {}
for kind in ("mlp", "cnn"):
    for objective in ("elbo", "predictive"):
        model = network(kind)
        initial = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)  # scale-sensitive, unlike Adam
        engine = Engine(model, optimizer, grid, comm, samples=S, batch_size=B, n_train=len(digits.target),
                        seed=SEED, objective=objective, hierarchical=hierarchical,
                        augment=augmentation("flip") if kind == "cnn" else None)
        rows = grid.local_batch(B)
        for step in range(STEPS):
            x, y = x_all[step * B: (step + 1) * B], y_all[step * B: (step + 1) * B]
            engine.step(x[rows], y[rows], rows, step)
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        spread = flat.clone()
        comm.allreduce_([spread], "world")
        assert torch.allclose(spread, flat, rtol=0, atol=1e-12), "ranks disagree on the parameters"
        results[f"{kind}-{objective}"] = {"initial": initial, "final": flat}
if grid.is_root:
    torch.save(results, out)
