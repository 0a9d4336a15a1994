"""Is the data loader ever the bottleneck? Throughput against raw h5py, and the stall of a training loop.

    python -m benchmarks.loader [--file F.h5] [--n 20000] [--batch 128] [--compute_ms 5 20]
                                [--preload_limit_mib M]

On a CIFAR-like file (uint8 [3, 32, 32], written to a temporary directory unless --file
is given) it reads the batches of one shuffled epoch four ways:

  raw h5py     `x[sorted batch indices]`, the plain h5py way (no normalisation)
  stream       Loader without prefetch or preload: grouped reads + unsort + normalise
  reader       Loader streaming through its reader process (prefetch 2); CPU is this process's
  preload      Loader holding the split in memory

and prints examples/s and the ratio to raw h5py. Then it runs a training loop whose
step is a fixed amount of torch work taking a given time alone (it releases the GIL like
a real forward/backward) and reports the stall fraction: 1 - (median step computing alone)
/ (median step fed by the loader), which counts both waiting for a batch and compute
slowed down by the loader's background work (h5py holds the GIL while it reads). The
streaming loaders get the default preload choice with a preload limit of a quarter of the
split (issue 13: a file 4x larger than the limit, so they stream): without prefetch, with a
prefetch thread in this process (the old way), and with the reader process; the preloaded
ones without and with prefetch (2 batches ahead). Target: stall < 5%. The last line is
one JSON object with the stall fractions.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from hpcbnn.data import Loader
from hpcbnn.data.format import DatasetWriter, open_h5
from hpcbnn.parallel.grid import ProcessGrid


def synthetic(path: Path, n: int) -> Path:
    """n random 3x32x32 uint8 images with 10 classes, through the real writer (chunks, checksums)."""
    rng = np.random.default_rng(0)
    counts = {"train": n, "val": 64, "test": 64}
    with DatasetWriter(path, task="classification", input_shape=(3, 32, 32), num_classes=10,
                       counts=counts, x_dtype=np.uint8) as w:
        for split, m in counts.items():
            for s in range(0, m, 4096):
                k = min(4096, m - s)
                w.append(split, rng.integers(0, 256, (k, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, k))
    return path


def raw_epoch(path: Path, order: np.ndarray) -> tuple[float, float]:
    """Wall and CPU seconds of reading every batch with h5py's fancy indexing."""
    with open_h5(path) as f:
        x = f["train/x"]
        start, cpu = time.perf_counter(), time.process_time()
        for batch in order:
            x[np.sort(batch)]
        return time.perf_counter() - start, time.process_time() - cpu


def loader_epoch(loader: Loader) -> tuple[float, float]:
    """Wall and CPU seconds of one epoch through the loader (without prefetch: one thread)."""
    start, cpu = time.perf_counter(), time.process_time()
    for _ in loader.epoch(0):
        pass
    return time.perf_counter() - start, time.process_time() - cpu


def best(fn, *args, repeats: int = 2) -> tuple[float, float]:
    runs = [fn(*args) for _ in range(repeats)]
    return min(r[0] for r in runs), min(r[1] for r in runs)


def calibrate(seconds: float) -> int:
    """Matmuls of 192x192 that take `seconds` on this machine, alone."""
    a = torch.randn(192, 192)
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < 0.3:
        a = torch.tanh(a @ a)
        n += 1
    return max(1, round(n * seconds / (time.perf_counter() - start)))


