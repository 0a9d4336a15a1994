"""Weak and strong scaling of sample, data and hybrid parallelism (prints a table, writes CSV + PNG).

    python -m benchmarks.scaling                       # P = 1 .. cores of this machine, mpirun
    python -m benchmarks.scaling --ranks 1 2 4 8 16 --launcher "srun --mpi=pmix"  # in an allocation

Each configuration is one launch of this module's worker: a Bayesian MLP 784-1024-1024-10
on random data, `--steps` timed training steps after a warm-up, 1 thread per rank. Weak
scaling keeps the work per rank fixed (sample: S grows with P; data: B grows with P;
hybrid: S with K and B with D); strong scaling keeps S and B fixed. Efficiency is
t(1)/t(P) (weak) and t(1)/(P t(P)) (strong); the communication share is the time in the
gradient reduction over the step time. The hybrid is measured with both reductions.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

WIDTHS = (784, 1024, 1024, 10)


def worker(args: argparse.Namespace) -> None:
    """Time training steps on this grid; rank 0 prints one JSON line."""
    import torch
    from torch import nn

    from hpcbnn.bnn.bayesianize import bayesianize
    from hpcbnn.parallel.collectives import make_collectives
    from hpcbnn.parallel.engine import Engine
    from hpcbnn.parallel.grid import ProcessGrid

    torch.set_num_threads(1)
    grid = ProcessGrid(args.mode, args.sample_group or None)
    comm = make_collectives(grid, args.backend)
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
        grid.world.Barrier()
        start = time.perf_counter()
        result = engine.step(x, y, rows, step)
        elapsed = grid.world.allreduce(time.perf_counter() - start, op=_max())
        if step >= args.warmup:
            times.append(elapsed)
            comms.append(result.comm_s)
    if grid.is_root:
        times.sort()
        print(json.dumps({"step_time": times[len(times) // 2], "comm_time": sorted(comms)[len(comms) // 2]}))


def _max():  # type: ignore[no-untyped-def]
    from mpi4py import MPI

    return MPI.MAX


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


def launch(cfg: dict, args: argparse.Namespace) -> dict:
    command = [*shlex.split(args.launcher), "-np", str(cfg["ranks"])] if args.launcher.startswith("mpirun") \
        else [*shlex.split(args.launcher), "-n", str(cfg["ranks"])]
    command += [sys.executable, "-m", "benchmarks.scaling", "worker", "--mode", cfg["mode"],
                "--sample-group", str(cfg["k"]), "--samples", str(cfg["samples"]), "--batch", str(cfg["batch"]),
                "--steps", str(args.steps), "--warmup", str(args.warmup), "--backend", args.backend,
                "--reduction", cfg["reduction"]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=args.timeout)
    if done.returncode:
        raise SystemExit(f"benchmark launch failed ({' '.join(command)}):\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


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
    parser.add_argument("--ranks", type=int, nargs="+", default=[p for p in (1, 2, 4, 8) if p <= os.cpu_count()])
    parser.add_argument("--modes", nargs="+", default=["sample", "data", "hybrid"])
    parser.add_argument("--samples-per-rank", type=int, default=4, help="weak scaling: S/K (default 4)")
    parser.add_argument("--batch-per-rank", type=int, default=128, help="weak scaling: B/D (default 128)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--backend", default="horovod", choices=("horovod", "torch"))
    root = "--allow-run-as-root " if os.geteuid() == 0 else ""
    parser.add_argument("--launcher", default=f"mpirun {root}--bind-to core --map-by core",
                        help="launch command; given -np P (mpirun...) or -n P (srun...)")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--out", type=Path, default=Path("runs/scaling"))
    args = parser.parse_args(argv)
    if args.command == "worker":
        worker(args)
        return
    rows = []
    for cfg in configurations(args.ranks, args.modes, args.samples_per_rank, args.batch_per_rank):
        rows.append({**cfg, **launch(cfg, args)})
    for row in rows:
        base = next(r for r in rows if (r["scaling"], r["mode"], r["ranks"]) == (row["scaling"], row["mode"], 1))
        ideal = 1 if row["scaling"] == "weak" else row["ranks"]
        row["efficiency"] = base["step_time"] / (ideal * row["step_time"])
        row["comm_share"] = row["comm_time"] / row["step_time"]
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "scaling.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    from hpcbnn.run.plots import scaling_plot

    scaling_plot([{**r, "mode": r["mode"] + ("/hier" if r["reduction"] == "hierarchical" else "")}
                  for r in rows], args.out / "scaling.png")
    print(f"{'scaling':8} {'mode':7} {'reduction':12} {'P':>3} {'K':>3} {'S':>4} {'B':>5} "
          f"{'step s':>8} {'comm':>6} {'eff':>6}")
    for r in rows:
        print(f"{r['scaling']:8} {r['mode']:7} {r['reduction']:12} {r['ranks']:3d} {r['k']:3d} {r['samples']:4d} "
              f"{r['batch']:5d} {r['step_time']:8.4f} {r['comm_share']:6.1%} {r['efficiency']:6.2f}")
    print(f"wrote {args.out / 'scaling.csv'} and {args.out / 'scaling.png'}")


if __name__ == "__main__":
    main()
