"""The sampling context: which Monte-Carlo samples a forward pass evaluates, and their noise.

    with sampling(seed, step, samples=range(4, 8), batch=slice(0, 64), global_batch=128):
        out = model(x)      # x: [k*B_local, ...], rows j*B:(j+1)*B belong to samples[j]

Inside, the noise of global sample `s` for a layer is drawn from a generator seeded by a
hash of (seed, step, s, layer key, stream) alone, so every partition of the samples over
ranks reproduces the same weights. On the CPU, normal noise comes from hpcbnn.bnn.rng's
counter-based kernel (Philox4x32-10, 4x faster than torch's generator and bit-identical on
every x86 code path, so ranks on different nodes agree); on a GPU from torch's generator.
Per-example noise (Flipout signs, local reparameterisation) is drawn for the whole global
batch and the rank's rows `batch` are taken from it, so splitting the batch over
data-parallel ranks changes nothing either.
Noise is reproducible for one device type (CPU and CUDA generators differ).

Outside any context a Bayesian layer behaves like dropout: in training mode it draws one
weight sample from torch's global RNG per call (k = 1); in `model.eval()` it uses the
posterior mean. Inside `sampling(...)` it always samples, in either mode: that is how the
Monte-Carlo predictive is evaluated.
"""

from __future__ import annotations

import hashlib
import itertools
import struct
import threading
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from hpcbnn.bnn.rng import CompilerNotFound, Weights, fill_normal, scale_shift
from hpcbnn.errors import UsageError

WEIGHTS, EXAMPLES = 0, 1  # noise streams: per weight, per example

_keys = itertools.count()


def next_key() -> int:
    """A default layer key: the construction order, identical on ranks that build the same model."""
    return next(_keys)


def assign_noise_keys(model: nn.Module) -> None:
    """Key every Bayesian layer by a CRC of its qualified name: stable across processes and runs.

    The name also names the layer's random variables under a tracer (hpcbnn.bnn.variables)."""
    for name, module in model.named_modules():
        if hasattr(module, "noise_key"):
            module.noise_key = zlib.crc32(name.encode())
            module.variable_name = name


