"""Checkpoints that are never half-written and never silently wrong.

A checkpoint is written to a temporary file in the target directory, synced, and renamed
over its final name (`run_dir/checkpoints/step-000123.pt`), then the directory is synced:
a killed writer leaves only a `.step-*.tmp` file that `latest_checkpoint` ignores and the
next save removes. The file is a `torch.save` payload followed by a fixed trailer
(magic, payload length, SHA-256 of the payload), so truncation and bit flips are detected
before unpickling. The payload carries a header: the format version and the fingerprint of
the model (its state_dict names and shapes), so resuming another model is refused instead
of loading half of it.
"""

from __future__ import annotations

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


def state_fingerprint(tensors: Mapping[str, Any]) -> str:
    """Hash of the names and shapes of a state_dict: equal iff it loads into the same model."""
    listing = ";".join(f"{name}:{tuple(t.shape)}" for name, t in sorted(tensors.items()))
    return hashlib.sha256(listing.encode()).hexdigest()[:16]


def model_fingerprint(module: torch.nn.Module) -> str:
    return state_fingerprint(module.state_dict())


def save_checkpoint(run_dir: str | Path, step: int, state: dict[str, Any], keep: int = 3) -> Path:
    """Atomically write `state` as the checkpoint of `step`; keep the newest `keep`.

    Call it on one rank. `state["model"]` must be the model's state_dict (it gives the
    fingerprint); everything in `state` must load with `torch.load(weights_only=True)`.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    if "model" not in state:
        raise ValueError("the checkpoint state needs the model's state_dict under 'model'")
    directory = Path(run_dir) / "checkpoints"
    directory.mkdir(parents=True, exist_ok=True)
    for leftover in directory.glob(_LEFTOVERS):
        leftover.unlink(missing_ok=True)
    final = directory / f"step-{step:06d}.pt"
    temporary = directory / f".{final.name}.{os.getpid()}.tmp"
    content = {"format": FORMAT, "step": step, "fingerprint": state_fingerprint(state["model"]), "state": state}
    with open(temporary, "wb") as file:
        writer = _HashingWriter(file)
        torch.save(content, cast(BinaryIO, writer))  # duck-typed: torch.save only writes and flushes
        file.write(_TRAILER.pack(_MAGIC, writer.length, writer.sha256.digest()))
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, final)
    _fsync_directory(directory)
    for old in _checkpoints(directory)[:-keep]:
        if old != final:
            old.unlink()
    return final


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint with the highest step, or None; temporary files never count."""
    found = _checkpoints(Path(run_dir) / "checkpoints")
    return found[-1] if found else None


def load_checkpoint(
    path: str | Path, expected_fingerprint: str, map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """The state saved in `path`, after checking it is whole, ours, and of this model."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read checkpoint {path}: {exc.strerror}") from None
    payload = memoryview(data)[: max(len(data) - _TRAILER.size, 0)]
    magic, length, digest = _TRAILER.unpack_from(data, len(payload)) if len(data) >= _TRAILER.size else (b"", -1, b"")
    if magic != _MAGIC or length != len(payload):
        raise UsageError(f"checkpoint {path} is truncated or not an hpcbnn checkpoint (no valid end marker); {_ADVICE}")
    if hashlib.sha256(payload).digest() != digest:
        raise UsageError(f"checkpoint {path} is corrupt (checksum mismatch); {_ADVICE}")
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
    return content["state"]


class _HashingWriter:
    """Lets torch.save stream into the file while the checksum is computed on the way."""

    def __init__(self, file: BinaryIO) -> None:
        self.file = file
        self.sha256 = hashlib.sha256()
        self.length = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.length += len(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()


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
