"""Collectives over the grid's axes: one interface, two backends (Horovod, torch.distributed).

Gradients are always *averaged* over the ranks they are reduced over. Every rank's loss is
built so that this mean is the single-process gradient (see `hpcbnn.bnn.objectives`); the one
non-linear coupling between ranks, the gather of per-sample statistics over the sample
communicator, is `allgather`, whose backward is the true adjoint (a *sum* over the axis)
and therefore exact under that averaging. Horovod's own differentiable allgather averages
in its backward, which would scale those gradients by 1/K; hence our own autograd function.

Every collective is started asynchronously and waited for through `ProcessGrid.wait`, so a
stopped or hung peer ends the job after the grid's timeout (--collective_timeout) with one
line naming it. The backends' own bounds are set behind it, as a backstop for the waits we
do not see (inside Horovod's start-up, Gloo's rendezvous): Gloo's timeout and Horovod's
stall shutdown (HOROVOD_STALL_CHECK_TIME_SECONDS, HOROVOD_STALL_SHUTDOWN_TIME_SECONDS, unless
the environment sets them) are the timeout plus `BACKSTOP_S`.
"""

from __future__ import annotations

import atexit
import datetime
import math
import os
import socket
import time
import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, cast, get_args

import torch
from mpi4py import MPI
from torch import Tensor

from hpcbnn.parallel.grid import Axis, ProcessGrid

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

Backend = Literal["horovod", "torch"]
BACKENDS: tuple[Backend, ...] = get_args(Backend)
BACKSTOP_S = 30.0
FUSION_THRESHOLD = 1 << 20  # bytes: Horovod fuses smaller tensors only (a user's HOROVOD_FUSION_THRESHOLD wins)


@dataclass(frozen=True)
class Reduction:
    """An allreduce in flight: `done()` asks without waiting, `finish()` waits (bounded) and
    leaves the result in the tensors."""

    done: Callable[[], bool]
    finish: Callable[[], None]


