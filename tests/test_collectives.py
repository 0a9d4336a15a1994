"""Horovod collectives hit its response cache: a long run prints no eviction warning; fusion
stops at 1 MiB unless the user sets HOROVOD_FUSION_THRESHOLD."""

from __future__ import annotations

import importlib.util

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
