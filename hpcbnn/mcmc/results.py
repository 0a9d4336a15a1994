"""Results on rank 0: every chain gathered, draws in HDF5, a summary table, trace and rank plots.

HDF5 layout (written to a temporary file, then renamed, so a file that exists is whole):

    /draws                 [chains, draws, parameters] float64   attrs: names
    /sample_stats/<stat>   [chains, draws]  accept_prob, n_leapfrog, tree_depth, diverging, energy
    /adaptation/step_size  [chains]   /adaptation/inv_mass [chains, dim] (unconstrained space)
    /summary/<column>      [parameters]  mean, sd, q5, q50, q95, mcse_mean, ess_bulk, ess_tail, r_hat
    /                      attrs: the run's options (model, kernel, seed, ...)

`to_inference_data(path)` opens such a file as an ArviZ InferenceData.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from hpcbnn.mcmc import diagnostics
from hpcbnn.mcmc.sampler import Draws

if TYPE_CHECKING:
    import arviz

    from hpcbnn.parallel.grid import ProcessGrid

ARVIZ_STATS = {"accept_prob": "acceptance_rate", "n_leapfrog": "n_steps"}
"""Sample statistics whose name differs in ArviZ's convention (the others share theirs)."""


@dataclass
class Posterior:
    """All chains of a run, ordered by chain id, parameters in their own (constrained) space."""

    draws: np.ndarray
    names: list[str]
    stats: dict[str, np.ndarray]
    step_size: np.ndarray
    inv_mass: np.ndarray


def gather(
    local: Draws, constrain: Callable[[Tensor], Tensor], names: list[str], grid: ProcessGrid
) -> Posterior | None:
    """Collect the chains of all sample ranks on world rank 0 (None on the others).

    Data ranks > 0 hold copies of their group's chains and send nothing."""
    if grid.data_rank != 0:
        return None
    num, n, dim = local.theta.shape
    part = {
        "chains": local.chains.cpu().numpy(),
        "draws": constrain(local.theta.reshape(num * n, dim)).reshape(num, n, -1).cpu().numpy(),
        "stats": {k: v.cpu().numpy() for k, v in local.stats.items()},
        "step_size": local.step_size.cpu().numpy(),
        "inv_mass": local.inv_mass.cpu().numpy(),
    }
    parts = grid.sample_comm.gather(part, root=0)
    if parts is None:
        return None
    order = np.argsort(np.concatenate([p["chains"] for p in parts]))

    def join(key: str, stat: bool = False) -> np.ndarray:
        return np.concatenate([(p["stats"] if stat else p)[key] for p in parts])[order]

    return Posterior(
        join("draws"),
        names,
        {k: join(k, stat=True) for k in parts[0]["stats"]},
        join("step_size"),
        join("inv_mass"),
    )


def save(posterior: Posterior, summary: Mapping[str, np.ndarray], path: Path, attrs: Mapping[str, Any]) -> Path:
    """Write the HDF5 file atomically (temporary file + rename)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with h5py.File(tmp, "w", libver="latest") as f:  # dense attributes: a network's names exceed 64 KiB
            f.create_dataset("draws", data=posterior.draws)
            f["draws"].attrs["names"] = posterior.names
            for key, value in posterior.stats.items():
                f.create_dataset(f"sample_stats/{key}", data=value)
            f.create_dataset("adaptation/step_size", data=posterior.step_size)
            f.create_dataset("adaptation/inv_mass", data=posterior.inv_mass)
            for key, value in summary.items():
                f.create_dataset(f"summary/{key}", data=value)
            for key, value in attrs.items():
                f.attrs[key] = "" if value is None else value
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load(path: Path | str) -> tuple[np.ndarray, list[str], dict[str, np.ndarray]]:
    """Draws, parameter names and sample statistics of a saved run."""
    with h5py.File(path, "r") as f:
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in f["draws"].attrs["names"]]
        return f["draws"][()], names, {k: v[()] for k, v in f["sample_stats"].items()}


def to_inference_data(path: Path | str) -> arviz.InferenceData:
    """The draws file of `python -m hpcbnn.mcmc` as an ArviZ InferenceData, for its plots and diagnostics.

    posterior: one variable per latent with dims (chain, draw, <name>_dim_0, ...), the
    scalars `theta[0]`, `theta[1]`, ... of a vector back in one array `theta`;
    sample_stats: the sampler's statistics under ArviZ's names, with each chain's adapted
    step size per draw; `.attrs`: the run's options. ArviZ is imported here only.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # ArviZ 0.2x announces its 1.0 refactor on import
        import arviz

    draws, names, stats = load(path)
    with h5py.File(path, "r") as f:
        step_size = f["adaptation/step_size"][()]
        attrs = {k: v.item() if isinstance(v, np.generic) else v for k, v in f.attrs.items()}
    chains, n = draws.shape[:2]
    posterior = {name: draws[:, :, cols].reshape(chains, n, *shape) for name, cols, shape in latents(names)}
    sample_stats = {ARVIZ_STATS.get(k, k): v for k, v in stats.items()}
    sample_stats["step_size"] = np.broadcast_to(step_size[:, None], (chains, n)).copy()
    return arviz.from_dict(posterior=posterior, sample_stats=sample_stats, attrs=attrs)


