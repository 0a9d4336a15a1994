"""Distributed MCMC: batched NUTS and HMC over the process grid.

Chains are spread over the sample communicator and advance together in one batched
computation per rank; the log density and its gradient are summed over the data
communicator's shards with one Allreduce per leapfrog step.

    target = ShardedSum(ModelTarget(model, x_shard, observed={"y": y_shard},
                                    prior=grid.data_rank == 0), grid.data_comm)
    draws = sample(target, target.local.dim, chains, seed=0, num_warmup=1000, num_draws=1000)

A Bayesian network's weights are random variables (hpcbnn.bnn.variables), so
`NetworkTarget` samples them the same way: `python -m hpcbnn.mcmc --model bnn --data
FILE.h5 --hidden 50,50`. `python -m hpcbnn.mcmc --help` runs the bundled examples;
docs/mcmc.md has the details.
"""

from hpcbnn.mcmc.diagnostics import ess_bulk, ess_tail, rhat, summary
from hpcbnn.mcmc.hmc import Phase, Stats, Target, hmc, leapfrog
from hpcbnn.mcmc.nuts import nuts
from hpcbnn.mcmc.results import to_inference_data
from hpcbnn.mcmc.sampler import Draws, sample
from hpcbnn.mcmc.target import Layout, ModelTarget, NetworkTarget, ShardedSum

__all__ = [
    "Draws",
    "Layout",
    "ModelTarget",
    "NetworkTarget",
    "Phase",
    "ShardedSum",
    "Stats",
    "Target",
    "ess_bulk",
    "ess_tail",
    "hmc",
    "leapfrog",
    "nuts",
    "rhat",
    "sample",
    "summary",
    "to_inference_data",
]
