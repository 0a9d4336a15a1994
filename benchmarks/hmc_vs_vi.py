"""How close is the variational posterior to the reference? VI against full-batch HMC on the same BNN.

    python -m benchmarks.hmc_vs_vi [--quick | --smoke] [--out runs/hmc_vs_vi] [--ranks 1]

Both posteriors are over the weights of the same Bayesian MLP 64-50-50-10 on the bundled
digits (train split; inputs standardised as the loader does), with the layers' fan-in
priors, and both are produced and scored by the product's own commands:

- VI: `python -m hpcbnn.train --hidden [50,50]` with the library's defaults (mean-field
  Gaussian, ELBO, kl_weight 0.003: a tempered posterior), its predictive S samples;
- HMC: `python -m hpcbnn.mcmc --model bnn --hidden 50,50` (chains started at prior draws,
  step size and diagonal metric adapted in warm-up), its predictive the draws, thinned to S;
- both: `python -m hpcbnn.evaluate DIR --samples S --ood digits-rotated` (the same metric
  code: accuracy, NLL, ECE, AUROC of telling the 90-degree rotated digits apart).

Agreement (computed here on the test split): the share of examples where the two
predictive means pick the same class, and their mean total-variation distance. HMC is
the reference: its row agrees with itself. The HMC run's diagnostics (R-hat, bulk ESS,
divergences) say how far from converged the reference is. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.launch import command
from hpcbnn.bnn.noise import sampling
from hpcbnn.data import Loader
from hpcbnn.data.convert import convert_digits, convert_digits_rotated
from hpcbnn.mcmc.evaluate import posterior_draws
from hpcbnn.mcmc.models import bnn_network
from hpcbnn.parallel.engine import EVAL_STEP
from hpcbnn.parallel.evaluation import DrawsPredictor
from hpcbnn.parallel.grid import ProcessGrid
from hpcbnn.run.checkpoint import latest_checkpoint, load_checkpoint, model_fingerprint
from hpcbnn.run.config import load_config
from hpcbnn.run.network import build_network

HIDDEN = (50, 50)
FULL = {"epochs": 40, "chains": 4, "warmup": 300, "draws": 200, "num_steps": 20, "samples": 200}
QUICK = {"epochs": 10, "chains": 2, "warmup": 60, "draws": 50, "num_steps": 10, "samples": 100}
SMOKE = {"epochs": 1, "chains": 2, "warmup": 4, "draws": 4, "num_steps": 2, "samples": 8}
"""`samples`: predictive samples of either posterior (HMC: its draws, evenly thinned)."""
KEYS = ("accuracy", "nll", "ece", "auroc_entropy", "auroc_mi", "agreement", "tv")


def evaluation(run: Path, ood: Path, samples: int) -> dict:
    command(["-m", "hpcbnn.evaluate", str(run), "--samples", str(samples), "--ood", str(ood)], 1, run / "eval.log")
    return json.loads((run / "evaluation.json").read_text())


def vi_probabilities(run: Path, loader: Loader, samples: int) -> torch.Tensor:
    """The VI predictive mean [n, C] on the loader's (one-batch) split, as the evaluate command samples it."""
    cfg = load_config(run / "config.yaml")
    model = build_network(cfg, loader.info)
    path = latest_checkpoint(run)
    assert path is not None, f"{run}: training wrote no checkpoint"
    model.load_state_dict(load_checkpoint(path, model_fingerprint(model))["model"])
    model.eval()
    batch = next(iter(loader.epoch(0)))
    x = batch.x
    with torch.no_grad(), sampling(cfg.seed, EVAL_STEP, range(samples), batch.rows, loader.batch_size):
        out = model(x.expand(samples, *x.shape).reshape(samples * len(x), *x.shape[1:]))
    return out.view(samples, len(x), -1).softmax(-1).mean(0)[batch.valid]


def hmc_probabilities(run: Path, loader: Loader, grid: ProcessGrid, samples: int) -> torch.Tensor:
    _, draws = posterior_draws(run / "draws.h5", samples)
    net = bnn_network(loader.info.input_shape, list(HIDDEN), loader.info.num_classes)
    batch = next(iter(loader.epoch(0)))
    out = DrawsPredictor(net, draws, grid).predict(batch.x, batch.rows, loader.batch_size, samples)
    return out.softmax(-1).mean(0)[batch.valid].float()


