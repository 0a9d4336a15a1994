"""Open a data file on every rank, rank 0 scanning the values: `data_open.py FILE SPLIT`.

`{rank}` in FILE is replaced by the rank, so ranks can be shown different files.
"""

from __future__ import annotations

import sys

from mpi4py import MPI

from hpcbnn.data import open_dataset
from hpcbnn.errors import entry_point


@entry_point("data_open")
def main() -> None:
    rank = MPI.COMM_WORLD.Get_rank()
    info = open_dataset(sys.argv[1].format(rank=rank), sys.argv[2], comm=MPI.COMM_WORLD)
    print(f"rank {rank}: {info.n} examples")


if __name__ == "__main__":
    main()
