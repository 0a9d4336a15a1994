"""NUTS on Bayesian logistic regression over covertype-shaped data (581,012 x 54 + intercept).

    python -m benchmarks.mcmc [--rows 581012] [--threads 1] [--draws 50] [--max_depth 6] [--ranks 1 2]
    python -m benchmarks.mcmc --smoke      # a small, quick run of everything (the tests use it)

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
`--threads` threads: the process is pinned to that many cores, because XLA sizes its thread
pool by the cores it may use and ignores its thread flags (measured: NumPyro used 1.5 cores
of CPU time per wall second with `--xla_cpu_multi_thread_eigen=false` alone).

With `--ranks`, the likelihood is also split over P data ranks, each launched under real
`mpirun --bind-to core -np P` (one Allreduce of [log p, grad] per leapfrog step, as in
`python -m hpcbnn.mcmc --mode data`), every chain count timed from the same start; the
table gives ms per step, the speedup t(P0)/t(P) over the smallest P0 and the efficiency
speedup x P0 / P.

Prints tables, then, as the last line, one JSON object: `bandwidth_limit_ms`, `chains` (per
chain count: `hpcbnn` and `numpyro` with `ms_per_step`, `ms_per_ess`, ...; `step_vs_limit`,
`step_vs_numpyro`, `ess_time_vs_numpyro`) and `ranks` (per P and chain count: `ms_per_step`,
`speedup`, `efficiency`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from benchmarks import launch
from hpcbnn.mcmc import diagnostics, models
from hpcbnn.mcmc.hmc import Stats, Target
from hpcbnn.mcmc.sampler import sample
from hpcbnn.mcmc.target import ShardedSum


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


def run_hpcbnn(target: Target, dim: int, mode: torch.Tensor, chains: int, step: float,
               depth: int, draws: int) -> dict:
    lockstep = []

    def count(it: int, st: Stats, eps: torch.Tensor) -> None:
        lockstep.append(int(st.n_leapfrog.max()))

    init = mode.expand(chains, -1)
    wall, cpu = time.perf_counter(), time.process_time()
    out = sample(target, dim, torch.arange(chains), seed=0, num_warmup=0, num_draws=draws,
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


def worker(args: argparse.Namespace) -> None:
    """Under mpirun: this rank's rows, the likelihood summed over the ranks; rank 0 prints one JSON line."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    torch.set_num_threads(args.threads)
    start = json.loads(Path(args.worker).read_text())
    mode = torch.tensor(start["mode"], dtype=torch.float64)
    x, y = models.covertype_shaped(*models.shard_rows(args.rows, comm.rank, comm.size))
    target = ShardedSum(models.LogisticRegression(x, y, prior=comm.rank == 0), comm)
    rows = []
    for chains in args.chains:
        comm.Barrier()
        ours = run_hpcbnn(target, x.shape[1], mode, chains, start["step"], args.max_depth, args.draws)
        rows.append({"ranks": comm.size, "chains": chains, "ms_per_step": ours["ms_per_step"],
                     "cpu_ms_per_step": ours["cpu_ms_per_step"]})
    if comm.rank == 0:
        print(json.dumps(rows))