class Collectives(ABC):
    """Fused in-place reductions, broadcasts and a differentiable gather on a grid axis."""

    def __init__(self, grid: ProcessGrid) -> None:
        self.grid = grid

    def trivial(self, axis: Axis) -> bool:
        return self.grid.axis_size(axis) == 1

    def allreduce_(self, tensors: list[Tensor], axis: Axis = "world", average: bool = True) -> None:
        """Reduce `tensors` in place over `axis` (one fused call for all of them)."""
        if tensors and not self.trivial(axis):
            self._start_allreduce(tensors, axis, average).finish()

    def broadcast_(self, tensors: Iterable[Tensor], root: int = 0) -> None:
        """Overwrite `tensors` on every rank with world rank `root`'s values."""
        tensors = list(tensors)
        if tensors and self.grid.size > 1:
            self._broadcast_(tensors, root)

    def allgather(self, tensor: Tensor, axis: Axis) -> Tensor:
        """Concatenate equally shaped tensors over `axis` along dim 0; differentiable."""
        if self.trivial(axis):
            return tensor
        return _Gather.apply(tensor, self, axis)

    def reduce_gradients(self, params: Iterable[torch.nn.Parameter], hierarchical: bool = False) -> None:
        """Average gradients over the world: in one call, or over samples then over data."""
        grads = [p.grad for p in params if p.grad is not None]
        if hierarchical:
            self.allreduce_(grads, "sample")
            self.allreduce_(grads, "data")
        else:
            self.allreduce_(grads, "world")

    @contextmanager
    def reducing_gradients(
        self, params: Iterable[torch.nn.Parameter], hierarchical: bool = False
    ) -> Iterator[list[int]]:
        """Average gradients as `reduce_gradients` does, their reductions started while backward
        still runs, so the transfer of the last layers' gradients overlaps the backward of the
        first ones (as DDP's buckets do); the exit waits for all of them.

            with comm.reducing_gradients(model.parameters()) as started:
                loss.backward()   # started: the indices in `params` whose reduction began
            optimizer.step()      # every gradient is the average over the grid here

        The block runs one backward (earlier ones may accumulate into the same gradients).
        Reductions are issued in one fixed order, `params` reversed (a network's last layers
        first, as backward makes them), and each as soon as it and all before it in that order
        are ready: Gloo and NCCL pair collectives by their order, and the order in which
        backward finishes the gradients can differ between ranks (a mixture's components are
        used by different ranks' samples). A gradient whose hook does not fire (one accumulated
        before the block only) holds back the ones after it, and they all start at the exit.
        With `hierarchical`, a gradient's reduction over data starts, in the same order, once
        its reduction over samples has ended (seen at the next hook, or at the exit): on a
        cluster the slower one, between nodes, then overlaps backward too.
        """
        params = list(params)
        axes: tuple[Axis, ...] = ("sample", "data") if hierarchical else ("world",)
        stages = [axis for axis in axes if not self.trivial(axis)]
        order = [i for i in reversed(range(len(params))) if params[i].requires_grad]  # the same on every rank
        ready: set[int] = set()
        started: list[int] = []
        issued: list[list[tuple[int, Tensor, Reduction]]] = [[] for _ in stages]  # per stage, in `order`
        cursor = 0  # order[:cursor] went through the first stage

        def advance(at_exit: bool = False) -> None:
            """Start the first stage of the ready prefix of `order` (at the exit: of all with a
            gradient), and each later stage of the gradients whose stage before it has ended."""
            nonlocal cursor
            while cursor < len(order) and (at_exit or order[cursor] in ready):
                index, cursor = order[cursor], cursor + 1
                grad = params[index].grad
                if grad is not None:
                    issued[0].append((index, grad, self._start_allreduce([grad], stages[0], True, gradient=index)))
                    started.append(index)
            for before, stage, axis in zip(issued, issued[1:], stages[1:]):
                while len(stage) < len(before) and (at_exit or before[len(stage)][2].done()):
                    index, grad, reduction = before[len(stage)]
                    reduction.finish()
                    stage.append((index, grad, self._start_allreduce([grad], axis, True, gradient=index)))

        def hook(index: int) -> Callable[[Tensor], None]:
            def ready_now(_: Tensor) -> None:
                ready.add(index)
                advance()

            return ready_now

        handles = [params[i].register_post_accumulate_grad_hook(hook(i)) for i in order] if stages else []
        try:
            yield started
        finally:
            for handle in handles:
                handle.remove()
        if stages:
            advance(at_exit=True)
            for _, _, reduction in issued[-1]:
                reduction.finish()

    @abstractmethod
    def _start_allreduce(
        self, tensors: list[Tensor], axis: Axis, average: bool, gradient: int | None = None
    ) -> Reduction:
        """Start reducing `tensors` in place. `gradient`, the index of a gradient reduced while
        backward runs, gives it a channel of its own (a Horovod name, torch.distributed groups),
        apart from the collectives that backward itself issues (the gather's adjoint)."""

    @abstractmethod
    def _broadcast_(self, tensors: list[Tensor], root: int) -> None: ...

    @abstractmethod
    def _gather(self, tensor: Tensor, axis: Axis) -> Tensor: ...


