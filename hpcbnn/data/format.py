"""The one HDF5 layout of hpcbnn data sets: writing it atomically, opening it with validation.

Layout (schema version 1; docs/data-format.md is the full description):

    /                attrs: schema_version, task, num_classes, input_shape, mean, std,
                            [target_mean, target_std], [class_names], source
    /{train,val,test}  attrs: count
        x   [N, *input_shape]  uint8 or float32, channels first, chunked along N, Fletcher-32
        y   [N] int64 (classification) or [N, d] float32 (regression), chunked, Fletcher-32

Inputs are stored raw; `mean`/`std` (per channel = axis 0 of input_shape, training split
only) tell the loader how to normalise. Every chunk carries an HDF5 Fletcher-32 checksum,
so damage shows up as a read error instead of silently wrong numbers.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import h5py
import numpy as np

from hpcbnn.bounded import COLLECTIVE_TIMEOUT_S, allgather
from hpcbnn.errors import UsageError

SCHEMA_VERSION = 1
SPLITS = ("train", "val", "test")
TASKS = ("classification", "regression")
Task = Literal["classification", "regression"]
CHUNK_BYTES = 4 * 1024  # small chunks: batches read scattered rows, and a chunk is decoded whole
SCAN_BYTES = 64 * 1024 * 1024


def file_locking() -> bool | None:
    """HDF5 file locking for our opens: off, unless HDF5_USE_FILE_LOCKING says otherwise.

    Files are immutable once in place (writers fill a private temporary file and rename
    it), so readers need no lock, and parallel file systems without flock support make
    HDF5's default lock fail. `None` lets HDF5 follow the environment variable when set.
    """
    return None if "HDF5_USE_FILE_LOCKING" in os.environ else False


def open_h5(path: Path | str, mode: str = "r") -> h5py.File:
    return h5py.File(path, mode, locking=file_locking())


@dataclass(frozen=True, eq=False)
class DatasetInfo:
    """What a model and a loader need to know about one split of a validated file."""

    path: Path
    split: str
    n: int
    input_shape: tuple[int, ...]
    task: Task
    num_classes: int  # classes; for regression the target dimension d
    mean: np.ndarray  # per channel, training split, in stored units
    std: np.ndarray
    target_mean: np.ndarray | None  # regression: targets are normalised with these
    target_std: np.ndarray | None
    class_names: tuple[str, ...] | None
    x_dtype: np.dtype

    @property
    def target_shape(self) -> tuple[int, ...]:
        return () if self.task == "classification" else (self.num_classes,)


def find_bad_values(x: np.ndarray, y: np.ndarray, task: str, num_classes: int, first_row: int = 0) -> str | None:
    """The first NaN/inf input or out-of-range target in a block of rows, in words."""
    if x.dtype.kind == "f":
        bad = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1)
        if bad.any():
            return f"NaN or inf in the inputs at row {first_row + int(bad.argmax())}"
    if task == "classification":
        out = (y < 0) | (y >= num_classes)
        if out.any():
            r = int(out.argmax())
            return f"label {int(y[r])} at row {first_row + r} is outside 0..{num_classes - 1}"
    else:
        bad = ~np.isfinite(y.reshape(len(y), -1)).all(axis=1)
        if bad.any():
            return f"NaN or inf in the targets at row {first_row + int(bad.argmax())}"
    return None


def _attr(f: h5py.File, name: str, path: Path) -> np.ndarray:
    if name not in f.attrs:
        raise UsageError(
            f"{path}: attribute {name!r} missing from the file root; re-convert it with python -m hpcbnn.data"
        )
    return f.attrs[name]


def _header(f: h5py.File, path: Path) -> dict:
    """Root attributes, checked for presence, types and consistency."""
    version = f.attrs.get("schema_version")
    if version is None:
        raise UsageError(
            f"{path}: no schema_version attribute, so not an hpcbnn data file; "
            f"convert your data with python -m hpcbnn.data"
        )
    if int(version) != SCHEMA_VERSION:
        raise UsageError(
            f"{path}: schema version {int(version)}, but this hpcbnn reads version "
            f"{SCHEMA_VERSION}; re-convert it with python -m hpcbnn.data"
        )
    task = str(_attr(f, "task", path))
    if task not in TASKS:
        raise UsageError(f"{path}: task {task!r} is neither classification nor regression")
    num_classes = int(_attr(f, "num_classes", path))
    if num_classes < (2 if task == "classification" else 1):
        raise UsageError(f"{path}: num_classes {num_classes} is too small for {task}")
    input_shape = tuple(int(s) for s in np.atleast_1d(_attr(f, "input_shape", path)))
    if not input_shape or min(input_shape) < 1:
        raise UsageError(f"{path}: input_shape {list(input_shape)} is not a valid shape")
    head = dict(
        task=task,
        num_classes=num_classes,
        input_shape=input_shape,
        class_names=tuple(str(c) for c in f.attrs["class_names"]) if "class_names" in f.attrs else None,
    )
    pairs = [("mean", "std", input_shape[0])]
    if task == "regression":
        pairs.append(("target_mean", "target_std", num_classes))
    else:
        head["target_mean"] = head["target_std"] = None
    for m, s, size in pairs:
        mean = np.asarray(_attr(f, m, path), np.float64).reshape(-1)
        std = np.asarray(_attr(f, s, path), np.float64).reshape(-1)
        if mean.shape != (size,) or std.shape != (size,):
            raise UsageError(f"{path}: {m}/{s} have {mean.size}/{std.size} entries, expected {size} (one per channel)")
        if not (np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()):
            raise UsageError(f"{path}: {m}/{s} must be finite with {s} > 0")
        head[m], head[s] = mean, std
    return head


def _split(f: h5py.File, path: Path, split: str, head: dict) -> tuple[h5py.Dataset, h5py.Dataset]:
    """The split's datasets, checked against the header and each other (no data read)."""
    for name in ("x", "y"):
        if f"{split}/{name}" not in f:
            have = ", ".join(k for k in f.keys()) or "none"
            raise UsageError(f"{path}: dataset /{split}/{name} is missing (split {split!r}; groups present: {have})")
    x, y = f[split]["x"], f[split]["y"]
    n = x.shape[0] if x.ndim else 0
    if x.shape[1:] != head["input_shape"]:
        raise UsageError(
            f"{path}: /{split}/x has shape {list(x.shape)}, expected "
            f"[N, {', '.join(map(str, head['input_shape']))}] from input_shape"
        )
    if x.dtype != np.uint8 and x.dtype.kind != "f":
        raise UsageError(f"{path}: /{split}/x has dtype {x.dtype}; store inputs as uint8 or float")
    want = (n,) + ((head["num_classes"],) if head["task"] == "regression" else ())
    if y.shape != want:
        raise UsageError(
            f"{path}: /{split}/y has shape {list(y.shape)}, expected {list(want)} for {head['task']} with {n} inputs"
        )
    if head["task"] == "classification" and y.dtype.kind not in "iu":
        raise UsageError(f"{path}: /{split}/y has dtype {y.dtype}; classification labels must be integers")
    if head["task"] == "regression" and y.dtype.kind != "f":
        raise UsageError(f"{path}: /{split}/y has dtype {y.dtype}; regression targets must be float")
    count = f[split].attrs.get("count")
    if count is None or int(count) != n:
        raise UsageError(
            f"{path}: split {split!r} holds {n} examples but its count attribute "
            f"says {count}; the file is incomplete or was edited, re-convert it"
        )
    if n == 0:
        raise UsageError(f"{path}: split {split!r} is empty")
    return x, y


