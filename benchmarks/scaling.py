"""Weak and strong scaling of sample, data and hybrid parallelism, against the machine's ceiling.

    python -m benchmarks.scaling                       # P = 1 .. cores of this machine, mpirun
    python -m benchmarks.scaling --ranks 1 2 4 8 16 --launcher "srun --mpi=pmix"  # in an allocation

Each configuration is one launch of this module's worker: a Bayesian MLP 784-1024-1024-10
on random data, `--steps` timed training steps after a warm-up, 1 thread per rank. Weak
scaling keeps the work per rank fixed (sample: S grows with P; data: B grows with P;
hybrid: S with K and B with D); strong scaling keeps S and B fixed. Efficiency is
t(1)/t(P) (weak) and t(1)/(P t(P)) (strong); the communication share is the time in the
gradient reduction over the step time. The hybrid is measured with both reductions.

The machine ceiling: for each P, one more launch (`worker --ceiling`) of P ranks, placed
by the same launcher, each training the weak-scaling per-rank work (S = --samples-per-rank,
B = --batch-per-rank) alone on a 1-rank grid over MPI.COMM_SELF, with no communication and
no Horovod or torch.distributed; its time is the slowest rank's median step time, and
ceiling(P) = t_ceiling(1) / t_ceiling(P): the efficiency left once P ranks share the node's
cores, caches and memory bandwidth. Every row also gets efficiency_vs_ceiling =
efficiency / ceiling(P).

The backend at rest: for each P, one more launch (`worker --idle`) of the weak sample
configuration with the backend started (Horovod's background thread, Gloo's workers) but
no gradient ever reduced. Its efficiency t_idle(1)/t_idle(P) against the ceiling, `idle`,
is what the backend's presence costs as P grows, and the gap between it and the weak sample
row the reductions'; its step time at P = 1 against the ceiling's shows what the backend
costs a single rank (`idle_step_time`), which the efficiencies, relative to P = 1, leave out.

`--rounds R` launches every configuration and every ceiling R times, round by round, and
reports each one's median: on a shared machine a slow spell then touches every
configuration instead of one (a single round's ceiling at P = 2 ranged 0.80-1.10 here).

Prints a table, then, as the last line, one JSON object
`{"ceiling": {"1": 1.0, "2": ...}, "ceiling_step_time": {"1": s, ...}, "idle": {"1": 1.0, "2": ...},
"idle_step_time": {"1": s, ...}, "rounds": R, "rows": [...]}` (keyed by str(P)); writes OUT/scaling.csv (with a `ceiling` column) and
OUT/scaling.png. Other modules call `run(ranks=..., out=...)`, which returns that object.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import itertools
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import hpcbnn  # noqa: F401  (before the worker's mpi4py: it sets MPI's options, hpcbnn/__init__.py)

WIDTHS = (784, 1024, 1024, 10)
MODES = ("sample", "data", "hybrid")
DEFAULT_LAUNCHER = f"mpirun {'--allow-run-as-root ' if os.geteuid() == 0 else ''}--bind-to core --map-by core"


def worker(args: argparse.Namespace) -> None:
    """Time training steps on this grid (or, with --ceiling, alone on each rank); rank 0 prints one JSON line."""
    import torch
    from mpi4py import MPI
    from torch import nn

    from hpcbnn.bnn.bayesianize import bayesianize
    from hpcbnn.parallel.collectives import Collectives, make_collectives
    from hpcbnn.parallel.engine import Engine
    from hpcbnn.parallel.grid import ProcessGrid

    class Alone(Collectives):
        """Every axis of a 1-rank grid is trivial: these are never called."""

        def _start_allreduce(self, *_):  # type: ignore[no-untyped-def]
            raise AssertionError("the ceiling worker never communicates")

        _broadcast_ = _gather = _start_allreduce

    torch.set_num_threads(1)
    if args.ceiling:
        grid = ProcessGrid("sample", comm=MPI.COMM_SELF)
        comm: Collectives = Alone(grid)
    else:
        grid = ProcessGrid(args.mode, args.sample_group or None)
        comm = make_collectives(grid, args.backend)
        if args.idle:  # the backend started, no gradient reduced: what its presence alone costs
            comm.reducing_gradients = lambda params, hierarchical=False: contextlib.nullcontext([])
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(WIDTHS):
        layers += [nn.Linear(a, b), nn.ReLU()]
    model = bayesianize(nn.Sequential(*layers[:-1]))
    engine = Engine(model, torch.optim.Adam(model.parameters(), lr=1e-3), grid, comm,
                    samples=args.samples, batch_size=args.batch, n_train=60000, seed=0,
                    hierarchical=args.reduction == "hierarchical")
    rows = grid.local_batch(args.batch)
    x = torch.randn(args.batch, WIDTHS[0])[rows]
    y = torch.randint(0, WIDTHS[-1], (args.batch,))[rows]
    times, comms = [], []
    for step in range(args.warmup + args.steps):
        if not args.ceiling:
            grid.world.Barrier()
        start = time.perf_counter()
        result = engine.step(x, y, rows, step)
        elapsed = time.perf_counter() - start
        if not args.ceiling:
            elapsed = grid.world.allreduce(elapsed, op=MPI.MAX)
        if step >= args.warmup:
            times.append(elapsed)
            comms.append(result.comm_s)
    step_time, comm_time = sorted(times)[len(times) // 2], sorted(comms)[len(comms) // 2]
    if args.ceiling:  # each rank's median, the slowest rank's counts
        step_time = MPI.COMM_WORLD.allreduce(step_time, op=MPI.MAX)
    if MPI.COMM_WORLD.Get_rank() == 0:
        print(json.dumps({"step_time": step_time, "comm_time": comm_time}))


def configurations(ranks: list[int], modes: list[str], s0: int, b0: int) -> list[dict]:
    """(scaling, mode, reduction, P, K, S, B) of every launch."""
    top = max(ranks)
    out = []
    for p in ranks:
        for mode in modes:
            k = {"sample": p, "data": 1}.get(mode, _hybrid_k(p))
            d = p // k
            reductions = ["world", "hierarchical"] if mode == "hybrid" and 1 < k < p else ["world"]
            for reduction in reductions:
                out.append(dict(scaling="weak", mode=mode, reduction=reduction, ranks=p, k=k,
                                samples=s0 * k, batch=b0 * d))
                out.append(dict(scaling="strong", mode=mode, reduction=reduction, ranks=p, k=k,
                                samples=s0 * top, batch=b0 * top))
    return out


def _hybrid_k(p: int) -> int:
    """The benchmark's hybrid sample group: the largest power of two K with K*K <= P (a square-ish grid)."""
    k = 1
    while (2 * k) * (2 * k) <= p and p % (2 * k) == 0:
        k *= 2
    return k


