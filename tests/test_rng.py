"""hpcbnn.bnn.rng: standard normal noise that is a pure function of (seed, index), bit-identical
over threads, splits, processes and code paths (the ranks of a cluster must agree)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
from scipy import stats

from hpcbnn import native
from hpcbnn.bnn import rng
from hpcbnn.bnn.rng import CompilerNotFound, fill_normal

DTYPES = [torch.float32, torch.float64]
SEEDS = [0, 1, 2, 3, 2**63 - 1, 2**64 - 1, 0x123456789ABCDEF, 987654321]


def _paths() -> list[str]:
    """Every code path this CPU runs."""
    flags = native.cpu_flags()
    return [name for name in rng._ISA_FLAGS if name not in rng._ISA_CPU_FLAGS or rng._ISA_CPU_FLAGS[name] <= flags]


def _draw(seeds: list[int], n: int, dtype: torch.dtype, offset: int = 0, isa: str | None = None) -> torch.Tensor:
    return fill_normal(torch.empty(len(seeds), n, dtype=dtype), seeds, offset, isa_name=isa)


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def _u32(words: torch.Tensor) -> np.ndarray:
    return words.numpy().view(np.uint32).astype(np.uint64)


def test_philox_matches_the_random123_known_answers():
    cases = [
        ([0, 0, 0, 0], (0, 0), [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
        ([0xFFFFFFFF] * 4, (0xFFFFFFFF, 0xFFFFFFFF), [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
        (
            [0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344],
            (0xA4093822, 0x299F31D0),
            [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1],
        ),
    ]
    for counter, key, expected in cases:
        words = torch.from_numpy(np.array([counter], dtype=np.uint32).view(np.int32))
        assert _u32(rng._philox4x32_10(words, key))[0].tolist() == expected


@pytest.mark.parametrize("dtype", DTYPES)
def test_values_follow_the_documented_construction(dtype):
    """Element e: Philox block (tile * 64 + lane), Box-Muller of its words, recomputed in float64 numpy."""
    seed, n, offset = 0xDEADBEEF12345, 3000, 777
    per = 4 if dtype == torch.float32 else 2  # normals per block
    e = np.arange(offset, offset + n, dtype=np.uint64)
    tile, t = e // (64 * per), e % (64 * per)
    word, block = t // 64, tile * 64 + t % 64
    counters = np.stack([block & 0xFFFFFFFF, block >> 32, 0 * block, 0 * block], 1).astype(np.uint32)
    w = _u32(rng._philox4x32_10(torch.from_numpy(counters.view(np.int32)), (seed & 0xFFFFFFFF, seed >> 32)))
    if dtype == torch.float32:
        pair = (word // 2).astype(np.int64)
        rows = np.arange(n)
        x_r, x_a = w[rows, 2 * pair], w[rows, 2 * pair + 1]
        u = ((x_r >> 1).astype(np.float64) + 0.5) * 2.0**-31
        angle = 2 * np.pi * (x_a.astype(np.float64) + 0.5) * 2.0**-32
        tol = {"rtol": 1e-5, "atol": 2e-5}
    else:
        m = ((w[:, 0] << 20) | (w[:, 1] >> 12)).astype(np.float64)
        b = ((w[:, 2] << 21) | (w[:, 3] >> 11)).astype(np.float64)
        u, angle = (m + 0.5) * 2.0**-52, 2 * np.pi * (b + 0.5) * 2.0**-53
        tol = {"rtol": 1e-12, "atol": 1e-12}
    radius = np.sqrt(-2 * np.log(u))
    expected = np.where(word % 2 == 0, radius * np.cos(angle), radius * np.sin(angle))
    np.testing.assert_allclose(_draw([seed], n, dtype, offset)[0].double().numpy(), expected, **tol)


@pytest.mark.parametrize("dtype, crc", [(torch.float32, 0x2988949D), (torch.float64, 0x31ECF9E7)])
def test_the_bits_are_frozen(dtype, crc):
    """Runs of other versions, or builds by other compilers, must draw the same noise."""
    assert zlib.crc32(_draw([1, 2**63 - 1], 4099, dtype, 5).numpy().tobytes()) == crc


@pytest.mark.parametrize("dtype", DTYPES)
def test_moments_and_ks_against_the_normal_cdf(dtype):
    x = _draw([11, 12, 13, 14], 1_000_000, dtype).double().flatten().numpy()
    n = len(x)
    assert abs(x.mean()) < 5 / math.sqrt(n)
    assert abs(x.var() - 1) < 5 * math.sqrt(2 / n)
    assert abs(stats.kurtosis(x, fisher=False) - 3) < 5 * math.sqrt(24 / n)
    assert abs(stats.skew(x)) < 5 * math.sqrt(6 / n)
    assert stats.kstest(x, "norm").pvalue > 1e-3
    # the tails too: the share beyond 4 sigma (6.3e-5) within 5 standard errors
    tail, p = (np.abs(x) > 4).mean(), 2 * stats.norm.sf(4)
    assert abs(tail - p) < 5 * math.sqrt(p / n)


@pytest.mark.parametrize("dtype", DTYPES)
def test_seeds_and_neighbouring_elements_are_uncorrelated(dtype):
    n = 200_000
    x = _draw([*range(100, 108), *SEEDS], n, dtype).double()  # adjacent and spread seeds
    bound = 5 / math.sqrt(n)
    corr = torch.corrcoef(x)
    assert (corr - torch.eye(len(x), dtype=corr.dtype)).abs().max() < bound
    row = x[0]
    for lag in (1, 2, 63, 64, 128, 192, 256):  # the words of one block sit 64 apart
        a, b = row[:-lag], row[lag:]
        assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1]) < bound
        assert abs(torch.corrcoef(torch.stack([a * a, b * b]))[0, 1]) < bound  # radius shared by a pair


@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_threads_and_offsets_do_not_change_the_values(dtype, threads):
    n = 70_001  # not a multiple of a tile
    threads(1)
    ref = _draw(SEEDS, n, dtype)
    for t in (2, 3):
        threads(t)
        assert torch.equal(_draw(SEEDS, n, dtype), ref)
    for j in (0, 3, 7):
        assert torch.equal(_draw([SEEDS[j]], n, dtype)[0], ref[j])
    for offset, length in ((0, 1), (0, 255), (1, 100), (37, 40_000), (256, 513), (n - 5, 5)):
        assert torch.equal(_draw(SEEDS, length, dtype, offset), ref[:, offset : offset + length])
    threads(2)
    assert torch.equal(_draw(SEEDS[:2], 1000, dtype), ref[:2, :1000])  # a prefix of a longer row


def test_a_tensor_of_any_shape_is_filled_row_by_row():
    out = fill_normal(torch.empty(3, 5, 7, 11), [4, 5, 6])
    assert torch.equal(out.flatten(1), _draw([4, 5, 6], 5 * 7 * 11, torch.float32))


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_code_path_gives_the_scalar_bits(dtype, threads):
    """Vector widths differ between the nodes of a cluster: their values may not."""
    threads(2)
    ref = _draw(SEEDS, 5000, dtype, 123, isa="scalar")
    for name in _paths():
        assert torch.equal(_draw(SEEDS, 5000, dtype, 123, isa=name), ref), name


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_mu", [True, False])
def test_weight_samples_written_with_the_draws_are_one_fma_on_every_code_path(dtype, with_mu, threads):
    """A layer's weight samples mu + sigma * eps_s (or sigma * eps_s), written in the pass that
    draws eps (rows of weights then bias): the draws are unchanged, the samples are the exactly
    rounded fma on every code path and thread count, and scale_shift gives the same bits later."""
    threads(2)
    k, m, n = 3, 4000, 4100
    gen = torch.Generator().manual_seed(0)
    mu = torch.randn(40, 100, dtype=dtype, generator=gen) if with_mu else None
    sigma = torch.rand(40, 100, dtype=dtype, generator=gen)
    draws = _draw(SEEDS[:k], n, dtype, 7)
    eps = draws[:, :m].view(k, 40, 100)
    exact = sigma.double() * eps.double() + (0 if mu is None else mu.double())  # float32's fma, before its rounding
    first = None
    for name in _paths():
        for t in (1, 2):
            threads(t)
            out, w = torch.empty(k, n, dtype=dtype), torch.empty(k, 40, 100, dtype=dtype)
            fill_normal(out, SEEDS[:k], 7, weights=(mu, sigma, w), isa_name=name)
            assert torch.equal(out, draws), name
            if dtype == torch.float32:
                assert torch.equal(w, exact.float()), name
            else:  # the reference rounds twice: within 2 ulps of the terms, and the same bits on every path
                scale = (sigma * eps).abs() + (0 if mu is None else mu.abs())
                assert torch.all((w - exact).abs() <= 2**-51 * scale), name
            first = w if first is None else first
            assert torch.equal(w, first), name
            assert torch.equal(rng.scale_shift(torch.empty_like(w), draws[:, :m], sigma, mu), w)


def test_weight_samples_of_the_wrong_shape_are_refused():
    out, sigma = torch.empty(2, 10), torch.ones(8)
    with pytest.raises(ValueError, match="weights"):
        fill_normal(out, [1, 2], weights=(None, sigma, torch.empty(2, 7)))
    with pytest.raises(ValueError, match="weights"):
        fill_normal(out, [1, 2], weights=(torch.ones(8, dtype=torch.float64), sigma, torch.empty(2, 8)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_flush_to_zero_changes_nothing(dtype):
    ref = _draw(SEEDS, 10_000, dtype)
    torch.set_flush_denormal(True)
    try:
        assert torch.equal(_draw(SEEDS, 10_000, dtype), ref)
    finally:
        torch.set_flush_denormal(False)


_CHILD = """
import sys, torch
from hpcbnn.bnn.rng import fill_normal
torch.set_num_threads(int(sys.argv[1]))
for dtype in (torch.float32, torch.float64):
    sys.stdout.write(fill_normal(torch.empty(3, 1000, dtype=dtype), [5, 6, 2**64 - 1], 99).numpy().tobytes().hex())
