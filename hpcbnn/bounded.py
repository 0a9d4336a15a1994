"""Collectives that end: a stopped or hung rank costs its peers a bounded wait, not the allocation.

Every collective of a run is started without blocking and its completion polled against a
deadline (--collective_timeout). When it passes, `stalled` finds out which ranks never
arrived and raises `hpcbnn.errors.Stalled` with one line that names them; `entry_point`
prints it on one rank and aborts the job (exit 1). mpi4py's object collectives have no
non-blocking form that pickles, so `bcast` and `allgather` move a pickle's size, then its
bytes, with buffer collectives.

    wait_for(comm.Ibarrier().Test, "the checkpoint barrier", comm, timeout=600)
    values = allgather(comm, my_value, "the check of the data file", timeout=600)
"""

from __future__ import annotations

import pickle
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from hpcbnn.errors import Stalled

if TYPE_CHECKING:  # the data layer uses this module without starting MPI
    from mpi4py import MPI

COLLECTIVE_TIMEOUT_S = 600.0
ROLL_CALL_S = 3.0  # how long a rank whose collective timed out listens for the peers stuck like it
_ROLL_CALL_TAG = 0x4850  # point-to-point on the communicator: never matches a collective
_UNFINISHED: list[Any] = []  # a roll call's requests and their buffers, alive until the job ends


def wait_for(done: Callable[[], bool], what: str, comm: MPI.Comm, timeout: float) -> None:
    """Poll `done` until it is true; after `timeout` seconds raise `Stalled` (see `stalled`).

    Every collective of a run waits here, so a stopped or hung rank ends the job within
    --collective_timeout instead of at the scheduler's limit. The pause between polls grows
    from 10 us to 1 ms: a fast collective is seen done at most 1 ms late (at 5 ms, that lateness
    was a measured 3-5% of a 2-rank step), and a slow one costs next to no CPU.
    """
    if done():
        return
    deadline, pause = time.monotonic() + timeout, 1e-5
    while not done():
        if time.monotonic() > deadline:
            raise stalled(what, comm, timeout)
        time.sleep(pause)
        pause = min(2 * pause, 1e-3)


def bcast(comm: MPI.Comm, value: Any, what: str, timeout: float) -> Any:
    """Rank 0's picklable `value` on every rank of `comm`, bounded: the pickle's size, then its bytes."""
    data = np.frombuffer(pickle.dumps(value), np.uint8) if comm.Get_rank() == 0 else None
    size = np.array([0 if data is None else data.size], np.int64)
    wait_for(comm.Ibcast(size, root=0).Test, what, comm, timeout)
    buffer = data.copy() if data is not None else np.empty(int(size[0]), np.uint8)
    wait_for(comm.Ibcast(buffer, root=0).Test, what, comm, timeout)
    return pickle.loads(buffer.tobytes())


def allgather(comm: MPI.Comm, value: Any, what: str, timeout: float) -> list[Any]:
    """Every rank's picklable `value`, in rank order, bounded: the sizes, then the bytes."""
    data = np.frombuffer(pickle.dumps(value), np.uint8)
    sizes = np.empty(comm.Get_size(), np.int64)
    wait_for(comm.Iallgather(np.array([data.size], np.int64), sizes).Test, what, comm, timeout)
    out = np.empty(int(sizes.sum()), np.uint8)
    wait_for(comm.Iallgatherv(data.copy(), [out, sizes]).Test, what, comm, timeout)
    ends = np.cumsum(sizes)
    return [pickle.loads(out[end - n : end].tobytes()) for n, end in zip(sizes, ends)]


def stalled(what: str, comm: MPI.Comm, timeout: float) -> Stalled:
    """The error of a collective that did not complete, naming the ranks that never reached one.

    A roll call tells them apart: every rank whose wait timed out sends its rank to all the
    others and listens for `ROLL_CALL_S` (at most `timeout`); the ranks it hears from are stuck like it, those it
    does not are stopped, hung or busy elsewhere. The lowest rank that answered reports
    (`Stalled.report`), so the job prints one line.
    """
    rank, size = comm.Get_rank(), comm.Get_size()
    mine = np.array([rank], np.int64)
    sends = [comm.Isend(mine, dest=r, tag=_ROLL_CALL_TAG) for r in range(size) if r != rank]
    heard = {r: np.full(1, -1, np.int64) for r in range(size) if r != rank}
    receives = {r: comm.Irecv(heard[r], source=r, tag=_ROLL_CALL_TAG) for r in heard}
    deadline = time.monotonic() + min(ROLL_CALL_S, timeout)
    while time.monotonic() < deadline and not all(q.Test() for q in receives.values()):
        time.sleep(0.01)
    _UNFINISHED.append((sends, mine, receives, heard))  # never waited for: the job ends next
    stuck = sorted({rank} | {r for r, q in receives.items() if q.Test()})
    absent = [r for r in range(size) if r not in stuck]
    who = (
        f"rank{'s' if len(absent) > 1 else ''} {_ranks(absent)} never reached it (stopped, hung, or busy "
        f"longer than that: raise --collective_timeout if the work is that slow)"
        if absent
        else "every rank waits in a collective, but not in the same one (a bug: please report it)"
    )
    message = f"rank {rank} on {socket.gethostname()}: {what} did not complete within {timeout:g} s: {who}"
    return Stalled(message, report=rank == stuck[0])


def _ranks(ranks: list[int], shown: int = 8) -> str:
    listed = ", ".join(map(str, ranks[:shown]))
    return listed if len(ranks) <= shown else f"{listed}, ... ({len(ranks)} in all)"