@dataclass(frozen=True)
class Sampling:
    """The samples (global indices) and the batch rows one forward pass evaluates."""

    seed: int
    step: int
    samples: tuple[int, ...]
    batch: slice | None
    global_batch: int | None
    shared_input: torch.Tensor | None = None
    """The model's input when its k blocks of rows are copies of one batch (see `shared_rows`)."""
    shared_version: int = 0

    def shared_rows(self, x: torch.Tensor) -> torch.Tensor | None:
        """x's first block of rows [n/k, ...] when x is `shared_input` or a view of all of it,
        unchanged since the context began and not requiring grad; else None.

        Then every sample sees the same rows, and a product of x with something the samples
        share (a layer's means, local reparameterisation's variances) is the same for all k:
        computed once on the block, it costs 1/k. Gradients are the same sums in another order.
        """
        s = self.shared_input
        if (
            s is None
            or x.requires_grad
            or x.data_ptr() != s.data_ptr()
            or x.numel() != s.numel()
            or not x.is_contiguous()
            or s._version != self.shared_version
            or x.dim() == 0
            or x.shape[0] % len(self.samples)
        ):
            return None
        k = len(self.samples)
        return x.view(k, x.shape[0] // k, *x.shape[1:])[0]

    def split_rows(self, n_rows: int) -> tuple[int, slice]:
        """(global batch, this rank's rows of it) for a sample-major input of `n_rows` = k*B_local rows."""
        k = len(self.samples)
        if n_rows % k:
            raise UsageError(
                f"input has {n_rows} rows, not a multiple of the {k} samples in sampling(); "
                f"stack the batch once per sample (sample-major)"
            )
        b = n_rows // k
        batch = self.batch or slice(0, b)
        if batch.stop - batch.start != b:
            raise UsageError(
                f"sampling(batch={batch}) names {batch.stop - batch.start} rows but the input has {b} per sample"
            )
        return self.global_batch or b, batch


class _State(threading.local):
    def __init__(self) -> None:
        self.current: Sampling | None = None


_state = _State()


def current() -> Sampling | None:
    """The innermost active sampling context, or None."""
    return _state.current


@contextmanager
def sampling(
    seed: int,
    step: int,
    samples: Sequence[int],
    batch: slice | None = None,
    global_batch: int | None = None,
    shared_input: torch.Tensor | None = None,
) -> Iterator[Sampling]:
    """Evaluate the global Monte-Carlo `samples` of step `step` in the forward passes inside.

    `shared_input`: the [k*B, ...] input when its k blocks are copies of one batch (the
    Engine's, without per-sample augmentation). Layers that see it (or a view of it) compute
    their sample-invariant products on one block (`Sampling.shared_rows`).
    """
    if not len(samples):
        raise UsageError("sampling() needs at least one sample index")
    if shared_input is not None and (not shared_input.is_contiguous() or shared_input.shape[0] % len(samples)):
        raise UsageError(
            f"sampling(shared_input=...) needs a contiguous input of k*B rows for the {len(samples)} samples, "
            f"got shape {tuple(shared_input.shape)}"
        )
    version = 0 if shared_input is None else shared_input._version
    ctx = Sampling(int(seed), int(step), tuple(int(s) for s in samples), batch, global_batch, shared_input, version)
    outer, _state.current = _state.current, ctx
    try:
        yield ctx
    finally:
        _state.current = outer


def generator_seed(seed: int, step: int, sample: int, key: int, stream: int) -> int:
    """A 63-bit seed that depends on its arguments only (no rank, no call order)."""
    digest = hashlib.blake2b(struct.pack("<5q", seed, step, sample, key, stream), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


_pools: dict[int, ThreadPoolExecutor] = {}


def _parallel(fill: Callable[[int], object], k: int, numel: int, device: torch.device) -> None:
    """Run fill(0..k-1). Each sample has its own generator and torch's CPU normal_ is serial,
    so torch's intra-op threads share the samples (the results do not depend on it)."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or k == 1 or threads == 1 or numel < (1 << 16):
        for j in range(k):
            fill(j)
        return
    pool = _pools.get(threads) or _pools.setdefault(threads, ThreadPoolExecutor(threads, "hpcbnn-noise"))
    list(pool.map(fill, range(k)))


def _draw(
    out: torch.Tensor, ctx: Sampling, key: int, stream: int, sample: Callable[[torch.Tensor, torch.Generator], object]
) -> None:
    per = out[0].numel()

    def fill(j: int) -> None:
        gen = torch.Generator(out.device).manual_seed(generator_seed(ctx.seed, ctx.step, ctx.samples[j], key, stream))
        sample(out[j], gen)

    _parallel(fill, out.shape[0], per, out.device)


def _draw_normal(out: torch.Tensor, ctx: Sampling, key: int, stream: int, weights: Weights | None = None) -> None:
    """Standard normal noise in `out` [k, ...], row j for sample ctx.samples[j] (and `weights`, see weight_noise)."""
    if out.device.type != "cpu" or out.dtype not in (torch.float32, torch.float64):
        _draw(out, ctx, key, stream, lambda t, g: t.normal_(generator=g))
        _write_weights(out, weights)
        return
    try:
        fill_normal(out, [generator_seed(ctx.seed, ctx.step, s, key, stream) for s in ctx.samples], weights=weights)
    except CompilerNotFound as e:
        raise UsageError(str(e)) from None


def _write_weights(eps: torch.Tensor, weights: Weights | None) -> None:
    if weights is not None:
        mu, sigma, w = weights
        weight_samples(eps[:, : sigma.numel()], sigma, mu, w)


def weight_samples(eps: torch.Tensor, sigma: torch.Tensor, mu: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """out[s] = mu + sigma * eps[s] (sigma * eps[s] without mu) for the k rows of eps, which may be
    slices of longer rows: on the CPU the kernel's bits (those `weight_noise(weights=...)` writes),
    elsewhere torch's."""
    if eps.device.type == "cpu" and eps.dtype in (torch.float32, torch.float64) and eps[0].is_contiguous():
        return scale_shift(out, eps, sigma.contiguous(), None if mu is None else mu.contiguous())
    part = eps.reshape(out.shape)
    return torch.mul(sigma, part, out=out) if mu is None else torch.addcmul(mu, sigma, part, out=out)


def weight_noise(
    key: int,
    shape: Sequence[int],
    dtype: torch.dtype,
    device: torch.device,
    reuse: torch.Tensor | None = None,
    weights: Weights | None = None,
) -> torch.Tensor:
    """Standard normal noise [k, *shape] for the k samples of the context (k = 1 from the global RNG outside).

    `reuse`, a tensor from an earlier call, is refilled in place when its shape, dtype and
    device fit: large fresh allocations cost page faults on every step. `weights` = (mu, sigma, w)
    also writes the k weight samples w[j] = sigma * eps[j, :m] + mu (m = sigma.numel()), on the
    CPU in the same pass as the draws (hpcbnn.bnn.rng.fill_normal).
    """
    ctx = current()
    k = 1 if ctx is None else len(ctx.samples)
    full = (k, *shape)
    if reuse is not None and reuse.shape == full and reuse.dtype == dtype and reuse.device == torch.device(device):
        out = reuse
    else:
        out = torch.empty(full, dtype=dtype, device=device)
    if ctx is None:
        _write_weights(out.normal_(), weights)
        return out
    _draw_normal(out, ctx, key, WEIGHTS, weights)
    return out


def example_noise(
    key: int, n_rows: int, shape: Sequence[int], dtype: torch.dtype, device: torch.device, kind: str = "normal"
) -> torch.Tensor:
    """Per-example noise [n_rows, *shape] for a sample-major input of `n_rows` = k*B_local rows.

    `kind` is "normal" or "sign" (+-1). Drawn for the global batch, the rank's rows taken. A sign
    is the sign of a normal draw from the fast kernel: +1 and -1 with probability 1/2 each (its
    draws are symmetric); torch's Bernoulli sampler was a sixth of a flipout step.
    """
    ctx = current()
    if ctx is None:
        full = torch.empty(n_rows, *shape, dtype=dtype, device=device).normal_()
    else:
        global_batch, batch = ctx.split_rows(n_rows)
        full = torch.empty(len(ctx.samples), global_batch, *shape, dtype=dtype, device=device)
        _draw_normal(full, ctx, key, EXAMPLES)
    if kind == "sign":
        torch.copysign(full.new_ones(()), full, out=full)  # in place; +1 for a draw of +0
    return full if ctx is None else full[:, batch].reshape(n_rows, *shape)