"""


def test_concurrent_processes_build_once_and_agree(tmp_path):
    """Ranks that start together on a node with an empty cache: one build, the same values."""
    env = {**os.environ, "HPCBNN_CACHE": str(tmp_path), "HPCBNN_RNG_ISA": "baseline"}
    procs = [
        subprocess.Popen([sys.executable, "-c", _CHILD, str(t)], env=env, stdout=subprocess.PIPE, text=True)
        for t in (1, 2, 3)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    ref = b"".join(
        fill_normal(torch.empty(3, 1000, dtype=d), [5, 6, 2**64 - 1], 99).numpy().tobytes() for d in DTYPES
    ).hex()
    assert outs == [ref] * 3
    assert [p.name.split("-")[1] for p in (tmp_path / "kernels").glob("*.so")] == ["baseline"]
    assert not list((tmp_path / "kernels").glob("*.tmp"))


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="one seed per row"):
        fill_normal(torch.empty(2, 10), [1])
    with pytest.raises(ValueError, match="contiguous"):
        fill_normal(torch.empty(10, 2).t(), [1, 2])
    with pytest.raises(ValueError, match="float32/float64"):
        fill_normal(torch.empty(2, 10, dtype=torch.float16), [1, 2])
    with pytest.raises(ValueError, match="seeds"):
        fill_normal(torch.empty(2, 10), [1, -1])
    with pytest.raises(ValueError, match="seeds"):
        fill_normal(torch.empty(1, 10), [2**64])


def test_a_missing_compiler_names_what_to_install(monkeypatch):
    monkeypatch.setenv("PATH", "")
    monkeypatch.delenv("CC", raising=False)
    with pytest.raises(CompilerNotFound, match="build-essential"):
        native.compiler()


def test_an_unknown_code_path_is_refused(monkeypatch):
    monkeypatch.setenv("HPCBNN_RNG_ISA", "avx9000")
    with pytest.raises(ValueError, match="HPCBNN_RNG_ISA"):
        rng.isa()


def test_an_unwritable_cache_names_the_variable_to_set(monkeypatch, tmp_path):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("HPCBNN_CACHE", str(tmp_path / "file"))
    with pytest.raises(RuntimeError, match="HPCBNN_CACHE"):
        rng._library.__wrapped__("baseline")
