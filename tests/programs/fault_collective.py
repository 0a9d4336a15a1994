"""One rank fails while its peers wait in a collective: `fault_collective.py BACKEND FAULT [RANK]`.

Every rank builds the real grid and collectives and completes one allreduce; then rank RANK
(default 1) fails with FAULT while the others enter a second allreduce that can never
complete. FAULT is `bug` (a RuntimeError), `oom` (a real allocation the CPU allocator
refuses) or `usage` (a UsageError only that rank detects). The job must end on its own.
Like training, every rank catches SIGTERM as a request to stop at the next step.
"""

from __future__ import annotations

import sys

import torch

from hpcbnn.parallel.collectives import make_collectives
from hpcbnn.errors import UsageError, entry_point
from hpcbnn.parallel.grid import ProcessGrid
from hpcbnn.run.signals import StopRequest


def fail(fault: str) -> None:
    if fault == "bug":
        raise RuntimeError("injected bug")
    if fault == "oom":
        torch.empty(2**62, dtype=torch.uint8)
    if fault == "usage":
        raise UsageError("injected: only this rank's file is missing; copy it to every node",
                         collective=False)
    raise ValueError(f"unknown fault {fault!r}")


@entry_point("fault_collective")
def main() -> None:
    backend, fault = sys.argv[1], sys.argv[2]
    victim = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    StopRequest()
    grid = ProcessGrid("sample")
    comm = make_collectives(grid, backend)
    t = torch.ones(4)
    comm.allreduce_([t], "world")
    print(f"rank {grid.rank}: first allreduce done", flush=True)
    if grid.rank == victim:
        fail(fault)
    comm.allreduce_([t], "world")
    print(f"rank {grid.rank}: second allreduce completed, which it must not", flush=True)


if __name__ == "__main__":
    main()