def hmc_diagnostics(run: Path) -> dict[str, float]:
    import h5py

    with h5py.File(run / "draws.h5", "r") as f:
        r_hat, ess = f["summary/r_hat"][()], f["summary/ess_bulk"][()]
        stats = {k: f[f"sample_stats/{k}"][()] for k in ("accept_prob", "diverging")}
    return {
        "r_hat_median": float(np.nanmedian(r_hat)),
        "r_hat_max": float(np.nanmax(r_hat)),
        "share_r_hat_below_1.1": float(np.mean(r_hat < 1.1)),
        "ess_bulk_median": float(np.nanmedian(ess)),
        "accept": float(stats["accept_prob"].mean()),
        "divergent": int(stats["diverging"].sum()),
    }


def row(metrics: dict, agreement: float, tv: float) -> dict[str, float]:
    ood = metrics["ood"]
    return {
        "accuracy": metrics["accuracy"],
        "nll": metrics["nll"],
        "ece": metrics["ece"],
        "auroc_entropy": ood["auroc_entropy"],
        "auroc_mi": ood["auroc_mi"],
        "agreement": agreement,
        "tv": tv,
    }


def runs(ranks: int, budget: dict[str, int], data: Path, ood: Path, out: Path) -> tuple[float, float]:
    """Train the VI run and sample the HMC run; their wall times in seconds."""
    hidden = ",".join(map(str, HIDDEN))
    start = time.perf_counter()
    command(["-m", "hpcbnn.train", "--data", str(data), "--hidden", f"[{hidden}]", "--epochs", str(budget["epochs"]),
             "--ood", str(ood), "--run_dir", str(out / "vi"), "--backend", "torch"], 1, out / "vi.log")
    vi_seconds = time.perf_counter() - start
    start = time.perf_counter()
    command(["-m", "hpcbnn.mcmc", "--model", "bnn", "--data", str(data), "--hidden", hidden, "--kernel", "hmc",
             "--chains", str(budget["chains"]), "--warmup", str(budget["warmup"]), "--draws", str(budget["draws"]),
             "--num_steps", str(budget["num_steps"]), "--out", str(out / "hmc"), "--plots", "false"],
            ranks, out / "hmc.log")
    return vi_seconds, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run: fewer epochs, chains and draws")
    parser.add_argument("--smoke", action="store_true", help="a few iterations of everything (the test suite's)")
    parser.add_argument("--out", default="runs/hmc_vs_vi", help="directory for the data, both runs and the logs")
    parser.add_argument("--ranks", type=int, default=1, help="MPI ranks of the HMC run (sample mode)")
    args = parser.parse_args()
    budget = SMOKE if args.smoke else QUICK if args.quick else FULL
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data, ood = out / "digits.h5", out / "digits-rotated.h5"
    if not data.is_file():
        convert_digits(data)
    if not ood.is_file():
        convert_digits_rotated(ood)
    vi_seconds, hmc_seconds = runs(args.ranks, budget, data, ood, out)
    s = budget["samples"]
    vi, hmc = evaluation(out / "vi", ood, s), evaluation(out / "hmc", ood, s)

    grid = ProcessGrid("sample", device="cpu")
    loader = Loader(data, "test", grid, batch_size=10_000, shuffle=False, drop_last=False)
    p_vi, p_hmc = vi_probabilities(out / "vi", loader, s), hmc_probabilities(out / "hmc", loader, grid, s)
    agreement = float((p_vi.argmax(-1) == p_hmc.argmax(-1)).double().mean())
    tv = float(0.5 * (p_vi - p_hmc).abs().sum(-1).mean())
    rows = {"vi": row(vi, agreement, tv), "hmc": row(hmc, 1.0, 0.0)}
    diagnostics = hmc_diagnostics(out / "hmc")

    print(f"digits, MLP 64-{'-'.join(map(str, HIDDEN))}-10, test split ({vi['count']} examples), "
          f"S = {s} predictive samples each; OOD: the test digits rotated by 90 degrees")
    print(f"VI: hpcbnn.train, {budget['epochs']} epochs, {vi_seconds:.0f} s; HMC: {budget['chains']} chains x "
          f"({budget['warmup']} warm-up + {budget['draws']} draws) x {budget['num_steps']} leapfrog steps, "
          f"{hmc_seconds:.0f} s on {args.ranks} rank(s)")
    header = ["posterior", "accuracy", "NLL", "ECE", "AUROC ent", "AUROC MI", "agree w/ HMC", "TV to HMC"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, r in rows.items():
        cells = [name.upper()] + [f"{r[k]:.4f}" for k in KEYS]
        print("| " + " | ".join(cells) + " |")
    print("HMC diagnostics: " + ", ".join(f"{k} {v:.3g}" for k, v in diagnostics.items()))
    print(json.dumps({"budget": budget, **rows, "hmc_diagnostics": diagnostics,
                      "seconds": {"vi": vi_seconds, "hmc": hmc_seconds}}))


if __name__ == "__main__":
    main()