def latents(names: list[str]) -> list[tuple[str, np.ndarray, tuple[int, ...]]]:
    """Group the scalar names `w[0,1]` of each latent: (latent, its columns in row-major order, its shape)."""
    index: dict[str, dict[tuple[int, ...], int]] = {}
    for col, name in enumerate(names):
        m = re.fullmatch(r"(.+)\[([\d,]+)\]", name)
        latent, at = (m[1], tuple(int(i) for i in m[2].split(","))) if m else (name, ())
        index.setdefault(latent, {})[at] = col
    out = []
    for latent, cols in index.items():
        shape = tuple(max(at[d] for at in cols) + 1 for d in range(len(next(iter(cols)))))
        if len(cols) != int(np.prod(shape)):
            raise ValueError(f"{latent}: the indices of its {len(cols)} scalars do not fill a {shape} array")
        out.append((latent, np.array([cols[at] for at in np.ndindex(*shape)]), shape))
    return out


def table(summary: Mapping[str, np.ndarray], names: list[str], limit: int | None = None) -> str:
    """The summary as aligned text, one parameter per row; with `limit`, only the `limit`
    parameters of largest R-hat (the least converged) and a line on the rest."""
    header = ["", "mean", "sd", "5%", "50%", "95%", "mcse", "ess_bulk", "ess_tail", "r_hat"]
    keys = ["mean", "sd", "q5", "q50", "q95", "mcse_mean", "ess_bulk", "ess_tail", "r_hat"]
    shown: list[int] = list(range(len(names)))
    if limit is not None and limit < len(names):
        shown = sorted(np.argsort(-np.nan_to_num(summary["r_hat"], nan=-np.inf), kind="stable")[:limit].tolist())
    rows = [[names[i]] + [_number(key, summary[key][i]) for key in keys] for i in shown]
    widths = [max(len(r[c]) for r in [header] + rows) for c in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(row, widths)))
        for row in [header] + rows
    ]
    if len(rows) < len(names):
        lines.append(
            f"({len(rows)} of {len(names)} parameters: those of largest r_hat; over all: r_hat max "
            f"{np.nanmax(summary['r_hat']):.2f}, ess_bulk min {np.nanmin(summary['ess_bulk']):.0f})"
        )
    return "\n".join(lines)


def _number(key: str, value: float) -> str:
    if key.startswith("ess"):
        return "nan" if np.isnan(value) else f"{value:.0f}"
    return f"{value:.2f}" if key == "r_hat" else f"{value:.4g}"


def trace_plot(posterior: Posterior, path: Path, max_params: int = 8) -> Path:
    """Per parameter: each chain's marginal density (left) and its trace (right)."""
    k = min(max_params, len(posterior.names))
    fig = Figure(figsize=(10, 1.8 * k + 0.5), layout="constrained")
    axes = fig.subplots(k, 2, squeeze=False)
    for i in range(k):
        x = posterior.draws[:, :, i]
        bins = np.histogram_bin_edges(x, bins=30)
        for c in range(x.shape[0]):
            axes[i, 0].hist(x[c], bins=bins, density=True, histtype="step", color=f"C{c % 10}")
            axes[i, 1].plot(x[c], lw=0.6, alpha=0.8, color=f"C{c % 10}")
        axes[i, 0].set_ylabel(posterior.names[i])
    axes[0, 0].set_title("marginal, per chain")
    axes[0, 1].set_title("trace")
    axes[-1, 1].set_xlabel("draw")
    return _write(fig, path)


def rank_plot(posterior: Posterior, path: Path, max_params: int = 8, bins: int = 20) -> Path:
    """Per parameter: histograms of each chain's ranks among all draws; mixing chains are flat."""
    k = min(max_params, len(posterior.names))
    cols = min(k, 4)
    rows = -(-k // cols)
    fig = Figure(figsize=(3.2 * cols, 2.6 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    chains, n = posterior.draws.shape[:2]
    for i in range(k):
        ranks = diagnostics.ranks(posterior.draws[:, :, i])
        edges = np.linspace(0.5, chains * n + 0.5, bins + 1)
        for c in range(chains):
            axes[i].stairs(np.histogram(ranks[c], bins=edges)[0], edges, baseline=None, color=f"C{c % 10}")
        axes[i].axhline(n / bins, color="k", ls="--", lw=0.8)
        axes[i].set_title(posterior.names[i], fontsize=9)
        axes[i].set_xlabel("rank")
    for ax in axes[k:]:
        ax.set_visible(False)
    return _write(fig, path)


def _write(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=100)
    return path
