"""MCMC diagnostics against ArviZ and closed forms; the HDF5 file, the table and the plots."""

from __future__ import annotations

import warnings

import h5py
import numpy as np
import pytest

from hpcbnn.mcmc import diagnostics, results


def ar1(chains: int, n: int, phi: float, seed: int, shift: float = 0.0) -> np.ndarray:
    """Stationary AR(1) chains x_t = phi x_{t-1} + e_t, chain c offset by c * shift."""
    g = np.random.default_rng(seed)
    x = np.empty((chains, n))
    x[:, 0] = g.standard_normal(chains) / np.sqrt(1 - phi**2)
    for t in range(1, n):
        x[:, t] = phi * x[:, t - 1] + g.standard_normal(chains)
    return x + shift * np.arange(chains)[:, None]


CASES = [ar1(4, 400, 0.9, 0), ar1(4, 301, -0.3, 1), ar1(3, 200, 0.5, 2, shift=1.0),
         np.round(ar1(4, 250, 0.7, 3) * 2) / 2, np.random.default_rng(4).exponential(size=(2, 500))]


@pytest.mark.parametrize("x", CASES, ids=["ar0.9", "ar-0.3-odd", "shifted", "ties", "skewed"])
def test_diagnostics_equal_arviz(x: np.ndarray) -> None:
    az = pytest.importorskip("arviz")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert diagnostics.rhat(x) == pytest.approx(float(az.rhat(x, method="rank")), rel=1e-10)
        assert diagnostics.ess_bulk(x) == pytest.approx(float(az.ess(x, method="bulk")), rel=1e-10)
        assert diagnostics.ess_tail(x) == pytest.approx(float(az.ess(x, method="tail")), rel=1e-10)
        assert diagnostics.mcse_mean(x) == pytest.approx(float(az.mcse(x, method="mean")), rel=1e-10)


def test_ess_of_ar1_matches_its_integrated_autocorrelation() -> None:
    """For AR(1), ESS = N (1 - phi) / (1 + phi)."""
    for phi in (0.0, 0.8):
        x = ar1(8, 2000, phi, seed=5)
        assert diagnostics.ess(x) == pytest.approx(x.size * (1 - phi) / (1 + phi), rel=0.15)


def test_rhat_flags_chains_that_disagree() -> None:
    assert diagnostics.rhat(ar1(4, 500, 0.5, seed=6)) < 1.01
    assert diagnostics.rhat(ar1(4, 500, 0.5, seed=6, shift=1.0)) > 1.1
    # same location, different scale: only the folded (tail) half of rank R-hat sees it
    scales = np.array([1.0, 1.0, 1.0, 4.0])[:, None]
    assert diagnostics.rhat(ar1(4, 500, 0.0, seed=7) * scales) > 1.05


def posterior(chains: int = 3, n: int = 60) -> results.Posterior:
    g = np.random.default_rng(8)
    draws = g.standard_normal((chains, n, 3)) + np.array([0.0, 5.0, -2.0])
    stats = {"accept_prob": g.random((chains, n)), "diverging": np.zeros((chains, n), bool),
             "energy": g.standard_normal((chains, n)), "tree_depth": np.full((chains, n), 3)}
    return results.Posterior(draws, ["mu", "tau", "theta[0]"], stats, np.ones(chains),
                             np.ones((chains, 3)))


def test_hdf5_round_trip_and_summary(tmp_path) -> None:
    post = posterior()
    summary = diagnostics.summary(post.draws)
    path = results.save(post, summary, tmp_path / "draws.h5", {"model": "test", "step_size": None})
    draws, names, stats = results.load(path)
    np.testing.assert_array_equal(draws, post.draws)
    assert names == post.names and set(stats) == set(post.stats)
    with h5py.File(path) as f:
        np.testing.assert_allclose(f["summary/mean"][()], post.draws.mean(axis=(0, 1)))
        assert f.attrs["model"] == "test"
    assert [p.name for p in tmp_path.iterdir()] == ["draws.h5"]  # no temporary file left
    table = results.table(summary, post.names).splitlines()
    assert table[0].split() == ["mean", "sd", "5%", "50%", "95%", "mcse", "ess_bulk", "ess_tail", "r_hat"]
    assert table[2].split()[0] == "tau" and float(table[2].split()[1]) == pytest.approx(5.0, abs=0.3)


def test_plots_are_pngs(tmp_path) -> None:
    post = posterior()
    for plot in (results.trace_plot, results.rank_plot):
        path = plot(post, tmp_path / f"{plot.__name__}.png")
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
