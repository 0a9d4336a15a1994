"""Batches for one rank: shard the global batch across data groups, replicate it within a sample group.

Epoch e visits the split in the order `epoch_order(n, B, seed, e)`, a permutation drawn
from (seed, epoch) alone, cut into global batches of B. Data group d takes rows
`grid.local_batch(B)` of every global batch, so the D groups together see each global
batch exactly once and the K ranks of a sample group get identical examples; the global
batches are the same for any grid, which the exactness of sample and data parallelism
rests on. A last incomplete global batch is dropped (`drop_last`) or filled up with the
first examples of the epoch's order again (marked `valid=False`), so every rank takes
the same number of steps and nobody waits forever in a collective.
"""

from __future__ import annotations

import queue
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from hpcbnn.data.format import open_dataset, open_h5
from hpcbnn.data.reader import Reader, Rows, shared_memory_free
from hpcbnn.errors import UsageError, world_rank

T = TypeVar("T")
AUTO_PRELOAD_BYTES = 1 << 30  # above this a rank streams from the file unless preload=True


@dataclass
class Batch:
    x: torch.Tensor  # float32 [B/D, *input_shape], normalised
    y: torch.Tensor  # int64 [B/D] or float32 [B/D, d] (normalised regression targets)
    index: torch.Tensor  # int64 [B/D]: global example indices, in batch order
    rows: slice  # these are rows `rows` of the global batch (grid.local_batch(B))
    valid: torch.Tensor  # bool [B/D]: False for fill-up rows of a last batch (drop_last=False)
    step: int  # position of the batch in the epoch


def epoch_order(
    n: int, batch_size: int, seed: int, epoch: int, shuffle: bool = True, drop_last: bool = True
) -> np.ndarray:
    """The global batches of an epoch as example indices, [steps, batch_size].

    The permutation depends on (seed, epoch) only. Without `drop_last` the order is
    extended cyclically to fill the last batch.
    """
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    steps = n // batch_size if drop_last else -(-n // batch_size)
    return np.resize(order, steps * batch_size).reshape(steps, batch_size)


