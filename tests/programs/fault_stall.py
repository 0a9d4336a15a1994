"""One rank stops (SIGSTOP) while its peers enter a collective: `fault_stall.py BACKEND RANK WHERE TIMEOUT [RUN_DIR]`.

Every rank builds the real grid and collectives with a collective timeout of TIMEOUT seconds
and completes one allreduce; then rank RANK stops itself while the others enter WHERE:
`backend` (an allreduce of the backend, as the gradient reduction), `loss` (the MPI allreduce
of the training loop), or `checkpoint` (RunDir.save into RUN_DIR: RANK stops inside the
write, the others wait to hear how it went). The job must end on its own.
"""

from __future__ import annotations

import os
import signal
import sys

import numpy as np
import torch

from hpcbnn.errors import entry_point
from hpcbnn.parallel.collectives import make_collectives
from hpcbnn.parallel.grid import ProcessGrid
from hpcbnn.run import rundir
from hpcbnn.run.config import parse_config
from hpcbnn.run.signals import StopRequest


def stop_here() -> None:
    print(f"rank {os.environ['OMPI_COMM_WORLD_RANK']}: stopping", flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)


@entry_point("fault_stall")
def main() -> None:
    backend, victim, where, timeout = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
    StopRequest()  # like training: SIGTERM is a request to stop, not the end
    grid = ProcessGrid("sample", device="cpu", timeout=timeout)
    comm = make_collectives(grid, backend)
    t = torch.ones(4)
    comm.allreduce_([t], "world")
    print(f"rank {grid.rank}: first allreduce done", flush=True)
    if where == "checkpoint":
        run = rundir.RunDir(parse_config(["--run_dir", sys.argv[5]]), grid)
        if grid.rank == victim:
            write = rundir.save_checkpoint

            def stopped_write(*args, **kwargs):  # type: ignore[no-untyped-def]
                stop_here()
                return write(*args, **kwargs)

            rundir.save_checkpoint = stopped_write
        run.save(7, {"model": {"w": torch.zeros(2)}}, {})
    else:
        if grid.rank == victim:
            stop_here()
        if where == "backend":
            comm.allreduce_([t], "world")
        else:
            grid.allreduce(np.ones(1), "the loss of step 1")
    print(f"rank {grid.rank}: the collective completed, which it must not", flush=True)


if __name__ == "__main__":
    main()