def compute(work: int) -> None:
    """A fixed amount of torch work (which releases the GIL, like a training step)."""
    a = torch.randn(192, 192)
    for _ in range(work):
        a = torch.tanh(a @ a)


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def stall(loader: Loader, work: int, steps: int, block: int = 12) -> float:
    """The share of a training step that is not computing: 1 - (compute alone) / (step fed by
    the loader), which counts waiting for the batch and compute slowed by the loader's thread
    (the GIL). Blocks of steps alone and fed alternate, so that changing load on the machine
    weighs on both, and medians are compared; the first steps of a fed block are left out,
    as the loader filled its queue during the block alone."""
    alone, fed = [], []
    batches = loader.epoch(1)
    for _ in range(max(1, steps // block)):
        alone += [timed(compute, work) for _ in range(block)]
        for i in range(block):
            start = time.perf_counter()
            next(batches)
            compute(work)
            if i > loader.prefetch:
                fed.append(time.perf_counter() - start)
    batches.close()
    return max(0.0, 1 - statistics.median(alone) / statistics.median(fed))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--file", type=Path, help="an hpcbnn HDF5 file (default: a synthetic CIFAR-like one)")
    p.add_argument("--n", type=int, default=20_000, help="training examples of the synthetic file")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--compute_ms", type=float, nargs="+", default=[5.0, 20.0],
                   help="simulated compute per step for the stall measurement")
    p.add_argument("--steps", type=int, default=60, help="steps of each stall loop")
    p.add_argument("--preload_limit_mib", type=float,
                   help="the streaming loaders' preload limit (default: a quarter of the training split)")
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    grid = ProcessGrid(device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        path = args.file or synthetic(Path(tmp) / "bench.h5", args.n)
        kw = dict(batch_size=args.batch, verify=False)
        stream = Loader(path, "train", grid, prefetch=0, preload=False, **kw)
        order = stream.order(0)
        row = stream.info.x_dtype.itemsize * int(np.prod(stream.info.input_shape))
        split = row * stream.info.n
        limit = int(args.preload_limit_mib * 2**20) if args.preload_limit_mib else split // 4
        with open_h5(path) as f:
            chunk = f["train/x"].chunks[0]
        print(f"{path}: {stream.info.n} examples of {list(stream.info.input_shape)} {stream.info.x_dtype} "
              f"({row} B, {chunk} per chunk; {split / 2**20:.1f} MiB, {split / limit:.1f}x the preload limit of "
              f"{limit / 2**20:.1f} MiB), batch {args.batch}, {len(order)} batches per epoch, "
              f"torch threads {torch.get_num_threads()}")
        reader = Loader(path, "train", grid, prefetch=2, preload_limit=limit, **kw)
        preload = Loader(path, "train", grid, prefetch=0, preload=True, **kw)
        raw = best(raw_epoch, path, order)
        measured = {"raw h5py": raw, **{name: best(loader_epoch, loader) for name, loader in
                                        (("stream", stream), ("reader", reader), ("preload", preload))}}
        examples = order.size
        print(f"{'reader':<12}{'examples/s':>12}{'ms/batch':>10}{'CPU ms/batch':>14}{'vs raw h5py':>13}")
        for name, (seconds, cpu) in measured.items():
            print(f"{name:<12}{examples / seconds:>12.0f}{1e3 * seconds / len(order):>10.2f}"
                  f"{1e3 * cpu / len(order):>14.2f}{raw[0] / seconds:>12.2f}x")
        loaders = {
            "stream": Loader(path, "train", grid, prefetch=0, preload_limit=limit, **kw),
            "stream+prefetch": Loader(path, "train", grid, prefetch=2, preload_limit=limit, reader_process=False, **kw),
            "reader": reader,
            **{f"preload{'+prefetch' if ahead else ''}": Loader(path, "train", grid, prefetch=ahead, preload=True, **kw)
               for ahead in (0, 2)},
        }
        assert not any(loaders[name].preloaded for name in ("stream", "stream+prefetch", "reader"))
        steps = min(args.steps, len(order))  # one epoch at most
        print(f"stall (target < 5%){''.join(f'{name:>18}' for name in loaders)}")
        stalls: dict[str, dict[str, float]] = {name: {} for name in loaders}
        for ms in args.compute_ms:
            work = calibrate(ms / 1e3)
            for name, loader in loaders.items():
                stalls[name][f"{ms:g}"] = round(stall(loader, work, steps), 4)
            print(f"{f'{ms:g} ms compute':<20}" + "".join(f"{100 * s[f'{ms:g}']:>17.1f}%" for s in stalls.values()))
        for loader in (stream, preload, *loaders.values()):
            loader.close()
    print(json.dumps({"file_mib": round(split / 2**20, 2), "preload_limit_mib": round(limit / 2**20, 2),
                      "batch": args.batch, "torch_threads": torch.get_num_threads(), "compute_ms": args.compute_ms,
                      "stall": stalls, "target": 0.05}))

if __name__ == "__main__":
    main()
