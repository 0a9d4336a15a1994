"""Reading a split's rows: in this process, or in a reader process per streaming Loader.

`Rows` reads rows in few grouped HDF5 calls with retries, or holds them preloaded. h5py
holds the GIL while it reads, so a prefetch thread that streams from the file slows the
training thread (measured 15-25% of a step, docs/data-format.md). A `Reader` runs the same
reads in a separate process, which has its own GIL: it normalises each batch into one of a
ring of shared-memory slots and says which; the training process copies the slot out once
(a memcpy that releases the GIL) and hands the slot back.

The reader is a fresh interpreter (`subprocess`), neither a fork nor multiprocessing's
spawn: the training process runs under MPI, and a forked child of an MPI process, or one
that re-imports the program's main module, may touch MPI. It imports this module, the data
format, numpy, h5py and tenacity; not mpi4py, and not torch (the hpcbnn.data package's
`__init__` is bypassed: a torch import costs the reader about 1.5 s and 0.5 GB). It ends when
its pipe closes, so it never outlives the training process, and the training process gives
up on it within bounded time: a reader that exits is noticed within a poll interval, one
that stops answering after `timeout` seconds.

Protocol (pickles over two pipes), every message of an epoch tagged with its serial number:
training -> reader  ("setup", info, shared memory name, slots shape) once,
                    ("epoch", id, index [steps, rows], scale, shift), ("free", id, slot),
                    ("stop", id) when the consumer stops early, ("quit",)
reader -> training  ("ready", id, step, slot), ("error", id, usage, message)
"""

from __future__ import annotations

import mmap
import os
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Generator
from contextlib import suppress
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path

import h5py
import numpy as np

from hpcbnn.data.format import DatasetInfo, open_h5
from hpcbnn.errors import UsageError
from hpcbnn.retry import retrying

BOOT = """import sys, types
data = types.ModuleType("hpcbnn.data")  # hpcbnn/data/__init__.py imports torch, which the reader does not need
data.__path__ = [{data!r}]
sys.modules["hpcbnn.data"] = data
from hpcbnn.data.reader import serve
serve({inbox}, {outbox})
"""
POLL_S = 0.2  # how often a waiting training process checks that its reader is alive
QUIT_S = 5.0  # how long close() waits for the reader to exit before killing it
Message = tuple


def read_rows(x: h5py.Dataset, sorted_index: np.ndarray, gap: int) -> np.ndarray:
    """Rows `sorted_index` of `x` in few contiguous reads: runs closer than `gap` rows share one.

    A read of a few unwanted rows inside the same chunk costs less than another HDF5 call
    (which decodes and checksums that chunk again).
    """
    out = np.empty((len(sorted_index),) + x.shape[1:], x.dtype)
    breaks = np.flatnonzero(np.diff(sorted_index) > gap) + 1
    for s, e in zip(np.r_[0, breaks].tolist(), np.r_[breaks, len(sorted_index)].tolist()):
        lo, hi = int(sorted_index[s]), int(sorted_index[e - 1]) + 1
        block = x[lo:hi]
        out[s:e] = block if hi - lo == e - s else block[sorted_index[s:e] - lo]
    return out


