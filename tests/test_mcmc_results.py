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


def test_inference_data_regroups_vector_and_matrix_latents(tmp_path) -> None:
    """`w[i,j]` scalars go back into one array w at [i, j], whatever their column order."""
    g = np.random.default_rng(9)
    names = ["sigma", "w[1,0]", "w[0,0]", "w[0,1]", "w[1,1]", "w[2,0]", "w[2,1]", "b[0]", "b[1]"]
    stats = {"accept_prob": g.random((2, 5)), "n_leapfrog": np.full((2, 5), 7), "diverging": np.zeros((2, 5), bool),
             "energy": g.standard_normal((2, 5)), "tree_depth": np.full((2, 5), 3)}
    post = results.Posterior(g.standard_normal((2, 5, len(names))), names, stats, np.array([0.1, 0.2]),
                             np.ones((2, len(names))))
    path = results.save(post, diagnostics.summary(post.draws), tmp_path / "draws.h5", {"model": "test"})
    idata = results.to_inference_data(path)
    w = idata.posterior["w"].values
    assert w.shape == (2, 5, 3, 2) and idata.posterior["b"].shape == (2, 5, 2)
    for col, name in enumerate(names):
        if name.startswith("w["):
            i, j = map(int, name[2:-1].split(","))
            np.testing.assert_array_equal(w[:, :, i, j], post.draws[:, :, col])
    np.testing.assert_array_equal(idata.posterior["sigma"].values, post.draws[:, :, 0])
    np.testing.assert_array_equal(idata.sample_stats["acceptance_rate"].values, stats["accept_prob"])
    np.testing.assert_array_equal(idata.sample_stats["step_size"].values[:, 3], [0.1, 0.2])
    assert idata.attrs["model"] == "test"


@pytest.mark.mpi
def test_a_sampler_run_opens_in_arviz(tmp_path) -> None:
    """A real `python -m hpcbnn.mcmc` file: ArviZ's own summary agrees with the one in the file."""
    from tests.mpi import run_mpi

    az = pytest.importorskip("arviz")
    args = ["-m", "hpcbnn.mcmc", "--model", "eight_schools", "--chains", "4", "--warmup", "60", "--draws", "40",
            "--plots", "false", "--out", str(tmp_path)]
    result = run_mpi(2, args, timeout=120)
    assert result.returncode == 0, result.output[-3000:]
    idata = results.to_inference_data(tmp_path / "draws.h5")
    post = idata.posterior
    assert dict(post.sizes) == {"chain": 4, "draw": 40, "theta_tilde_dim_0": 8}
    assert sorted(post.data_vars) == ["mu", "tau", "theta_tilde"] and float(post["tau"].min()) > 0
    assert {"acceptance_rate", "n_steps", "tree_depth", "diverging", "energy", "step_size"} <= set(
        idata.sample_stats.data_vars)
    assert idata.attrs["model"] == "eight_schools" and idata.attrs["ranks"] == 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = az.summary(idata, round_to="none")
    _, names, _ = results.load(tmp_path / "draws.h5")
    assert list(table.index) == names
    with h5py.File(tmp_path / "draws.h5") as f:
        for ours, theirs in [("mean", "mean"), ("sd", "sd"), ("ess_bulk", "ess_bulk"), ("r_hat", "r_hat")]:
            np.testing.assert_allclose(table[theirs].to_numpy(), f[f"summary/{ours}"][()], rtol=1e-8)
