"""Validate a grid for S samples and B examples, as the training command does first."""

import sys

from hpcbnn.errors import entry_point
from hpcbnn.parallel.grid import ProcessGrid


@entry_point("grid_check")
def main() -> None:
    mode, k, samples, batch = sys.argv[1], int(sys.argv[2]) or None, int(sys.argv[3]), int(sys.argv[4])
    grid = ProcessGrid(mode, k)
    grid.check(samples, batch)
    grid.world.Barrier()
    print("grid ok", flush=True)


main()