def available_memory() -> int:
    """Bytes this node can still hand out without swapping (Linux MemAvailable)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise OSError("/proc/meminfo has no MemAvailable line")


class Loader:
    """This rank's batches of one split, prepared `prefetch` batches ahead.

    `preload`: True holds the rows this rank needs in memory, False streams every batch
    from the file, None (default) preloads when that takes at most `preload_limit` bytes
    per rank (1 GiB). The rows must fit in a quarter of the node's available memory shared
    by its ranks (a UsageError for True, streaming for None). Streaming with prefetch reads
    in a reader process (hpcbnn.data.reader), which holds no GIL of this one;
    `reader_process=False` reads in a thread of this process instead.
    """

    def __init__(
        self,
        path: Path | str,
        split: str,
        grid,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        prefetch: int = 2,
        preload: bool | None = None,
        verify: bool = True,
        preload_limit: int = AUTO_PRELOAD_BYTES,
        reader_process: bool = True,
    ) -> None:
        self.info = open_dataset(path, split, verify=verify, comm=grid.world, timeout=grid.timeout)
        grid.check(grid.sample_size, batch_size)  # B must split evenly over the D data groups
        if batch_size < 1 or (drop_last and self.info.n < batch_size):
            raise UsageError(
                f"{self.info.path}: split {split!r} has {self.info.n} examples, fewer than "
                f"one global batch of {batch_size}; lower the batch size"
            )
        if seed < 0:
            raise UsageError(f"seed {seed} is negative; use a seed >= 0")
        self.grid, self.batch_size, self.seed = grid, batch_size, seed
        self.shuffle, self.drop_last, self.prefetch = shuffle, drop_last, prefetch
        self.preload_limit, self.reader_process = preload_limit, reader_process
        self.reader: Reader | None = None  # started by the first streamed epoch
        self.rows = grid.local_batch(batch_size)
        # Called on every rank before each batch is handed out (the same number of times on all of
        # them): where a run that reads a whole split in one go checks for a stop request.
        self.between_batches: Callable[[], None] | None = None
        self.source = Rows(self.info)
        self.y = self._targets()
        shape = (-1,) + (1,) * (len(self.info.input_shape) - 1)
        self.scale = torch.from_numpy(1.0 / self.info.std).float().reshape(shape)
        self.shift = torch.from_numpy(-self.info.mean / self.info.std).float().reshape(shape)
        if self._should_preload(preload):
            self.source.preload(self._needed())

    def _targets(self) -> torch.Tensor:
        """All targets of the split (small next to the inputs), normalised for regression."""
        with open_h5(self.info.path) as f:
            y = f[self.info.split]["y"][:]
        if self.info.task == "classification":
            return torch.from_numpy(y.astype(np.int64))
        return torch.from_numpy(((y - self.info.target_mean) / self.info.target_std).astype(np.float32))

    def _needed(self) -> np.ndarray | None:
        """Every row this rank can be asked for (sorted): its fixed shard without shuffling, else all (None)."""
        if self.shuffle:
            return None
        return np.unique(epoch_order(self.info.n, self.batch_size, self.seed, 0, False, self.drop_last)[:, self.rows])

    def _should_preload(self, preload: bool | None) -> bool:
        if preload is False:
            return False
        needed = self._needed()
        row = self.info.x_dtype.itemsize * int(np.prod(self.info.input_shape))
        need = row * (self.info.n if needed is None else len(needed))
        share = min(
            self.grid.allgather(available_memory() // (4 * self.grid.local_size), "the memory check of preloading")
        )
        fits = need <= share
        if preload and not fits:
            raise UsageError(
                f"{self.info.path}: preloading split {self.info.split!r} takes "
                f"{need / 2**30:.2f} GiB per rank, more than the {share / 2**30:.2f} GiB "
                f"share of the available memory on the fullest node; do not preload"
            )
        return fits and (bool(preload) or need <= self.preload_limit)

    @property
    def preloaded(self) -> bool:
        return self.source.memory is not None

    def __len__(self) -> int:
        n, b = self.info.n, self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def order(self, epoch: int) -> np.ndarray:
        """The epoch's global batches, [steps, B] example indices (the same on every rank)."""
        return epoch_order(self.info.n, self.batch_size, self.seed, epoch, self.shuffle, self.drop_last)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        """This rank's slice of every global batch of `epoch`, prefetched `prefetch` ahead."""
        order = self.order(epoch)
        valid = (np.arange(order.size) < self.info.n).reshape(order.shape)[:, self.rows]
        local = order[:, self.rows]
        if self.prefetch > 0 and self.reader_process and not self.preloaded and self._reader_fits(local.shape[1]):
            batches = self._streamed(local, valid)
        else:
            batches = (self._batch(t, local[t], valid[t]) for t in range(len(local)))
        ready = _background(batches, self.prefetch) if self.prefetch > 0 else batches
        return _checked(ready, self.between_batches) if self.between_batches else ready

    def _batch(self, step: int, index: np.ndarray, valid: np.ndarray) -> Batch:
        x = torch.from_numpy(self.source.read(index)).float().mul_(self.scale).add_(self.shift)
        return self._assemble(step, x, index, valid)

    def _assemble(self, step: int, x: torch.Tensor, index: np.ndarray, valid: np.ndarray) -> Batch:
        index_t = torch.from_numpy(index.astype(np.int64))
        return Batch(x=x, y=self.y[index_t], index=index_t, rows=self.rows, valid=torch.from_numpy(valid), step=step)

    def _reader_fits(self, rows: int) -> bool:
        """Whether /dev/shm holds the reader's slots for every rank of the node; if not, say so
        once and read in this process from now on (the same batches, only slower)."""
        if self.reader is not None and self.reader.alive:
            return True
        need, free = Reader.size(self.info, rows, self.prefetch) * self.grid.local_size, shared_memory_free()
        if need <= free:
            return True
        print(
            f"hpcbnn: rank {world_rank()}: streaming {self.info.path} through reader processes takes "
            f"{need / 2**20:.0f} MiB of shared memory on this node, /dev/shm has {free / 2**20:.0f} MiB free; "
            f"reading in the training process instead (slower, docs/data-format.md)",
            file=sys.stderr,
            flush=True,
        )
        self.reader_process = False
        return False

    def _streamed(self, local: np.ndarray, valid: np.ndarray) -> Iterator[Batch]:
        """The epoch's batches from the reader process (started now, once per process; a forked
        child starts its own), normalised there exactly as `_batch` does."""
        if self.reader is None or not self.reader.alive:
            self.reader = Reader(self.info, local.shape[1], self.prefetch, self.grid.timeout)
        xs = self.reader.batches(local, self.scale.numpy(), self.shift.numpy())

        def assembled() -> Iterator[Batch]:
            with closing(xs):  # stopped early: the reader hears of it now, not at garbage collection
                for t, x in enumerate(xs):
                    yield self._assemble(t, torch.from_numpy(x), local[t], valid[t])

        return assembled()

    def close(self) -> None:
        self.source.close()
        if self.reader is not None:
            self.reader.close()

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_END = object()


def ood_like(choice: str, like: Loader, open_split: Callable[[], Loader]) -> Loader:
    """The OOD loader that `open_split` opens for `--ood choice`, checked against `like` (the
    in-distribution data: same input shape) and given its normalisation, not its own file's."""
    try:
        loader = open_split()
    except UsageError as exc:
        raise UsageError(f"--ood: {exc}", collective=exc.collective) from None
    if loader.info.input_shape != like.info.input_shape:
        raise UsageError(
            f"--ood {choice}: its inputs have shape {list(loader.info.input_shape)}, the model's "
            f"{list(like.info.input_shape)}"
        )
    loader.scale, loader.shift = like.scale, like.shift
    return loader


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def _checked(items: Iterator[T], check: Callable[[], None]) -> Iterator[T]:
    for item in items:
        check()
        yield item


def _background(items: Iterator[T], depth: int) -> Iterator[T]:
    """Produce `items` in a thread, up to `depth` ahead; stops the thread when the consumer stops."""
    q: queue.Queue = queue.Queue(depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_END)
        except BaseException as exc:
            put(_Failure(exc))
        finally:
            close = getattr(items, "close", None)
            if close is not None:  # a generator stopped early tidies up here (e.g. tells a reader process)
                close()

    thread = threading.Thread(target=work, name="hpcbnn-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.exc
            yield item
    finally:
        stop.set()
        thread.join()
