"""NUTS on Bayesian logistic regression over covertype-shaped data (581,012 x 54 + intercept).

    python -m benchmarks.mcmc [--rows 581012] [--threads 1] [--draws 50] [--max_depth 6]

For one chain and for 8 chains advancing in one batch, it reports milliseconds per
leapfrog step (per batched step, and per chain-step), CPU milliseconds per step (robust on
a shared machine) and the time per effective sample (the smallest bulk ESS of the 55
coefficients), against:
  - the memory-bandwidth limit: a leapfrog step must read the features twice (logits, then
    gradient), timed here as twice the best of 20 passes of a sum over the same float32 array;
  - NumPyro's NUTS on the CPU, when it is installed (`pip install -e .[bench]`): the same model
    and data, the same fixed step size, tree depth and initial point (the posterior mode),
    identity mass matrix, chains vectorised, compile time excluded.
The step size is a quarter of leapfrog's stability limit 2 / sqrt(largest eigenvalue of the
Hessian at the mode). Each sampler runs `--draws` transitions without warm-up, with
`--threads` threads (torch and XLA alike; one by default, as each rank has under mpirun:
on a shared machine a second thread often waits for its core).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable

import numpy as np
import torch

from hpcbnn.mcmc import diagnostics, models
from hpcbnn.mcmc.hmc import Stats
from hpcbnn.mcmc.sampler import sample


def fastest(f: Callable[[], object], repeat: int = 20) -> float:
    """The best wall seconds of f(): what the hardware can do when nothing else runs."""
    f()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return min(times)


def posterior_mode(x: torch.Tensor, y: torch.Tensor, iterations: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Newton's method for the MAP of logistic regression with a N(0, 1) prior; (mode, Hessian)."""
    d = x.shape[1]
    w = torch.zeros(d, dtype=torch.float64)
    for _ in range(iterations):
        s = torch.sigmoid(x @ w.float())
        grad = ((y - s) @ x).double() - w
        hessian = (x.T @ (x * (s * (1 - s))[:, None])).double() + torch.eye(d, dtype=torch.float64)
        w = w + torch.linalg.solve(hessian, grad)
    return w, hessian


def run_hpcbnn(target: models.LogisticRegression, mode: torch.Tensor, chains: int, step: float,
               depth: int, draws: int) -> dict:
    lockstep = []

    def count(it: int, st: Stats, eps: torch.Tensor) -> None:
        lockstep.append(int(st.n_leapfrog.max()))

    init = mode.expand(chains, -1)
    wall, cpu = time.perf_counter(), time.process_time()
    out = sample(target, target.dim, torch.arange(chains), seed=0, num_warmup=0, num_draws=draws,
                 step_size=step, adapt_mass=False, max_depth=depth, init=init, progress=count)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return summarise(out.theta.numpy(), wall, cpu, sum(lockstep), int(out.stats["n_leapfrog"].sum()))


def run_numpyro(x: torch.Tensor, y: torch.Tensor, mode: torch.Tensor, chains: int, step: float,
                depth: int, draws: int) -> dict | None:
    try:
        import jax
        import jax.numpy as jnp
        import numpyro
        import numpyro.distributions as dist
        from numpyro.infer import NUTS
    except ImportError:
        return None

    def model(x, y):
        w = numpyro.sample("w", dist.Normal(jnp.zeros(x.shape[1]), 1.0).to_event(1))
        numpyro.sample("y", dist.Bernoulli(logits=x @ w), obs=y)

    xj, yj = jnp.asarray(x.numpy()), jnp.asarray(y.numpy())
    kernel = NUTS(model, step_size=step, adapt_step_size=False, adapt_mass_matrix=False,
                  max_tree_depth=depth)
    keys = jax.random.split(jax.random.PRNGKey(0), chains)
    w0 = jnp.asarray(mode.float().numpy())
    state = kernel.init(keys if chains > 1 else keys[0], 0,
                        {"w": jnp.broadcast_to(w0, (chains, len(w0))) if chains > 1 else w0},
                        model_args=(xj, yj))

    @jax.jit
    def run(state, x, y):
        def body(s, _):
            s = kernel.sample(s, (x, y), {})
            return s, (s.z["w"], s.num_steps)
        return jax.lax.scan(body, state, None, length=draws)

    jax.block_until_ready(run(state, xj, yj))
    wall, cpu = time.perf_counter(), time.process_time()
    _, (w, steps) = jax.block_until_ready(run(state, xj, yj))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    w, steps = np.asarray(w), np.asarray(steps).reshape(draws, chains)
    theta = w.reshape(draws, chains, -1).transpose(1, 0, 2)
    return summarise(theta, wall, cpu, int(steps.max(1).sum()), int(steps.sum()))