def launch(cfg: dict, *, steps: int, warmup: int, backend: str, launcher: str, timeout: float,
           ceiling: bool = False, idle: bool = False) -> dict:
    """One worker launch of `cfg` (ranks, mode, k, samples, batch, reduction): its step and comm time."""
    command = [*shlex.split(launcher), "-np" if launcher.startswith("mpirun") else "-n", str(cfg["ranks"])]
    command += [sys.executable, "-m", "benchmarks.scaling", "worker", "--mode", cfg["mode"],
                "--sample-group", str(cfg["k"]), "--samples", str(cfg["samples"]), "--batch", str(cfg["batch"]),
                "--steps", str(steps), "--warmup", str(warmup), "--backend", backend,
                "--reduction", cfg["reduction"], *(["--ceiling"] if ceiling else []), *(["--idle"] if idle else [])]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    if done.returncode:
        raise SystemExit(f"benchmark launch failed ({' '.join(command)}):\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(ranks: list[int], modes: list[str] | tuple[str, ...] = MODES, samples_per_rank: int = 4,
        batch_per_rank: int = 128, steps: int = 10, warmup: int = 2, backend: str = "horovod",
        launcher: str = DEFAULT_LAUNCHER, timeout: float = 600, out: Path | str = Path("runs/scaling"),
        rounds: int = 1) -> dict:
    """Every configuration and the ceiling per P, `rounds` times in turn (each time the median
    over rounds); writes OUT/scaling.csv and OUT/scaling.png.

    Returns {"ceiling": {str(P): ceiling}, "ceiling_step_time": {str(P): seconds}, "idle": {str(P): x},
    "idle_step_time": {str(P): seconds}, "rounds": rounds, "rows": [...]}.
    """
    if 1 not in ranks:
        raise SystemExit("--ranks must include 1: efficiencies and the ceiling are relative to one rank")
    how = dict(steps=steps, warmup=warmup, backend=backend, launcher=launcher, timeout=timeout)
    configs = configurations(ranks, list(modes), samples_per_rank, batch_per_rank)
    runs: list[list[dict]] = [[] for _ in configs]
    alone_runs: dict[int, list[float]] = {p: [] for p in ranks}
    idle_runs: dict[int, list[float]] = {p: [] for p in ranks}
    for _ in range(rounds):  # in turn, so that a slow spell of a shared machine touches every configuration
        for cfg, results in zip(configs, runs):
            results.append(launch(cfg, **how))
        for p in ranks:
            alone_runs[p].append(launch(dict(ranks=p, mode="sample", k=1, samples=samples_per_rank,
                                             batch=batch_per_rank, reduction="world"), ceiling=True, **how)["step_time"])
        for p in idle_runs:
            idle_runs[p].append(launch(dict(ranks=p, mode="sample", k=p, samples=samples_per_rank * p,
                                            batch=batch_per_rank, reduction="world"), idle=True, **how)["step_time"])
    rows = [{**cfg, "step_time": statistics.median(r["step_time"] for r in results),
             "comm_time": statistics.median(r["comm_time"] for r in results)} for cfg, results in zip(configs, runs)]
    alone = {p: statistics.median(t) for p, t in alone_runs.items()}
    ceiling = {str(p): alone[1] / alone[p] for p in ranks}
    idle_time = {p: statistics.median(t) for p, t in idle_runs.items()}
    idle = {str(p): idle_time[1] / idle_time[p] / ceiling[str(p)] for p in ranks}
    for row in rows:
        base = next(r for r in rows if (r["scaling"], r["mode"], r["ranks"]) == (row["scaling"], row["mode"], 1))
        ideal = 1 if row["scaling"] == "weak" else row["ranks"]
        row["efficiency"] = base["step_time"] / (ideal * row["step_time"])
        row["comm_share"] = row["comm_time"] / row["step_time"]
        row["ceiling"] = ceiling[str(row["ranks"])]
        row["efficiency_vs_ceiling"] = row["efficiency"] / row["ceiling"]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "scaling.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    from hpcbnn.run.plots import scaling_plot

    scaling_plot([{**r, "mode": r["mode"] + ("/hier" if r["reduction"] == "hierarchical" else "")}
                  for r in rows], out / "scaling.png")
    return {"ceiling": ceiling, "ceiling_step_time": {str(p): t for p, t in alone.items()}, "idle": idle,
            "idle_step_time": {str(p): t for p, t in idle_time.items()}, "rounds": rounds, "rows": rows}


