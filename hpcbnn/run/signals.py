"""A scheduler's warning before the end of a job (SIGTERM, SIGUSR1) becomes a request to
checkpoint at the next step boundary; the ranks agree on it, so all of them stop together.

Install it first thing: a warning that arrives during the slow start-up (the data scan, the
resume load) is then remembered and honoured once training starts, instead of killing the
rank with the signal's default action. Evaluation checks it between batches (`agreed` raised
through `Stopping`), so a warning during validation or the final test is honoured within one
batch.
"""

from __future__ import annotations

import signal
from types import FrameType

import numpy as np

from hpcbnn.parallel.grid import ProcessGrid

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Stopping(Exception):
    """Every rank agreed to stop (raised between evaluation batches)."""


class StopRequest:
    def __init__(self) -> None:
        self.signal: int | None = None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signal = signum

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def agreed(self, grid: ProcessGrid) -> bool:
        """Whether any rank was asked to stop (a collective: every rank calls it at the same point)."""
        return grid.allreduce(np.array([float(self.requested)]), "the agreement on a stop request")[0] > 0

    def raise_if_agreed(self, grid: ProcessGrid) -> None:
        if self.agreed(grid):
            raise Stopping