def scan(path: Path, split: str, x: h5py.Dataset, y: h5py.Dataset, head: dict) -> str | None:
    """Read every row once: NaN/inf, label range, and the Fletcher-32 checksum of every chunk."""
    rows = max(1, SCAN_BYTES // max(1, x.dtype.itemsize * int(np.prod(x.shape[1:]))))
    for start in range(0, x.shape[0], rows):
        try:
            xb, yb = x[start : start + rows], y[start : start + rows]
        except OSError as exc:
            return (
                f"{path}: cannot read /{split} rows {start}..{start + rows - 1} ({exc}); "
                f"the file is damaged (checksum), re-convert or copy it again"
            )
        problem = find_bad_values(xb, yb, head["task"], head["num_classes"], start)
        if problem:
            return f"{path}: split {split!r}: {problem}"
    return None


def open_dataset(
    path: Path | str, split: str = "train", *, verify: bool = True, comm=None, timeout: float = COLLECTIVE_TIMEOUT_S
) -> DatasetInfo:
    """Validate `split` of `path` and describe it; any problem is one UsageError line.

    The structure is checked on every rank (metadata only). With `verify` the values are
    scanned too (every chunk read once): by rank 0 of `comm` alone when given. With `comm`
    the ranks then agree on the verdict, so all of them fail together, also when only some
    see a problem (a file missing on one node's disk); they wait for rank 0's scan at most
    `timeout` seconds (--collective_timeout), so a stopped rank cannot hang the others.
    """
    try:
        info = _open(Path(path), split, verify and (comm is None or comm.Get_rank() == 0))
        problem = None
    except UsageError as exc:
        info, problem = None, str(exc)
    if comm is not None:
        problems = allgather(comm, problem, f"the check of split {split!r} of {path}", timeout)
        seen = [r for r, p in enumerate(problems) if p]
        if seen:
            problem = problems[seen[0]]
            if len(seen) < len(problems) and not (verify and seen == [0]):
                problem += f" (seen by ranks {seen} of {len(problems)})"
    if problem:
        raise UsageError(problem)
    return info  # type: ignore[return-value]


def _open(path: Path, split: str, scan_values: bool) -> DatasetInfo:
    if split not in SPLITS:
        raise UsageError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
    if not path.is_file():
        raise UsageError(f"{path}: no such file; convert a data set with python -m hpcbnn.data (see --help)")
    try:
        f = open_h5(path)
    except OSError as exc:
        raise UsageError(f"{path}: not a readable HDF5 file ({exc})") from None
    with f:
        head = _header(f, path)
        x, y = _split(f, path, split, head)
        problem = scan(path, split, x, y, head) if scan_values else None
        if problem:
            raise UsageError(problem)
        return DatasetInfo(path=path, split=split, n=x.shape[0], x_dtype=x.dtype, **head)


class WriteProgress:
    """One log-friendly line to stderr every few seconds, only for conversions that take that long."""

    def __init__(self, label: str, total: int, enabled: bool, every: float = 3.0) -> None:
        self.label, self.total, self.enabled, self.every = label, total, enabled, every
        self.last = time.monotonic()

    def update(self, done: int) -> None:
        now = time.monotonic()
        if self.enabled and now - self.last >= self.every:
            self.last = now
            print(
                f"hpcbnn.data: {self.label}: {done}/{self.total} examples ({100 * done // max(1, self.total)}%)",
                file=sys.stderr,
                flush=True,
            )


class _Moments:
    """Per-channel mean and variance over blocks (Chan et al.'s pairwise update, float64)."""

    def __init__(self, channels: int) -> None:
        self.n = 0
        self.mean = np.zeros(channels)
        self.m2 = np.zeros(channels)

    def add(self, block: np.ndarray) -> None:
        """`block` is [rows, channels, ...]: channel c is everything in block[:, c]."""
        v = np.moveaxis(block, 1, 0).reshape(block.shape[1], -1).astype(np.float64)
        n_b = v.shape[1]
        if n_b == 0:
            return
        mean_b = v.mean(axis=1)
        m2_b = ((v - mean_b[:, None]) ** 2).sum(axis=1)
        n = self.n + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * n_b / n
        self.m2 = self.m2 + m2_b + delta**2 * self.n * n_b / n
        self.n = n

    def std(self) -> np.ndarray:
        std = np.sqrt(self.m2 / max(1, self.n))
        return np.where(std > 0, std, 1.0)  # a constant channel is only centred


class DatasetWriter:
    """Writes a file in the layout: rows appended split by split, statistics from train only.

    The file appears at `path` only when `close()` succeeds (it is written to a private
    temporary name in the same directory and renamed), so a reader never sees half a file
    and concurrent writers of the same content are safe.
    """

    def __init__(
        self,
        path: Path | str,
        *,
        task: Task,
        input_shape: Sequence[int],
        num_classes: int,
        counts: Mapping[str, int],
        x_dtype: np.dtype | type = np.float32,
        class_names: Sequence[str] | None = None,
        source: str = "",
        progress: bool = False,
    ) -> None:
        self.path = Path(path)
        self.source = source or str(path)
        self.task, self.num_classes = task, int(num_classes)
        self.input_shape = tuple(int(s) for s in input_shape)
        self.counts = {s: int(counts[s]) for s in SPLITS}
        for split, n in self.counts.items():
            if n < 1:
                raise UsageError(
                    f"{self.source}: the {split} split would be empty; adjust --val_fraction/--test_fraction"
                )
        self.done = dict.fromkeys(SPLITS, 0)
        self.x_moments = _Moments(self.input_shape[0])
        self.y_moments = _Moments(self.num_classes) if task == "regression" else None
        self.progress = WriteProgress(f"writing {self.path}", sum(self.counts.values()), progress)
        self.tmp = self.path.with_name(f".{self.path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open_h5(self.tmp, "w")
        except OSError as exc:
            raise UsageError(f"{self.path}: cannot write here ({exc}); choose another output path") from None
        self._layout(np.dtype(x_dtype), class_names)

    def _layout(self, x_dtype: np.dtype, class_names: Sequence[str] | None) -> None:
        f = self.file
        f.attrs.update(
            schema_version=SCHEMA_VERSION,
            task=self.task,
            num_classes=self.num_classes,
            input_shape=np.array(self.input_shape, np.int64),
            source=self.source,
        )
        if class_names is not None:
            f.attrs["class_names"] = [str(c) for c in class_names]
        y_shape = (self.num_classes,) if self.task == "regression" else ()
        y_dtype = np.float32 if self.task == "regression" else np.int64
        for split, n in self.counts.items():
            g = f.create_group(split)
            g.attrs["count"] = n
            for name, shape, dtype in (("x", self.input_shape, x_dtype), ("y", y_shape, y_dtype)):
                row = int(np.prod(shape)) * np.dtype(dtype).itemsize
                chunk = (min(n, max(1, CHUNK_BYTES // row)),) + shape
                g.create_dataset(name, shape=(n,) + shape, dtype=dtype, chunks=chunk, fletcher32=True)

    def append(self, split: str, x: np.ndarray, y: np.ndarray) -> None:
        """Write the next rows of `split`; they are validated like an opened file would be."""
        start = self.done[split]
        x, y = np.asarray(x, self.file[split]["x"].dtype), np.asarray(y)
        if x.shape[1:] != self.input_shape or len(y) != len(x):
            raise UsageError(
                f"{self.source}: {split} inputs of shape {list(x.shape)} with "
                f"{len(y)} targets do not fit input shape {list(self.input_shape)}"
            )
        if start + len(x) > self.counts[split]:
            raise ValueError(f"{split}: {start + len(x)} rows exceed the declared {self.counts[split]}")
        problem = find_bad_values(x, y, self.task, self.num_classes, start)
        if problem:
            raise UsageError(f"{self.source}: {split} split: {problem}")
        self.file[split]["x"][start : start + len(x)] = x
        self.file[split]["y"][start : start + len(x)] = y
        if split == "train":
            self.x_moments.add(x)
            if self.y_moments is not None:
                self.y_moments.add(y.reshape(len(y), -1))
        self.done[split] = start + len(x)
        self.progress.update(sum(self.done.values()))

    def close(self) -> Path:
        """Write the statistics and move the file into place."""
        missing = {s: (self.done[s], n) for s, n in self.counts.items() if self.done[s] != n}
        if missing:
            raise ValueError(f"splits not completely written (written, declared): {missing}")
        self.file.attrs.update(mean=self.x_moments.mean, std=self.x_moments.std())
        if self.y_moments is not None:
            self.file.attrs.update(target_mean=self.y_moments.mean, target_std=self.y_moments.std())
        self.file.close()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Drop the temporary file: nothing appears at `path`."""
        self.file.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
            return
        try:
            self.close()
        except BaseException:
            self.abort()
            raise