def table(result: dict) -> str:
    """The ceiling per P, then one line per configuration."""
    lines = ["machine ceiling (P ranks alone, no communication): " + "  ".join(
        f"P={p} {c:.2f} ({result['ceiling_step_time'][p]:.4f} s)" for p, c in result["ceiling"].items()),
        "backend started, no reduction (weak sample), efficiency / ceiling: " + "  ".join(
            f"P={p} {x:.2f} ({result['idle_step_time'][p]:.4f} s)" for p, x in result["idle"].items()),
        f"{'scaling':8} {'mode':7} {'reduction':12} {'P':>3} {'K':>3} {'S':>4} {'B':>5} "
        f"{'step s':>8} {'comm':>6} {'eff':>6} {'ceil':>6} {'eff/ceil':>8}"]
    for r in result["rows"]:
        lines.append(f"{r['scaling']:8} {r['mode']:7} {r['reduction']:12} {r['ranks']:3d} {r['k']:3d} "
                     f"{r['samples']:4d} {r['batch']:5d} {r['step_time']:8.4f} {r['comm_share']:6.1%} "
                     f"{r['efficiency']:6.2f} {r['ceiling']:6.2f} {r['efficiency_vs_ceiling']:8.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scaling", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    w = sub.add_parser("worker", help="(internal) one timed configuration, under the launcher")
    w.add_argument("--mode", required=True)
    w.add_argument("--sample-group", type=int, default=0)
    w.add_argument("--samples", type=int, required=True)
    w.add_argument("--batch", type=int, required=True)
    w.add_argument("--steps", type=int, default=10)
    w.add_argument("--warmup", type=int, default=2)
    w.add_argument("--backend", default="horovod")
    w.add_argument("--reduction", default="world")
    w.add_argument("--ceiling", action="store_true", help="each rank alone on COMM_SELF, no communication")
    w.add_argument("--idle", action="store_true", help="the backend started, no gradient reduced")
    parser.add_argument("--ranks", type=int, nargs="+", default=[p for p in (1, 2, 4, 8) if p <= os.cpu_count()])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--samples-per-rank", type=int, default=4, help="weak scaling: S/K (default 4)")
    parser.add_argument("--batch-per-rank", type=int, default=128, help="weak scaling: B/D (default 128)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--backend", default="horovod", choices=("horovod", "torch"))
    parser.add_argument("--launcher", default=DEFAULT_LAUNCHER,
                        help="launch command; given -np P (mpirun...) or -n P (srun...)")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--out", type=Path, default=Path("runs/scaling"))
    parser.add_argument("--rounds", type=int, default=1,
                        help="launch every configuration and ceiling this many times in turn; report medians")
    args = parser.parse_args(argv)
    if args.command == "worker":
        worker(args)
        return
    options = {k: v for k, v in vars(args).items() if k != "command"}
    result = run(**options)
    print(table(result))
    print(f"wrote {args.out / 'scaling.csv'} and {args.out / 'scaling.png'}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
