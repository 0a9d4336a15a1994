"""Train 5 steps in float64 on this grid and save every case's state (rank 0) for comparison.

usage: engine_exactness.py MODE K BACKEND OUT.pt REDUCTION [CASES [CHUNK]]
Fixed digits batches, S=4 samples, B=8 examples per step. The cases cover what the grid could
get wrong: both objectives, the three gradient estimators, a CNN with per-sample and shared
flip augmentation, a BatchNorm CNN (refused on D>1 data groups, where its batch statistics
would cover one rank's rows only), the Gaussian likelihood, and Adam with gradient clipping.
A case the engine refuses is saved as {"refused": the message}. CASES: all (the default) or
base (the first four: what differs between backends is the reduction, not the estimators).
CHUNK: each rank evaluates its samples CHUNK at a time (--sample_chunk; default all at once).
"""

import sys

import torch
from sklearn.datasets import load_digits
from torch import nn

from hpcbnn.bnn.bayesianize import bayesianize
from hpcbnn.data import augmentation
from hpcbnn.errors import UsageError
from hpcbnn.parallel.collectives import make_collectives
from hpcbnn.parallel.engine import Engine
from hpcbnn.parallel.grid import ProcessGrid

S, B, STEPS, SEED = 4, 8, 5, 7
mode, k, backend, out = sys.argv[1], int(sys.argv[2]) or None, sys.argv[3], sys.argv[4]
hierarchical = len(sys.argv) > 5 and sys.argv[5] == "hierarchical"
case_set = sys.argv[6] if len(sys.argv) > 6 else "all"
chunk = int(sys.argv[7]) if len(sys.argv) > 7 else None
torch.set_default_dtype(torch.float64)
grid = ProcessGrid(mode, k)
comm = make_collectives(grid, backend)
digits = load_digits()
x_all = torch.tensor(digits.images[: B * STEPS] / 16.0).unsqueeze(1)
y_all = torch.tensor(digits.target[: B * STEPS])

# name: network, estimator, objective, likelihood, optimizer, clip_grad, augmentation, augment mode
CASES = {
    "mlp-elbo": ("mlp", "reparam", "elbo", "categorical", "sgd", None, None, "per-sample"),
    "mlp-predictive": ("mlp", "reparam", "predictive", "categorical", "sgd", None, None, "per-sample"),
    "cnn-elbo": ("cnn", "reparam", "elbo", "categorical", "sgd", None, "flip", "per-sample"),
    "cnn-predictive": ("cnn", "reparam", "predictive", "categorical", "sgd", None, "flip", "per-sample"),
    "mlp-flipout": ("mlp", "flipout", "elbo", "categorical", "sgd", None, None, "per-sample"),
    "mlp-local": ("mlp", "local", "elbo", "categorical", "sgd", None, None, "per-sample"),
    "cnn-flipout": ("cnn", "flipout", "elbo", "categorical", "sgd", None, "flip", "per-sample"),
    "cnn-local": ("cnn", "local", "elbo", "categorical", "sgd", None, "flip", "per-sample"),
    "cnn-shared-flip": ("cnn", "reparam", "elbo", "categorical", "sgd", None, "flip", "shared"),
    "batchnorm": ("bn", "reparam", "elbo", "categorical", "sgd", None, None, "per-sample"),
    "gaussian": ("mlp-gauss", "reparam", "elbo", "gaussian", "sgd", None, None, "per-sample"),
    "adam-clip": ("mlp", "reparam", "elbo", "categorical", "adam", 0.5, None, "per-sample"),
}


def network(kind: str, estimator: str) -> nn.Module:
    torch.manual_seed(0)
    if kind in ("mlp", "mlp-gauss"):
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 2 if kind == "mlp-gauss" else 10))
    elif kind == "cnn":
        model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 8, 3), nn.ReLU(),
                              nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    else:
        model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    return bayesianize(model, init_std=0.05, estimator=estimator)


def optimizer_for(name: str, model: nn.Module) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=0.05)
    return torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)  # scale-sensitive, unlike Adam


results: dict = {}
for name, (kind, estimator, objective, likelihood, opt, clip, augment, augment_mode) in list(CASES.items())[: 4 if case_set == "base" else None]:
    model = network(kind, estimator)
    initial = {n: t.detach().clone() for n, t in model.state_dict().items()}
    try:
        engine = Engine(model, optimizer_for(opt, model), grid, comm, samples=S, batch_size=B,
                        n_train=len(digits.target), seed=SEED, objective=objective, likelihood=likelihood,
                        hierarchical=hierarchical, clip_grad=clip, augment=augmentation(augment or "none"),
                        augment_mode=augment_mode, sample_chunk=chunk)
    except UsageError as exc:
        results[name] = {"refused": str(exc)}
        continue
    rows = grid.local_batch(B)
    for step in range(STEPS):
        x, y = x_all[step * B: (step + 1) * B], y_all[step * B: (step + 1) * B]
        if likelihood == "gaussian":
            y = (y.to(torch.float64) / 9.0).unsqueeze(1)  # the digit as a regression target
        engine.step(x[rows], y[rows], rows, step)
    engine.sync_buffers()  # BatchNorm running statistics: each rank tracked its own samples' share
    final = {n: t.detach().clone() for n, t in model.state_dict().items()}
    for n, t in final.items():
        if t.is_floating_point():
            spread = t.clone()
            comm.allreduce_([spread], "world")
            assert torch.allclose(spread, t, rtol=0, atol=1e-12), f"{name}: ranks disagree on {n}"
    results[name] = {"initial": initial, "final": final}
if grid.is_root:
    torch.save(results, out)
