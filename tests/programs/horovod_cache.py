"""Train STEPS small steps with the predictive objective on Horovod (each step: a grouped
allreduce of 8 gradients, an allgather and its backward's allreduce), then check that the
ranks agree. Unnamed, these collectives would be > 1024 distinct Horovod cache entries.

usage: horovod_cache.py STEPS
"""

import os
import sys

import torch
from sklearn.datasets import load_digits
from torch import nn

import hpcbnn as hb

S, B = 4, 8
steps = int(sys.argv[1])
grid = hb.ProcessGrid("sample")
comm = hb.make_collectives(grid, "horovod")
digits = load_digits()
x_all, y_all = torch.tensor(digits.data / 16.0, dtype=torch.float32), torch.tensor(digits.target)
model = hb.bayesianize(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)))
optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
engine = hb.Engine(model, optimizer, grid, comm, samples=S, batch_size=B, n_train=len(x_all), seed=0,
                   objective="predictive")
rows = grid.local_batch(B)
for step in range(steps):
    batch = slice((step * B) % 1600, (step * B) % 1600 + B)
    engine.step(x_all[batch], y_all[batch], rows, step)
flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
spread = flat.clone()
comm.allreduce_([spread], "world")
assert torch.equal(spread, flat), "ranks disagree on the parameters"
print(f"rank {grid.rank}: {steps} steps, ranks agree", flush=True)
print(f"rank {grid.rank}: fusion threshold {os.environ['HOROVOD_FUSION_THRESHOLD']}", flush=True)
