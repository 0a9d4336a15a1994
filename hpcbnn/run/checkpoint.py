"""Checkpoints that are never half-written and never silently wrong.

A checkpoint is written to a temporary file in the target directory, synced, and renamed
over its final name (`run_dir/checkpoints/step-000123.pt`), then the directory is synced:
a killed writer leaves only a `.step-*.tmp` file that `latest_checkpoint` ignores and the
next save removes. The file is a `torch.save` payload followed by a fixed trailer
(magic, payload length, SHA-256 of the payload), so truncation and bit flips are detected
before unpickling. The payload carries a header: the format version and the fingerprint of
the model (its state_dict names and shapes), so resuming another model is refused instead
of loading half of it, and the options a resume must not change (`run`, compared by the
caller). A state whose weights are not all finite is never written; a failed write (a full
disk) removes its temporary file and is one UsageError line.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import re
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO, cast

import torch

from hpcbnn.errors import UsageError

FORMAT = 1
_MAGIC = b"HPCBNNCK"
_TRAILER = struct.Struct(">8sQ32s")  # magic, payload length, sha256(payload)
_NAME = re.compile(r"step-(\d+)\.pt")
_LEFTOVERS = ".step-*.tmp"
_ADVICE = "delete it or point --run_dir elsewhere"
_SPACE = "free space on that file system (or lift the quota), or choose another --run_dir"


class DamagedCheckpoint(UsageError):
    """A checkpoint file that is unreadable, truncated or corrupt (not merely of another run)."""


def state_fingerprint(tensors: Mapping[str, Any]) -> str:
    """Hash of the names and shapes of a state_dict: equal iff it loads into the same model."""
    listing = ";".join(f"{name}:{tuple(t.shape)}" for name, t in sorted(tensors.items()))
    return hashlib.sha256(listing.encode()).hexdigest()[:16]


def model_fingerprint(module: torch.nn.Module) -> str:
    return state_fingerprint(module.state_dict())


def save_checkpoint(
    run_dir: str | Path, step: int, state: dict[str, Any], keep: int = 3, run: Mapping[str, Any] | None = None
) -> Path:
    """Atomically write `state` as the checkpoint of `step`; keep the newest `keep`.

    Call it on one rank. `state["model"]` must be the model's state_dict (it gives the
    fingerprint); everything in `state` and `run` must load with `torch.load(weights_only=True)`.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    if "model" not in state:
        raise ValueError("the checkpoint state needs the model's state_dict under 'model'")
    bad = [name for name, t in state["model"].items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise UsageError(
            f"the weights hold NaN or inf at step {step} ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}), "
            f"so no checkpoint was written; the earlier ones stay: lower --lr or set --clip_grad"
        )
    directory = Path(run_dir) / "checkpoints"
    directory.mkdir(parents=True, exist_ok=True)
    for leftover in directory.glob(_LEFTOVERS):
        leftover.unlink(missing_ok=True)
    final = directory / f"step-{step:06d}.pt"
    temporary = directory / f".{final.name}.{os.getpid()}.tmp"
    content = {
        "format": FORMAT,
        "step": step,
        "fingerprint": state_fingerprint(state["model"]),
        "run": dict(run or {}),
        "state": state,
    }
    writer: _HashingWriter | None = None
    try:
        with open(temporary, "wb") as file:
            writer = _HashingWriter(file)
            torch.save(content, cast(BinaryIO, writer))  # duck-typed: torch.save only writes and flushes
            file.write(_TRAILER.pack(_MAGIC, writer.length, writer.sha256.digest()))
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, final)
    except (OSError, RuntimeError) as exc:  # torch.save turns a failed write into a RuntimeError without errno
        temporary.unlink(missing_ok=True)
        cause = writer.error if writer and writer.error else exc
        raise UsageError(f"cannot write checkpoint {final}: {_reason(cause)}; {_SPACE}") from None
    _fsync_directory(directory)
    for old in _checkpoints(directory)[:-keep]:
        if old != final:
            old.unlink()
    return final


