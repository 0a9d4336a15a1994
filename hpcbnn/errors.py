"""Failure policy for MPI jobs: one clear line, every rank exits non-zero, nobody hangs.

A `UsageError` is something the user can fix (bad flag, bad file, impossible grid).
When all ranks detect it together (they validate the same inputs), rank 0 prints it and
every rank exits with `EXIT_USAGE`; the launcher ends the job when rank 0 exits. Should
only some ranks hit it after all (a file missing on one node), a non-root rank prints it
after `GRACE_SECONDS` if it is still alive, so the error is never silent. Anything else
raised on one rank is reported by that rank (with its rank and host) and the whole job is
aborted through MPI, because its peers may be blocked in a collective that never completes.

In a job of several ranks, that report waits a grace period too (rank 0 one, the others two):
an exception can be only the echo of another rank's exit (a peer's connection reset while the
launcher is already ending the job), and such an echo then dies with the job unprinted, so
the cause stays the one message; a failure that every rank hits is reported by rank 0.

A collective that does not complete within --collective_timeout (a peer stopped or hung) is
a `Stalled`: the lowest waiting rank prints its one line at once and aborts the job (exit 1);
the other waiting ranks stay silent unless still alive after the grace.
"""

from __future__ import annotations

import functools
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

EXIT_USAGE = 2
EXIT_FAILURE = 1
EXIT_REQUEUE = 75  # checkpoint written on SIGTERM/SIGUSR1: the job scripts requeue on it
GRACE_SECONDS = 5.0

T = TypeVar("T")


class UsageError(Exception):
    """An error the user caused and can fix; its message says what to change.

    `collective=True` means every rank raises it at the same point, so rank 0 alone
    reports it and no abort is needed; otherwise the raising rank reports and aborts.
    """

    def __init__(self, message: str, *, collective: bool = True) -> None:
        super().__init__(message)
        self.collective = collective


class Stalled(Exception):
    """A collective that did not complete in time; `report` marks the one rank that says so."""

    def __init__(self, message: str, *, report: bool) -> None:
        super().__init__(message)
        self.report = report


def world_rank() -> int:
    """The MPI rank from the launcher's environment, without initialising MPI."""
    for var in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


def _has_peers() -> bool:
    """Whether MPI is running with other ranks that our exit concerns."""
    if "mpi4py.MPI" not in sys.modules:
        return False
    from mpi4py import MPI

    return MPI.Is_initialized() and not MPI.Is_finalized() and MPI.COMM_WORLD.Get_size() > 1


def _abort(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    if _has_peers():
        from mpi4py import MPI

        MPI.COMM_WORLD.Abort(code)
    os._exit(code)


def report(exc: BaseException, prog: str) -> int:
    """Print `exc` the way the policy above says and return the exit code."""
    rank = world_rank()
    if isinstance(exc, UsageError):
        if rank != 0 and exc.collective:
            time.sleep(GRACE_SECONDS)  # normally the launcher ends us here, after rank 0 reported
        where = "" if rank == 0 else f" (rank {rank} on {socket.gethostname()})"
        print(f"{prog}: error{where}: {exc}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    if isinstance(exc, Stalled):
        if not exc.report:
            time.sleep(GRACE_SECONDS)  # the reporting rank's abort normally ends us here
        print(f"{prog}: error: {exc}", file=sys.stderr, flush=True)
        return EXIT_FAILURE
    if _has_peers():
        time.sleep(GRACE_SECONDS if rank == 0 else 2 * GRACE_SECONDS)
    traceback.print_exc()
    print(
        f"{prog}: rank {rank} on {socket.gethostname()} failed: {type(exc).__name__}: {exc}",
        file=sys.stderr,
        flush=True,
    )
    return EXIT_FAILURE


def entry_point(prog: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Wrap a command's `main` so that any failure follows the policy above."""

    def wrap(main: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(main)
        def run(*args: Any, **kwargs: Any) -> T:
            try:
                return main(*args, **kwargs)
            except SystemExit:
                raise
            except BaseException as exc:
                # The launcher ends the job with SIGTERM (SIGKILL only seconds later): a failing
                # rank must die of it at once, even if the command catches it to checkpoint.
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                code = report(exc, prog)
                if isinstance(exc, UsageError) and exc.collective:
                    sys.stderr.flush()
                    os._exit(code)
                _abort(code)
                raise  # unreachable: _abort exits

        return run

    return wrap
