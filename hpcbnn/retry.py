"""Bounded retry of reads that a parallel file system fails transiently.

Lustre, GPFS and NFS answer EIO, ESTALE, a timeout or a briefly missing file during a
server fail-over or under heavy load, and the same read a few seconds later succeeds.
`retrying` repeats a read on `OSError` a few times with a doubling pause, announcing every
failure on stderr (rank, host, what, error, next try), and re-raises the last error once
the bound is reached, so the caller fails with its own message instead of hanging. Every
OSError counts as possibly transient: a permanent one (a damaged file) costs the few
seconds of the pauses and then fails the same way.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Callable
from typing import TypeVar

from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from hpcbnn.errors import world_rank

ATTEMPTS = 5
FIRST_PAUSE_S = 0.5  # then 1, 2, 4: at most 7.5 s of waiting before the read gives up
MAX_PAUSE_S = 8.0

T = TypeVar("T")


def retrying(read: Callable[[], T], what: str, *, attempts: int = ATTEMPTS, pause: float = FIRST_PAUSE_S) -> T:
    """`read()`, tried up to `attempts` times while it raises OSError; `what` names it in messages."""

    def announce(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0.0
        print(
            f"hpcbnn: rank {world_rank()} on {socket.gethostname()}: reading {what} failed "
            f"({error}); attempt {state.attempt_number} of {attempts}, retrying in {wait:g} s",
            file=sys.stderr,
            flush=True,
        )

    policy = Retrying(
        stop=stop_after_attempt(attempts),
        retry=retry_if_exception_type(OSError),
        wait=wait_exponential(multiplier=pause, max=MAX_PAUSE_S),
        before_sleep=announce,
        reraise=True,
    )
    return policy(read)
