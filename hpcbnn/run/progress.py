"""Progress on rank 0 only: a live line on a terminal, periodic plain lines in a batch log."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, enabled: bool, every: int) -> None:
        self.total, self.enabled, self.every = total, enabled, every
        self.tty = sys.stderr.isatty()
        self.start = time.perf_counter()

    def update(self, step: int, epoch: int, loss: float) -> None:
        if not self.enabled or not (self.tty or step % self.every == 0 or step == self.total):
            return
        elapsed = time.perf_counter() - self.start
        width = 30
        done = int(width * step / max(self.total, 1))
        line = (
            f"epoch {epoch} step {step}/{self.total} [{'#' * done}{'.' * (width - done)}] "
            f"loss {loss:.4f} {elapsed:.0f}s"
        )
        if self.tty:
            print("\r" + line, end="", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)

    def message(self, text: str) -> None:
        if self.enabled:
            print(("\n" if self.tty else "") + text, file=sys.stderr, flush=True)
