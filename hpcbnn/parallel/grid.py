"""The process grid: P ranks as D data groups x K ranks per sample group.

Everything that needs to know "which samples, which examples, which peers" asks this one
object instead of doing rank arithmetic. Ranks of one sample group are contiguous in the
world (rank = d*K + k), so with the usual block placement of launchers a sample group
lives on one node and its frequent collectives use the fast intra-node links.

    sample communicator: the K ranks sharing one data shard; they split the S samples.
    data communicator:   the D ranks holding the same slice of samples; they split B.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np
import torch
from mpi4py import MPI

from hpcbnn.bounded import COLLECTIVE_TIMEOUT_S, allgather, bcast, wait_for
from hpcbnn.errors import UsageError

Mode = Literal["sample", "data", "hybrid"]
Axis = Literal["sample", "data", "world"]
MODES: tuple[Mode, ...] = get_args(Mode)


@dataclass(frozen=True)
class GridShape:
    """D data groups x K ranks per sample group."""

    data: int
    sample: int

    @property
    def size(self) -> int:
        return self.data * self.sample


def resolve_shape(mode: str, world_size: int, ranks_per_node: int, sample_group: int | None = None) -> GridShape:
    """The grid a mode gives on `world_size` ranks; an impossible grid is a UsageError."""
    if mode not in MODES:
        raise UsageError(f"unknown mode {mode!r}: choose one of {', '.join(MODES)}")
    if mode == "sample":
        k = world_size
    elif mode == "data":
        k = 1
    else:
        k = sample_group or ranks_per_node
    if k < 1 or world_size % k:
        source = "--sample_group" if sample_group else "the ranks per node"
        raise UsageError(
            f"hybrid grid impossible: {world_size} ranks are not divisible into sample groups "
            f"of K={k} ({source}); choose K dividing {world_size}"
        )
    return GridShape(data=world_size // k, sample=k)


class ProcessGrid:
    """The MPI communicators of the grid, this rank's place in it, and its device."""

    def __init__(
        self,
        mode: str = "sample",
        sample_group: int | None = None,
        comm: MPI.Comm | None = None,
        device: str | None = None,
        timeout: float = COLLECTIVE_TIMEOUT_S,
    ) -> None:
        self.world: MPI.Comm = comm or MPI.COMM_WORLD
        self.rank = self.world.Get_rank()
        self.size = self.world.Get_size()
        self.timeout = timeout
        self.barrier("the start-up (every rank reaching the process grid)")
        self.node = self.world.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank = self.node.Get_rank()
        self.local_size = self.node.Get_size()
        self.mode = mode
        self.shape = resolve_shape(mode, self.size, self.local_size, sample_group)
        k = self.shape.sample
        self.data_rank, self.sample_rank = divmod(self.rank, k)
        self.sample_comm: MPI.Comm = self.world.Split(color=self.data_rank, key=self.sample_rank)
        self.data_comm: MPI.Comm = self.world.Split(color=self.sample_rank, key=self.data_rank)
        self.device = checked_device(device) if device else default_device(self.local_rank)

    @property
    def sample_size(self) -> int:
        """K: ranks per sample group."""
        return self.shape.sample

    @property
    def data_size(self) -> int:
        """D: number of data groups."""
        return self.shape.data

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def comm(self, axis: Axis) -> MPI.Comm:
        return {"sample": self.sample_comm, "data": self.data_comm, "world": self.world}[axis]

    def axis_size(self, axis: Axis) -> int:
        return {"sample": self.sample_size, "data": self.data_size, "world": self.size}[axis]

    def check(self, samples: int, batch_size: int) -> None:
        """Reject S and B that do not split evenly over the grid (never round silently)."""
        k, d = self.sample_size, self.data_size
        if samples % k:
            raise UsageError(
                f"--samples {samples} is not divisible by the K={k} ranks of a sample "
                f"group ({self.mode} mode on {self.size} ranks); use a multiple of {k}"
            )
        if batch_size % d:
            raise UsageError(
                f"--batch_size {batch_size} is not divisible by the D={d} data groups "
                f"({self.mode} mode on {self.size} ranks); use a multiple of {d}"
            )

    def local_samples(self, samples: int) -> range:
        """The global Monte-Carlo sample indices this rank evaluates."""
        per = samples // self.sample_size
        return range(self.sample_rank * per, (self.sample_rank + 1) * per)

    def local_batch(self, batch_size: int) -> slice:
        """The rows of a global batch this rank's data group sees."""
        per = batch_size // self.data_size
        return slice(self.data_rank * per, (self.data_rank + 1) * per)

    def barrier(self, what: str) -> None:
        """Wait for every rank, at most `timeout` seconds (then `Stalled`, naming the absent ranks)."""
        wait_for(self.world.Ibarrier().Test, what, self.world, self.timeout)

    def allreduce(self, values: np.ndarray, what: str) -> np.ndarray:
        """Sum `values` over the world in place, bounded like `barrier`."""
        wait_for(self.world.Iallreduce(MPI.IN_PLACE, values, op=MPI.SUM).Test, what, self.world, self.timeout)
        return values

    def bcast(self, value: Any, what: str) -> Any:
        """Rank 0's `value` on every rank (a picklable object), bounded like `barrier`."""
        return bcast(self.world, value, what, self.timeout)

    def allgather(self, value: Any, what: str) -> list[Any]:
        """Every rank's `value` in rank order (picklable objects), bounded like `barrier`."""
        return allgather(self.world, value, what, self.timeout)

    def wait(self, done: Callable[[], bool], what: str) -> None:
        """Poll `done` (a backend's test of an asynchronous collective) until it is true, bounded."""
        wait_for(done, what, self.world, self.timeout)

    def describe(self) -> str:
        return (
            f"{self.mode} mode: {self.size} ranks = D {self.data_size} data groups x "
            f"K {self.sample_size} ranks per sample group, device {self.device}"
        )


def checked_device(name: str) -> torch.device:
    """`--device NAME` if this node has it: a typo or a missing GPU is one line, not a traceback
    from deep inside the first collective or allocation."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device name; use cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    accelerator = torch.accelerator.current_accelerator(check_available=True)
    count = torch.accelerator.device_count() if accelerator and accelerator.type == device.type else 0
    if count <= (device.index or 0):
        raise UsageError(
            f"--device {name} does not exist on {socket.gethostname()} (it has {count} "
            f"{device.type} devices); choose one of them, cpu, or leave --device unset"
        )
    return device


def default_device(local_rank: int) -> torch.device:
    """One GPU per node-local rank when CUDA is there, the CPU otherwise."""
    if torch.cuda.is_available():
        return torch.device(f"cuda:{local_rank % torch.cuda.device_count()}")
    return torch.device("cpu")