def write_atomically(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a synced temporary file and a rename: readers see the
    old content or the new, never a part; a failed write leaves no temporary file."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise UsageError(f"cannot write {path}: {_reason(exc)}; {_SPACE}") from None


def _reason(exc: BaseException) -> str:
    """An OSError's name and words, also when torch.save wraps one in a RuntimeError."""
    while not isinstance(exc, OSError) and exc.__cause__ is not None:
        exc = exc.__cause__
    if isinstance(exc, OSError) and exc.errno:
        return f"{errno.errorcode.get(exc.errno, exc.errno)}, {exc.strerror}"
    return " ".join(str(exc).split())


def checkpoints(run_dir: str | Path) -> list[Path]:
    """The run's final checkpoint files, oldest step first; temporary files never count."""
    return _checkpoints(Path(run_dir) / "checkpoints")


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint with the highest step, or None; temporary files never count."""
    found = _checkpoints(Path(run_dir) / "checkpoints")
    return found[-1] if found else None


def load_checkpoint(
    path: str | Path,
    expected_fingerprint: str,
    map_location: str | torch.device = "cpu",
    run: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The state saved in `path`, after checking it is whole, ours, of this model and, given
    `run` (option -> value), of a run with the same values of those options."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DamagedCheckpoint(f"cannot read checkpoint {path}: {exc.strerror}") from None
    payload = memoryview(data)[: max(len(data) - _TRAILER.size, 0)]
    magic, length, digest = _TRAILER.unpack_from(data, len(payload)) if len(data) >= _TRAILER.size else (b"", -1, b"")
    if magic != _MAGIC or length != len(payload):
        raise DamagedCheckpoint(
            f"checkpoint {path} is truncated or not an hpcbnn checkpoint (no valid end marker); {_ADVICE}"
        )
    if hashlib.sha256(payload).digest() != digest:
        raise DamagedCheckpoint(f"checkpoint {path} is corrupt (checksum mismatch); {_ADVICE}")
    content = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    if content["format"] != FORMAT:
        raise UsageError(
            f"checkpoint {path} has format {content['format']} but this hpcbnn reads format {FORMAT}; {_ADVICE}"
        )
    if content["fingerprint"] != expected_fingerprint:
        raise UsageError(
            f"checkpoint {path} is of a different model (parameter names/shapes fingerprint "
            f"{content['fingerprint']}, this model {expected_fingerprint}); resume with the "
            f"model options it was trained with, or {_ADVICE}"
        )
    saved = content.get("run", {})
    for option, value in (run or {}).items():
        if option in saved and saved[option] != value:
            same = "the same data" if option == "data" else f"--{option} {_shown(saved[option])}"
            raise UsageError(
                f"--{option} is {_shown(value)}, but checkpoint {path} was trained with {_shown(saved[option])}: "
                f"a resumed run cannot change it; resume with {same}, or start a new --run_dir"
            )
    return content["state"]


def _shown(value: Any) -> str:
    return "unset" if value is None else str(value)


class _HashingWriter:
    """Lets torch.save stream into the file while the checksum is computed on the way."""

    def __init__(self, file: BinaryIO) -> None:
        self.file = file
        self.sha256 = hashlib.sha256()
        self.length = 0
        self.error: OSError | None = None  # what the file system said, which torch.save does not pass on

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.length += len(data)
        try:
            return self.file.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        try:
            self.file.flush()
        except OSError as exc:
            self.error = exc
            raise


def _checkpoints(directory: Path) -> list[Path]:
    """Final checkpoint files in ascending step order."""
    if not directory.is_dir():
        return []
    steps = [(int(match.group(1)), path) for path in directory.iterdir() if (match := _NAME.fullmatch(path.name))]
    return [path for _, path in sorted(steps)]


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (POSIX: the entry lives in the directory)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
