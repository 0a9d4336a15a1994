"""Horovod collectives hit its response cache: a long run prints no eviction warning; fusion
stops at 1 MiB unless the user sets HOROVOD_FUSION_THRESHOLD. Gradient reductions overlap
backward on both backends."""

from __future__ import annotations

import importlib.util
import json

import pytest

from tests.mpi import run_mpi

pytestmark = [pytest.mark.mpi, pytest.mark.skipif(
    importlib.util.find_spec("horovod") is None, reason="Horovod is not installed: run `make setup`")]


def test_many_steps_print_no_cache_eviction() -> None:
    """130 steps of ~10 collectives each: unnamed, they exceed HOROVOD_CACHE_CAPACITY (1024)
    and every rank prints "A response has been evicted from cache"."""
    result = run_mpi(2, ["tests/programs/horovod_cache.py", "130"], timeout=120)
    assert result.returncode == 0, result.output[-3000:]
    assert result.stdout.count("130 steps, ranks agree") == 2, result.output[-3000:]
    assert result.stdout.count("fusion threshold 1048576") == 2, "hpcbnn's default fusion threshold"
    assert "evicted" not in result.output, result.output[-3000:]
    assert " W " not in result.output and "warn" not in result.output.lower(), result.output[-3000:]


@pytest.mark.parametrize("np, mode, k, backend, reduction", [
    (2, "sample", 0, "horovod", "world"), (2, "sample", 0, "torch", "world"),
    (2, "data", 0, "torch", "hierarchical"),  # one sample per group: the reduction over data overlaps
    (4, "hybrid", 2, "torch", "hierarchical"), (4, "hybrid", 2, "horovod", "hierarchical"),
])
def test_gradient_reductions_start_during_backward(np: int, mode: str, k: int, backend: str, reduction: str) -> None:
    """The gradients made by backward start their reductions inside it (the overlap), in one
    order on every rank although backward finishes two of them in a rank-dependent order; one
    accumulated before the block is reduced at its exit; all end as the ranks' average; a
    frozen parameter in the list is skipped. Hierarchically, each gradient's reduction over
    data follows its reduction over samples as soon as that ends: `during` names the first."""
    result = run_mpi(np, ["tests/programs/overlap.py", mode, str(k), backend, reduction], timeout=120)
    assert result.returncode == 0, result.output[-3000:]
    records = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(records) == np
    for record in records:
        assert record["during"] == [2, 3, 4, 5, 6, 7], record  # the model's, u and v; not early (0)
        assert record["error"] < 1e-12 and record["frozen"], record
