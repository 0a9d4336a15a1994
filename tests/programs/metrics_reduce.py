"""Each rank evaluates its shard of one predictive; the allreduced sums must give the
metrics of the whole predictive computed in one process. Prints OK on rank 0."""

import math

import torch
from mpi4py import MPI

from hpcbnn.uq import metrics

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
g = torch.Generator().manual_seed(7)
S, N, C, d = 4, 37, 5, 2
probs = torch.softmax(torch.randn(S, N, C, generator=g) * 2, -1)
labels = torch.randint(0, C, (N,), generator=g)
mean, std = torch.randn(S, N, d, generator=g), torch.rand(S, N, d, generator=g) + 0.2
y = torch.randn(N, d, generator=g)

shard = torch.tensor_split(torch.arange(N), size)[rank]  # uneven shards on purpose
cls = metrics.finalize_classification(
    metrics.allreduce_sums(metrics.classification_sums(probs[:, shard], labels[shard], 10), comm))
reg = metrics.finalize_regression(
    metrics.allreduce_sums(metrics.regression_sums(mean[:, shard], std[:, shard], y[shard]), comm))


def close(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(close(x, z) for x, z in zip(a, b))
    if a is None or b is None:
        return a is b
    return math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-14)


if rank == 0:
    assert close(cls, metrics.classification_metrics(probs, labels, 10)), cls
    assert close(reg, metrics.regression_metrics(mean, std, y)), reg
    print("OK", size, cls["count"], reg["count"], flush=True)
