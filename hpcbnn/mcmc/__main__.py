"""`mpirun -np N python -m hpcbnn.mcmc [--model covertype] [--chains 8] [--mode data] ...`

Chains are spread over the sample communicator, the likelihood over the data
communicator: `--mode sample` gives every rank chains/P chains of the whole data set,
`--mode data` runs all chains on every rank, each summing its shard of the data, and
`--mode hybrid` does both. Rank 0 gathers the chains, prints the summary table and writes
draws.h5, summary.txt, trace.png and rank.png to --out.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Optional

import torch

from hpcbnn.errors import UsageError, entry_point
from hpcbnn.mcmc import diagnostics, models, results
from hpcbnn.mcmc.hmc import Stats
from hpcbnn.mcmc.sampler import sample
from hpcbnn.mcmc.target import ShardedSum
from hpcbnn.parallel.grid import ProcessGrid
from hpcbnn.run.config import parse_options

MAX_SHOWN = 40
"""Parameters printed in the summary on stdout; summary.txt lists them all."""


@dataclass
class Options:
    """Sample a bundled model's posterior with NUTS or HMC over the process grid."""

    model: Literal["bnn", "covertype", "eight_schools", "gaussian", "linear"] = "eight_schools"
    """bnn: the weights of a Bayesian MLP (--hidden) on --data; covertype: Bayesian logistic
    regression (581,012 x 54 + intercept); eight_schools: the hierarchical classic;
    gaussian: a dense 10-d Gaussian; linear: a conjugate regression."""
    kernel: Literal["nuts", "hmc"] = "nuts"
    """NUTS (multinomial, generalised U-turn) or HMC with --num_steps leapfrog steps."""
    chains: int = 4
    """Chains in all; each of the K ranks of a sample group runs chains/K of them in one batch."""
    warmup: int = 1000
    """Warm-up iterations (step size by dual averaging, diagonal metric in windows)."""
    draws: int = 1000
    """Draws kept per chain after warm-up."""
    seed: int = 0
    """A chain's draws depend only on the seed and its chain id (not on the ranks)."""
    max_depth: int = 10
    """NUTS: at most 2^max_depth - 1 leapfrog steps per draw."""
    num_steps: int = 16
    """HMC: leapfrog steps per draw."""
    target_accept: float = 0.8
    """Mean acceptance that step-size adaptation aims at."""
    step_size: Optional[float] = None
    """A fixed step size (no step-size adaptation)."""
    adapt_mass: bool = True
    """Learn a diagonal mass matrix during warm-up."""
    mode: Literal["sample", "data", "hybrid"] = "sample"
    """sample: chains over ranks; data: the likelihood's rows over ranks; hybrid: K x D of both."""
    sample_group: Optional[int] = None
    """hybrid: K ranks per sample group (default: the ranks per node)."""
    data: Optional[str] = None
    """An HDF5 file in hpcbnn's data format: its train split (bnn: required; covertype:
    default covertype-shaped synthetic data)."""
    hidden: str = "50,50"
    """bnn: the MLP's hidden widths, comma-separated."""
    positive_class: int = 1
    """covertype from --data: the class labelled 1, all others 0."""
    rows: Optional[int] = None
    """Rows of the synthetic covertype set (default 581,012), of the linear regression (1,000),
    or the first rows of the bnn's training split (default all)."""
    device: str = "cpu"
    """covertype: where the features live and the products run, e.g. cuda:0."""
    out: str = "runs/mcmc"
    """Directory for draws.h5, summary.txt, trace.png and rank.png."""
    plots: bool = True
    """Write trace.png and rank.png."""
    log_every: int = 100
    """Iterations between progress lines on rank 0."""


def parse(argv: list[str] | None) -> Options:
    return parse_options(Options, "python -m hpcbnn.mcmc", argv)


def check(opts: Options, grid: ProcessGrid) -> None:
    """Reject impossible runs on every rank alike, before any work."""
    if opts.chains < 1 or opts.chains % grid.sample_size:
        raise UsageError(
            f"--chains {opts.chains} is not divisible by the K={grid.sample_size} ranks of "
            f"a sample group ({grid.describe()}); use a multiple of {grid.sample_size}"
        )
    for name in ("draws", "max_depth", "num_steps", "log_every"):
        if getattr(opts, name) < 1:
            raise UsageError(f"--{name} must be at least 1, not {getattr(opts, name)}")
    if opts.warmup < 0:
        raise UsageError(f"--warmup must be 0 or more, not {opts.warmup}")
    if opts.step_size is not None and not opts.step_size > 0:
        raise UsageError(f"--step_size must be positive, not {opts.step_size}")
    if not 0 < opts.target_accept < 1:
        raise UsageError(f"--target_accept must lie in (0, 1), not {opts.target_accept}")
    if opts.device != "cpu" and opts.model != "covertype":
        raise UsageError(f"--device {opts.device} is for --model covertype; the other examples run on cpu")
    if opts.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {opts.device}: CUDA is not available here; use --device cpu")
    if opts.rows is not None and opts.rows < grid.data_size:
        raise UsageError(f"--rows {opts.rows} is fewer than the D={grid.data_size} data groups")
    if opts.model == "bnn":
        if opts.data is None:
            raise UsageError("--model bnn needs --data FILE.h5 (convert one with python -m hpcbnn.data)")
        hidden_widths(opts.hidden)


