"""How long does the gradient reduction of one step take? hpcbnn's backends against MPI itself.

    python -m benchmarks.allreduce [--ranks 2] [--floats 3727380] [--tensors 6] [--repeats 15]

Launches P ranks under `mpirun --bind-to core` (one thread each). Each rank holds gradients
shaped like the Bayesian MLP 784-1024-1024-10 of benchmarks.scaling (mean and rho of three
layers: 3.7M float32, 14.9 MB, in 6 tensors) and times, as medians after a barrier:

  horovod         hpcbnn's Horovod collectives: `allreduce_` (grouped, averaged in place)
  torch           hpcbnn's torch.distributed collectives (Gloo on CPU): fused copy, all_reduce, copy back
  gloo, flat      one torch.distributed all_reduce of a buffer already flat (no copies)
  mpi, flat       one MPI_Allreduce (mpi4py, shared memory) of the flat buffer: the reference

The last line is JSON: {"ranks": P, "mb": ..., "ms": {NAME: median ms}}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

from benchmarks.launch import mpirun


def worker(args: argparse.Namespace) -> None:
    import torch
    from mpi4py import MPI

    from hpcbnn.parallel.collectives import make_collectives
    from hpcbnn.parallel.grid import ProcessGrid

    torch.set_num_threads(1)
    grid = ProcessGrid("sample")
    sizes = [args.floats // args.tensors] * args.tensors
    grads = [torch.randn(n) for n in sizes]
    flat = torch.randn(sum(sizes))
    world = MPI.COMM_WORLD

    def timed(fn: Callable[[], object]) -> float:
        fn()
        runs = []
        for _ in range(args.repeats):
            world.Barrier()
            start = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - start)
        return 1e3 * statistics.median(runs)

    # MPI first: once Horovod's background thread runs, it shares MPI with the caller.
    ms = {"mpi, flat": timed(lambda: world.Allreduce(MPI.IN_PLACE, flat.numpy()))}
    for backend in ("horovod", "torch"):
        try:
            comm = make_collectives(grid, backend)
        except ImportError:
            continue  # Horovod not installed
        ms[backend] = timed(lambda comm=comm: comm.allreduce_(grads))
    if "torch" in ms:
        import torch.distributed as dist

        ms["gloo, flat"] = timed(lambda: dist.all_reduce(flat))
    if world.rank == 0:
        print(json.dumps({"ranks": world.size, "mb": 4 * sum(sizes) / 1e6, "ms": ms}))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.allreduce", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--floats", type=int, default=3_727_380, help="gradient floats per rank")
    parser.add_argument("--tensors", type=int, default=6, help="how many tensors they are split into")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return
    cmd = [*mpirun(args.ranks, bind_to="core"), "-x", "OMP_NUM_THREADS=1", sys.executable, "-m", "benchmarks.allreduce",
           "--worker", "--floats", str(args.floats), "--tensors", str(args.tensors), "--repeats", str(args.repeats)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    reference = result["ms"]["mpi, flat"]
    print(f"{result['ranks']} ranks, {result['mb']:.1f} MB of float32 gradients in {args.tensors} tensors; "
          f"median of {args.repeats}")
    print(f"{'reduction':<12}{'ms':>8}{'vs MPI':>8}")
    for name, ms in result["ms"].items():
        print(f"{name:<12}{ms:>8.2f}{ms / reference:>7.1f}x")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