def summarise(theta: np.ndarray, wall: float, cpu: float, lockstep: int, chain_steps: int) -> dict:
    ess = min(diagnostics.ess_bulk(theta[:, :, i]) for i in range(theta.shape[2]))
    return {"ms_per_step": 1e3 * wall / lockstep, "cpu_ms_per_step": 1e3 * cpu / lockstep,
            "ms_per_chain_step": 1e3 * wall / chain_steps, "steps": lockstep,
            "min_ess_bulk": ess, "ms_per_ess": 1e3 * wall / ess, "seconds": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=models.COVERTYPE_ROWS)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--draws", type=int, default=50)
    parser.add_argument("--max_depth", type=int, default=6)
    parser.add_argument("--chains", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("XLA_FLAGS", f"--xla_cpu_multi_thread_eigen={str(args.threads > 1).lower()} "
                                       f"intra_op_parallelism_threads={args.threads}")

    x, y = models.covertype_shaped(0, args.rows)
    read = fastest(lambda: x.sum())
    limit_ms = 2e3 * read
    mode, hessian = posterior_mode(x, y)
    step = 0.25 * 2 / float(torch.linalg.eigvalsh(hessian).max().sqrt())
    target = models.LogisticRegression(x, y)
    print(f"covertype-shaped data {tuple(x.shape)} float32, {args.threads} threads; bandwidth "
          f"limit {limit_ms:.2f} ms per step (one pass over x: {1e3 * read:.2f} ms = "
          f"{x.numel() * 4 / read / 1e9:.1f} GB/s); step size {step:.2e}, max depth {args.max_depth}")
    rows = []
    for chains in args.chains:
        ours = run_hpcbnn(target, mode, chains, step, args.max_depth, args.draws)
        theirs = run_numpyro(x, y, mode, chains, step, args.max_depth, args.draws)
        row = {"chains": chains, "hpcbnn": ours, "numpyro": theirs,
               "step_vs_limit": ours["ms_per_step"] / limit_ms}
        if theirs:
            row["step_vs_numpyro"] = ours["ms_per_step"] / theirs["ms_per_step"]
            row["ess_time_vs_numpyro"] = ours["ms_per_ess"] / theirs["ms_per_ess"]
        rows.append(row)
        line = (f"{chains} chain(s): hpcbnn {ours['ms_per_step']:.2f} ms/step "
                f"({ours['ms_per_chain_step']:.2f} per chain-step, CPU {ours['cpu_ms_per_step']:.2f}), "
                f"{ours['ms_per_ess']:.1f} ms per effective sample; {row['step_vs_limit']:.2f}x the "
                f"bandwidth limit")
        if theirs:
            line += (f"; NumPyro {theirs['ms_per_step']:.2f} ms/step (CPU "
                     f"{theirs['cpu_ms_per_step']:.2f}), {theirs['ms_per_ess']:.1f} ms per effective "
                     f"sample: ratio {row['step_vs_numpyro']:.2f} per step, "
                     f"{row['ess_time_vs_numpyro']:.2f} per effective sample")
        print(line, flush=True)
    if len(rows) > 1:
        single = rows[0]["hpcbnn"]["ms_per_step"]
        for row in rows[1:]:
            print(f"{row['chains']} chains batched: a chain-step costs "
                  f"{row['hpcbnn']['ms_per_chain_step'] / single:.2f}x a single chain's step")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