class Rows:
    """The split's inputs for this process: a lazily opened file (never one inherited
    across fork: it reopens when the process id changes) or rows preloaded into memory."""

    def __init__(self, info: DatasetInfo) -> None:
        self.info = info
        self.pid = -1
        self.file: h5py.File | None = None
        self.memory: np.ndarray | None = None
        self.held: np.ndarray | None = None  # sorted global indices of the rows in memory; None: all

    def dataset(self) -> h5py.Dataset:
        if self.file is None or self.pid != os.getpid():
            self.file, self.pid = open_h5(self.info.path), os.getpid()
        return self.file[self.info.split]["x"]

    def preload(self, needed: np.ndarray | None) -> None:
        """Hold rows `needed` (sorted, unique; None: all) in memory."""
        self.held = needed
        self.memory = self._read_file(np.arange(self.info.n) if needed is None else needed)

    def read(self, index: np.ndarray) -> np.ndarray:
        """Rows `index`, in that order."""
        if self.memory is not None:
            return self.memory[index if self.held is None else np.searchsorted(self.held, index)]
        sort = np.argsort(index, kind="stable")
        rows = np.empty((len(index),) + self.info.input_shape, self.info.x_dtype)
        rows[sort] = self._read_file(index[sort])
        return rows

    def _read_file(self, sorted_index: np.ndarray) -> np.ndarray:
        def read() -> np.ndarray:
            try:
                x = self.dataset()
                return read_rows(x, sorted_index, x.chunks[0] if x.chunks else 1)
            except OSError:
                self.close()  # the next attempt reopens the file: a stale handle (NFS ESTALE) stays stale
                raise

        try:
            return retrying(read, f"/{self.info.split}/x of {self.info.path}")
        except OSError as exc:
            raise UsageError(
                f"{self.info.path}: cannot read /{self.info.split}/x ({exc}); the "
                f"file is damaged, re-convert or copy it again",
                collective=False,
            ) from None

    def close(self) -> None:
        if self.file is not None and self.pid == os.getpid():
            self.file.close()
        self.file = None


class ReaderError(RuntimeError):
    """The reader process died, failed unexpectedly or stopped answering."""


def shared_memory_free() -> int:
    """Bytes free in /dev/shm, where the slots live: a container's is often only 64 MiB, and
    writing past its end kills the reader with SIGBUS."""
    fs = os.statvfs("/dev/shm")
    return fs.f_bavail * fs.f_frsize


class Reader:
    """The training side: starts the reader process, hands out its batches as float32 arrays."""

    def __init__(self, info: DatasetInfo, rows: int, slots: int, timeout: float) -> None:
        self.info, self.timeout = info, timeout
        self.what = f"the reader process of /{info.split}/x of {info.path}"
        shape = (slots, rows, *info.input_shape)
        self.memory = SharedMemory(create=True, size=self.size(info, rows, slots))
        self.slots = np.ndarray(shape, np.float32, buffer=self.memory.buf)
        child_in, to_child = os.pipe()
        from_child, child_out = os.pipe()
        root = str(Path(__file__).resolve().parents[2])  # hpcbnn importable whatever the cwd
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-c", BOOT.format(data=str(Path(__file__).parent), inbox=child_in, outbox=child_out)],
                pass_fds=(child_in, child_out),
                env=env,
            )
        except OSError:
            for fd in (child_in, to_child, from_child, child_out):
                os.close(fd)
            del self.slots
            self.memory.close()
            self.memory.unlink()
            raise
        os.close(child_in)
        os.close(child_out)
        self.outbox, self.inbox = Connection(to_child, readable=False), Connection(from_child, writable=False)
        self.lock = threading.Lock()  # one epoch's consumer at a time talks to the reader
        self.epoch_id, self.pid = 0, os.getpid()
        self._send(("setup", info, self.memory.name, shape))
        self.close = weakref.finalize(self, _shutdown, os.getpid(), self.process, self.outbox, self.inbox, self.memory)

    @staticmethod
    def size(info: DatasetInfo, rows: int, slots: int) -> int:
        """Bytes of shared memory for `slots` batches of `rows` normalised rows."""
        return 4 * slots * rows * int(np.prod(info.input_shape))

    def batches(self, index: np.ndarray, scale: np.ndarray, shift: np.ndarray) -> Generator[np.ndarray, None, None]:
        """The normalised inputs of rows `index[t]` for every step t; a new epoch supersedes this one."""
        with self.lock:
            self.epoch_id += 1
            epoch = self.epoch_id
            self._send(("epoch", epoch, index, scale, shift))
        finished = False
        try:
            for step in range(len(index)):
                slot = self._wait(epoch, step)
                x = self.slots[slot].copy()
                self._send(("free", epoch, slot))
                yield x
            finished = True
        finally:
            if not finished:
                self._send(("stop", epoch))

    def _wait(self, epoch: int, step: int) -> int:
        """The slot holding batch `step` of `epoch`; raises instead of waiting forever."""
        deadline = time.monotonic() + self.timeout
        while True:
            with self.lock:
                if epoch != self.epoch_id:
                    raise ReaderError(f"{self.what}: epoch superseded by a newer one (a Loader streams one at a time)")
                try:
                    message = self.inbox.recv() if self.inbox.poll(POLL_S) else None
                except (EOFError, OSError):
                    raise self._gone(step) from None
            if message is not None and message[1] == epoch:
                if message[0] == "error":
                    _, _, usage, text = message
                    if usage:
                        raise UsageError(text, collective=False)
                    raise ReaderError(f"{self.what} failed: {text}")
                if message[2] != step:
                    raise ReaderError(f"{self.what} sent batch {message[2]}, expected {step}")
                return message[3]
            if message is None and self.process.poll() is not None:
                raise self._gone(step)
            if time.monotonic() > deadline:
                raise ReaderError(f"{self.what} has not delivered batch {step} in {self.timeout:g} s")

    def _gone(self, step: int) -> ReaderError:
        """The error for a reader that closed its pipe: it exited (or is exiting; its code is awaited briefly)."""
        with suppress(subprocess.TimeoutExpired):
            self.process.wait(QUIT_S)
        return ReaderError(
            f"{self.what} exited with code {self.process.returncode} before batch {step} of the epoch "
            f"(a negative code is the signal that ended it, e.g. -9: killed, often for memory)"
        )

    def _send(self, message: Message) -> None:
        with suppress(OSError):  # the reader is gone: the next wait says so
            self.outbox.send(message)

    @property
    def alive(self) -> bool:
        return self.close.alive and self.pid == os.getpid()