def run_ranks(args: argparse.Namespace, mode: torch.Tensor, step: float) -> list[dict]:
    """Per-step times of every chain count on each P of `--ranks` (data split), and the scaling."""
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        start = Path(tmp) / "start.json"
        start.write_text(json.dumps({"mode": mode.tolist(), "step": step}))
        for ranks in args.ranks:
            cmd = [*launch.mpirun(ranks, bind_to="core"), sys.executable, "-m", "benchmarks.mcmc",
                   "--worker", str(start), "--rows", str(args.rows), "--threads", str(args.threads),
                   "--draws", str(args.draws), "--max_depth", str(args.max_depth),
                   "--chains", *map(str, args.chains)]
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if done.returncode:
                raise SystemExit(f"{' '.join(cmd)} failed (exit {done.returncode}):\n{done.stdout}{done.stderr}")
            rows += json.loads(done.stdout.strip().splitlines()[-1])
    base = min(args.ranks)
    for row in rows:
        t0 = next(r["ms_per_step"] for r in rows if r["ranks"] == base and r["chains"] == row["chains"])
        row["speedup"] = t0 / row["ms_per_step"]
        row["efficiency"] = row["speedup"] * base / row["ranks"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=models.COVERTYPE_ROWS)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--draws", type=int, default=50)
    parser.add_argument("--max_depth", type=int, default=6)
    parser.add_argument("--chains", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--ranks", type=int, nargs="*", default=[],
                        help="also time the data split over these numbers of ranks under mpirun")
    parser.add_argument("--smoke", action="store_true",
                        help="16,384 rows, 4 draws, depth 3, ranks 1 2: checks that everything runs")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        args.rows, args.draws, args.max_depth, args.ranks = 16384, 4, 3, [1, 2]
    if args.worker:
        worker(args)
        return
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.threads])
    threadpool_limits(args.threads)
    torch.set_num_threads(args.threads)

    x, y = models.covertype_shaped(0, args.rows)
    read = fastest(lambda: x.sum())
    limit_ms = 2e3 * read
    mode, hessian = posterior_mode(x, y)
    step = 0.25 * 2 / float(torch.linalg.eigvalsh(hessian).max().sqrt())
    target = models.LogisticRegression(x, y)
    print(f"covertype-shaped data {tuple(x.shape)} float32, {args.threads} thread(s); bandwidth "
          f"limit {limit_ms:.2f} ms per step (one pass over x: {1e3 * read:.2f} ms = "
          f"{x.numel() * 4 / read / 1e9:.1f} GB/s); step size {step:.2e}, max depth {args.max_depth}, "
          f"{args.draws} draws from the posterior mode")
    rows = []
    for chains in args.chains:
        ours = run_hpcbnn(target, target.dim, mode, chains, step, args.max_depth, args.draws)
        theirs = run_numpyro(x, y, mode, chains, step, args.max_depth, args.draws)
        row = {"chains": chains, "hpcbnn": ours, "numpyro": theirs,
               "step_vs_limit": ours["ms_per_step"] / limit_ms}
        if theirs:
            row["step_vs_numpyro"] = ours["ms_per_step"] / theirs["ms_per_step"]
            row["ess_time_vs_numpyro"] = ours["ms_per_ess"] / theirs["ms_per_ess"]
        rows.append(row)
    print("\n| chains | hpcbnn ms/step (CPU) | NumPyro ms/step (CPU) | hpcbnn ms/ESS | NumPyro ms/ESS "
          "| min ESS hpcbnn / NumPyro | step / limit | per step / NumPyro | per ESS / NumPyro |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        ours, theirs = row["hpcbnn"], row["numpyro"] or {}
        cells = [f"{row['chains']}", f"{ours['ms_per_step']:.2f} ({ours['cpu_ms_per_step']:.2f})",
                 f"{theirs['ms_per_step']:.2f} ({theirs['cpu_ms_per_step']:.2f})" if theirs else "-",
                 f"{ours['ms_per_ess']:.0f}", f"{theirs['ms_per_ess']:.0f}" if theirs else "-",
                 f"{ours['min_ess_bulk']:.1f}" + (f" / {theirs['min_ess_bulk']:.1f}" if theirs else ""),
                 f"{row['step_vs_limit']:.2f}x",
                 f"{row['step_vs_numpyro']:.2f}" if theirs else "-",
                 f"{row['ess_time_vs_numpyro']:.2f}" if theirs else "-"]
        print("| " + " | ".join(cells) + " |")
    ranks = run_ranks(args, mode, step) if args.ranks else []
    if ranks:
        print(f"\ndata split under mpirun --bind-to core (speedup over P = {min(args.ranks)})\n")
        print("| ranks | chains | ms/step (CPU) | speedup | efficiency |\n|---|---|---|---|---|")
        for r in ranks:
            print(f"| {r['ranks']} | {r['chains']} | {r['ms_per_step']:.2f} ({r['cpu_ms_per_step']:.2f}) "
                  f"| {r['speedup']:.2f} | {r['efficiency']:.2f} |")
    print(json.dumps({"bandwidth_limit_ms": limit_ms, "threads": args.threads, "rows": args.rows,
                      "max_depth": args.max_depth, "draws": args.draws, "step_size": step,
                      "chains": rows, "ranks": ranks}))


if __name__ == "__main__":
    main()