class _Gather(torch.autograd.Function):
    """All-gather whose backward sums the upstream gradients of all ranks (the true adjoint)."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, comm: Collectives, axis: Axis) -> Tensor:
        ctx.comm, ctx.axis, ctx.n_rows = comm, axis, tensor.shape[0]
        return comm._gather(tensor.contiguous(), axis)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        grad = grad.contiguous().clone()
        ctx.comm.allreduce_([grad], ctx.axis, average=False)
        rank = ctx.comm.grid.comm(ctx.axis).Get_rank()
        return grad.narrow(0, rank * ctx.n_rows, ctx.n_rows), None, None


class HorovodCollectives(Collectives):
    """Horovod with the grid's sub-communicators registered as process sets."""

    def __init__(self, grid: ProcessGrid) -> None:
        super().__init__(grid)
        import horovod.torch as hvd

        self.hvd = hvd
        backstop = math.ceil(grid.timeout + BACKSTOP_S)
        os.environ.setdefault("HOROVOD_STALL_CHECK_TIME_SECONDS", str(backstop))
        os.environ.setdefault("HOROVOD_STALL_SHUTDOWN_TIME_SECONDS", str(backstop + 1))
        # Tensor fusion copies the tensors into one buffer and back: for a layer's large gradients
        # the two copies cost more than the reduction saves (benchmarks.allreduce, 14.9 MB in 6
        # tensors: 8.7-12 ms fused, 4.8 ms with fusion only below 1 MiB, MPI alone 3 ms).
        os.environ.setdefault("HOROVOD_FUSION_THRESHOLD", str(FUSION_THRESHOLD))
        # A side of size 1 needs no collective, a side of size P is the global set: registering
        # either as its own process set is an error in Horovod.
        own = {
            axis: hvd.ProcessSet(grid.comm(axis)) for axis in ("sample", "data") if 1 < grid.axis_size(axis) < grid.size
        }
        grid.barrier("the start of Horovod")
        hvd.init(comm=grid.world, process_sets=list(own.values()))
        self.sets = {axis: own.get(axis, hvd.global_process_set) for axis in ("sample", "data", "world")}

    def _start_allreduce(
        self, tensors: list[Tensor], axis: Axis, average: bool, gradient: int | None = None
    ) -> Reduction:
        op = self.hvd.Average if average else self.hvd.Sum
        kind = ("average" if average else "sum") + ("" if gradient is None else f"grad{gradient}")
        name = _op_name(kind, axis, [(t.dtype, t.shape) for t in tensors])
        handle = self.hvd.grouped_allreduce_async_(tensors, op=op, process_set=self.sets[axis], name=name)

        def finish() -> None:
            self._wait([handle], f"a Horovod allreduce over the {axis} ranks")

        return Reduction(lambda: bool(self.hvd.poll(handle)), finish)

    def _broadcast_(self, tensors: list[Tensor], root: int) -> None:
        handles = [
            self.hvd.broadcast_async_(t, root_rank=root, name=_op_name(f"broadcast{i}", root, [(t.dtype, t.shape)]))
            for i, t in enumerate(tensors)
        ]
        self._wait(handles, f"a Horovod broadcast from rank {root}")

    def _gather(self, tensor: Tensor, axis: Axis) -> Tensor:
        name = _op_name("allgather", axis, [(tensor.dtype, tensor.shape[1:])])
        handle = self.hvd.allgather_async(tensor, name=name, process_set=self.sets[axis])
        return self._wait([handle], f"a Horovod allgather over the {axis} ranks")[0]

    def _wait(self, handles: list[Any], what: str) -> list[Tensor]:
        self.grid.wait(lambda: all(self.hvd.poll(h) for h in handles), what)
        return [self.hvd.synchronize(h) for h in handles]


def _op_name(kind: str, where: object, signature: list[tuple[torch.dtype, torch.Size]]) -> str:
    """A Horovod name that is the same for the same call on every rank and every step.

    Horovod names an unnamed collective per call (`.noname.<handle>`), so each step added
    new entries to its response cache until, past HOROVOD_CACHE_CAPACITY (1024) of them,
    every rank warned "A response has been evicted from cache". Named by what they move,
    a run's collectives are a few cache entries, hit on every step. Equal names with other
    shapes (the gather of a shorter last batch) only renegotiate; they are never mixed up.
    """
    digest = zlib.crc32(";".join(f"{dtype}{tuple(shape)}" for dtype, shape in signature).encode())
    return f"hpcbnn.{kind}.{where}.{digest:08x}"