def _shutdown(
    owner: int, process: subprocess.Popen, outbox: Connection, inbox: Connection, memory: SharedMemory
) -> None:
    """Stop the reader and free the shared memory (also at interpreter exit); a forked child, which
    shares them with its parent, leaves them alone."""
    if os.getpid() != owner:
        return
    with suppress(OSError):
        outbox.send(("quit",))
    outbox.close()
    try:
        process.wait(QUIT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    inbox.close()
    memory.unlink()
    with suppress(BufferError):  # a view of a slot is still alive: the mapping goes with it
        memory.close()


def serve(inbox_fd: int, outbox_fd: int) -> None:
    """The reader process: answer epochs until told to quit or the training process goes away."""
    inbox, outbox = Connection(inbox_fd, writable=False), Connection(outbox_fd, readable=False)
    try:
        _, info, name, shape = inbox.recv()
        with open(f"/dev/shm/{name}", "r+b") as f:  # not SharedMemory: its tracker would unlink it at our exit
            memory = mmap.mmap(f.fileno(), 0)
        slots = np.ndarray(shape, np.float32, buffer=memory)
        source = Rows(info)
        message: Message | None = inbox.recv()
        while message is not None and message[0] != "quit":
            message = _epoch(message, slots, source, inbox, outbox) if message[0] == "epoch" else inbox.recv()
    except (EOFError, OSError, KeyboardInterrupt):
        pass  # the training process closed the pipe or is gone


def _epoch(message: Message, slots: np.ndarray, source: Rows, inbox: Connection, outbox: Connection) -> Message | None:
    """Fill free slots with the epoch's batches in order; returns the next message that is not this epoch's."""
    _, epoch, index, scale, shift = message
    free = list(range(len(slots)))
    for step, rows in enumerate(index):
        while not free or inbox.poll():
            message = inbox.recv()
            if message[0] == "free" and message[1] == epoch:
                free.append(message[2])
            elif message[0] in ("epoch", "quit") or message[1] == epoch:  # a new epoch, quit, or our stop
                return message if message[0] != "stop" else inbox.recv()
        slot = free.pop(0)
        try:
            raw = source.read(rows)
        except Exception as exc:  # every failure goes back to the training process
            usage = isinstance(exc, UsageError)  # the loader's own message: the file and what to do
            outbox.send(("error", epoch, usage, str(exc) if usage else f"{type(exc).__name__}: {exc}"))
            return inbox.recv()
        np.multiply(raw, scale, out=slots[slot])  # as Loader._batch: float32(x) * scale + shift
        np.add(slots[slot], shift, out=slots[slot])
        outbox.send(("ready", epoch, step, slot))
    return inbox.recv()
