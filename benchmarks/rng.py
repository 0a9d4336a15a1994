"""ns per standard normal draw: torch's normal_ against hpcbnn.bnn.rng.fill_normal.

    python -m benchmarks.rng [--rows 8] [--per_row 4194304] [--threads 1 2]

The workload of a Bayesian step: k rows (Monte-Carlo samples) of one layer's weights, each from
its own seed. torch draws each row from its own Generator (as hpcbnn.bnn.noise does, one row
per thread); fill_normal splits rows and tiles over torch.get_num_threads() threads. Prints a
table and a last JSON line.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from hpcbnn.bnn.rng import fill_normal, isa


def ns_per_draw(fn: Callable[[], object], draws: int, repeats: int) -> float:
    """The best of `repeats` timed calls after a warm-up: the least disturbed by other load."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best / draws * 1e9


def torch_normal(out: torch.Tensor, seeds: list[int], pool: ThreadPoolExecutor | None) -> Callable[[], object]:
    gens = [torch.Generator().manual_seed(s) for s in seeds]

    def row(j: int) -> None:
        out[j].normal_(generator=gens[j])

    if pool is None:
        return lambda: [row(j) for j in range(len(seeds))]
    return lambda: list(pool.map(row, range(len(seeds))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--per_row", type=int, default=1 << 22)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    seeds = [0x9E3779B97F4A7C15 * (j + 1) % 2**63 for j in range(args.rows)]
    draws = args.rows * args.per_row
    results = []
    print(f"{args.rows} rows x {args.per_row} draws, fill_normal code path {isa()}")
    print(f"{'dtype':8} {'threads':>7} {'torch ns':>9} {'rng ns':>7} {'speedup':>7}")
    for dtype in (torch.float32, torch.float64):
        out = torch.empty(args.rows, args.per_row, dtype=dtype)
        for threads in args.threads:
            torch.set_num_threads(threads)
            with ThreadPoolExecutor(threads) as pool:
                t_torch = ns_per_draw(torch_normal(out, seeds, pool if threads > 1 else None), draws, args.repeats)
            t_rng = ns_per_draw(functools.partial(fill_normal, out, seeds), draws, args.repeats)
            name = str(dtype).removeprefix("torch.")
            print(f"{name:8} {threads:7d} {t_torch:9.3f} {t_rng:7.3f} {t_torch / t_rng:6.1f}x")
            results.append(
                {"dtype": name, "threads": threads, "torch_ns": round(t_torch, 4), "rng_ns": round(t_rng, 4)}
            )
    print(json.dumps({"isa": isa(), "rows": args.rows, "per_row": args.per_row, "results": results}))


if __name__ == "__main__":
    main()