class TorchCollectives(Collectives):
    """torch.distributed (Gloo on CPU, NCCL on GPU), groups built from the same grid."""

    def __init__(self, grid: ProcessGrid) -> None:
        super().__init__(grid)
        import torch.distributed as dist

        self.dist = dist
        backend = "nccl" if grid.device.type == "cuda" else "gloo"
        self.timeout = datetime.timedelta(seconds=grid.timeout + BACKSTOP_S)
        address, reserved = _rendezvous_address() if grid.is_root else (None, None)
        address = grid.bcast(address, "rank 0's torch.distributed rendezvous address")
        dist.init_process_group(
            backend,
            init_method=f"tcp://{address}",
            rank=grid.rank,
            world_size=grid.size,
            timeout=self.timeout,
            device_id=grid.device if backend == "nccl" else None,
        )
        if reserved:
            reserved.close()  # the store listens on the port now
        self.groups = {
            "world": dist.group.WORLD,
            "sample": self._own_group(grid.sample_comm),
            "data": self._own_group(grid.data_comm),
        }
        # Gloo and NCCL pair a group's collectives by their order: gradients reduced while backward
        # runs get groups of their own, so that they never pair with the gather's adjoint, which
        # backward issues at a point of its own on each rank.
        self.gradient_groups = {
            "world": self._own_group(grid.world),
            "sample": self._own_group(grid.sample_comm),
            "data": self._own_group(grid.data_comm),
        }
        # Nobody leaves while a peer still builds its groups through rank 0's store.
        grid.barrier("the start of torch.distributed (its process groups)")
        # A Gloo worker thread drops its reference to a finished collective's tensor just after
        # the caller's wait returns, and that needs the GIL; if Python is already shutting down,
        # the thread is killed and the finished job aborts ("terminate called without an
        # active exception"). A short GIL-free pause at exit lets the workers finish first.
        atexit.register(time.sleep, 0.2)

    def _own_group(self, comm: MPI.Comm) -> ProcessGroup:
        """Every rank must create every group, in the same order; keep the one holding us."""
        members = comm.allgather(self.grid.rank)
        every = sorted({tuple(g) for g in self.grid.world.allgather(members)})
        groups = {g: self.dist.new_group(list(g), timeout=self.timeout) for g in every}
        return cast("ProcessGroup", groups[tuple(members)])  # a member's group, never NON_GROUP_MEMBER

    def _start_allreduce(
        self, tensors: list[Tensor], axis: Axis, average: bool, gradient: int | None = None
    ) -> Reduction:
        alone = len(tensors) == 1 and tensors[0].is_contiguous()
        flat = tensors[0] if alone else torch.cat([t.reshape(-1) for t in tensors])
        groups = self.groups if gradient is None else self.gradient_groups
        work = self.dist.all_reduce(flat, group=groups[axis], async_op=True)

        def finish() -> None:
            self._wait([work], f"an allreduce over the {axis} ranks")
            if average:
                flat.div_(self.grid.axis_size(axis))
            if flat is not tensors[0]:
                offset = 0
                for t in tensors:
                    t.copy_(flat[offset : offset + t.numel()].view_as(t))
                    offset += t.numel()

        return Reduction(work.is_completed, finish)

    def _broadcast_(self, tensors: list[Tensor], root: int) -> None:
        works = [self.dist.broadcast(t, src=root, async_op=True) for t in tensors]
        self._wait(works, f"a broadcast from rank {root}")

    def _gather(self, tensor: Tensor, axis: Axis) -> Tensor:
        parts = [torch.empty_like(tensor) for _ in range(self.grid.axis_size(axis))]
        self._wait(
            [self.dist.all_gather(parts, tensor, group=self.groups[axis], async_op=True)],
            f"an allgather over the {axis} ranks",
        )
        return torch.cat(parts)

    def _wait(self, works: list[Any], what: str) -> None:
        self.grid.wait(lambda: all(w.is_completed() for w in works), f"{what} (torch.distributed)")
        for work in works:
            work.wait()  # raises what the backend saw (a peer's lost connection)


def _rendezvous_address() -> tuple[str, socket.socket | None]:
    """Where rank 0's store will listen: MASTER_ADDR and MASTER_PORT when the environment
    exports them (the job scripts do), else this host and a port the system picks.

    A picked port stays bound (not listening, SO_REUSEADDR) until the store listens on it:
    Linux lets the store bind it then, but hands it to no other socket in between, so no
    process can take it between choosing and using it. The caller closes the socket.
    """
    host = os.environ.get("MASTER_ADDR") or socket.gethostbyname(socket.gethostname())
    if os.environ.get("MASTER_PORT"):
        return f"{host}:{int(os.environ['MASTER_PORT'])}", None
    reserved = socket.socket()
    reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    reserved.bind(("", 0))
    return f"{host}:{reserved.getsockname()[1]}", reserved


def make_collectives(grid: ProcessGrid, backend: str) -> Collectives:
    """The collectives of `backend` ("horovod" or "torch") on `grid`."""
    if backend == "horovod":
        return HorovodCollectives(grid)
    if backend == "torch":
        return TorchCollectives(grid)
    from hpcbnn.errors import UsageError

    raise UsageError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