def hidden_widths(text: str) -> list[int]:
    """--hidden 50,50 -> [50, 50]."""
    try:
        widths = [int(w) for w in text.split(",")]
    except ValueError:
        widths = []
    if not widths or min(widths) < 1:
        raise UsageError(f"--hidden {text!r}: give positive widths separated by commas, e.g. 50,50")
    return widths


def problem(opts: Options, grid: ProcessGrid) -> models.Problem:
    d, n = grid.data_rank, grid.data_size
    if opts.model == "covertype":
        built = models.covertype_problem(
            d,
            n,
            rows=opts.rows or models.COVERTYPE_ROWS,
            seed=opts.seed,
            path=opts.data,
            positive_class=opts.positive_class,
            comm=grid.world,
            device=opts.device,
        )
    elif opts.model == "bnn":
        assert opts.data is not None, "check() requires --data"
        built = models.bnn_problem(opts.data, hidden_widths(opts.hidden), d, n, grid.world, opts.rows)
    elif opts.model == "linear":
        built = models.linear_problem(d, n, rows=opts.rows or 1000, seed=opts.seed)
    elif opts.model == "gaussian":
        built = models.gaussian_problem(seed=opts.seed)
    else:
        built = models.eight_schools_problem()
    if n > 1 and not built.splittable:
        raise UsageError(f"--model {opts.model} has no data rows to split over D={n} data groups; use --mode sample")
    return built


class Reporter:
    """Progress lines of rank 0's chains on stderr: step size, acceptance, tree depth, divergences."""

    def __init__(self, opts: Options, enabled: bool) -> None:
        self.opts, self.enabled, self.start = opts, enabled, time.perf_counter()
        self.divergent = 0
        self.leapfrogs = 0

    def __call__(self, it: int, st: Stats, step_size: torch.Tensor) -> None:
        self.leapfrogs += int(st.n_leapfrog.max())
        if it >= self.opts.warmup:
            self.divergent += int(st.diverging.sum())
        done = it + 1
        total = self.opts.warmup + self.opts.draws
        if self.enabled and (done % self.opts.log_every == 0 or done == total):
            phase = "warmup" if it < self.opts.warmup else "sample"
            elapsed = time.perf_counter() - self.start
            print(
                f"{phase} {done}/{total}  step {step_size.mean():.3g}  "
                f"accept {st.accept_prob.mean():.2f}  depth {st.tree_depth.float().mean():.1f}  "
                f"divergent {self.divergent}  {elapsed:.1f}s "
                f"({1e3 * elapsed / max(self.leapfrogs, 1):.2f} ms/leapfrog)",
                file=sys.stderr,
                flush=True,
            )


@entry_point("hpcbnn.mcmc")
def main(argv: list[str] | None = None) -> int:
    opts = parse(argv)
    grid = ProcessGrid(opts.mode, opts.sample_group, device="cpu")
    check(opts, grid)
    out = Path(opts.out)
    if grid.is_root:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(
                f"--out {out}: cannot create it ({exc.strerror}); choose another directory", collective=False
            ) from None
    built = problem(opts, grid)
    target = ShardedSum(built.local, grid.data_comm)
    mine = grid.local_samples(opts.chains)
    chains = torch.arange(mine.start, mine.stop, device=opts.device)
    if grid.is_root:
        print(
            f"hpcbnn.mcmc: {opts.model}, {opts.kernel}, {opts.chains} chains, {built.dim} "
            f"parameters; {grid.describe()}",
            flush=True,
        )
    reporter = Reporter(opts, grid.is_root)
    draws = sample(
        target,
        built.dim,
        chains,
        seed=opts.seed,
        num_warmup=opts.warmup,
        num_draws=opts.draws,
        kernel=opts.kernel,
        max_depth=opts.max_depth,
        num_steps=opts.num_steps,
        target_accept=opts.target_accept,
        step_size=opts.step_size,
        adapt_mass=opts.adapt_mass,
        init=None if built.init is None else built.init(opts.seed, chains),
        progress=reporter,
    )
    posterior = results.gather(draws, built.constrain, built.names, grid)
    if posterior is None:
        return 0
    summary = diagnostics.summary(posterior.draws)
    text = results.table(summary, posterior.names)
    divergent = int(posterior.stats["diverging"].sum())
    bfmi = diagnostics.ebfmi(posterior.stats["energy"])
    footer = (
        f"{divergent} divergent transitions after warm-up; E-BFMI per chain "
        f"{' '.join(f'{b:.2f}' for b in bfmi)}; mean tree depth "
        f"{posterior.stats['tree_depth'].mean():.1f}"
    )
    shown = text if len(posterior.names) <= MAX_SHOWN else results.table(summary, posterior.names, MAX_SHOWN)
    print(shown + "\n" + footer, flush=True)
    (out / "summary.txt").write_text(text + "\n" + footer + "\n")
    results.save(posterior, summary, out / "draws.h5", {**asdict(opts), "ranks": grid.size, "grid": grid.describe()})
    if opts.plots:
        results.trace_plot(posterior, out / "trace.png")
        results.rank_plot(posterior, out / "rank.png")
    print(f"wrote {out / 'draws.h5'}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
