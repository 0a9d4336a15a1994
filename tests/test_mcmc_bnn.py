"""HMC over the weights of a Bayesian network: its log joint, the same draws on 1, 2 and 4
ranks under real mpirun, and the evaluate command on the draws.

The split runs agree to float64 rounding amplified by the trajectories: the Allreduce of
the data shards adds the log density in another order (~1e-16 relative per evaluation),
and warm-up's step-size adaptation carries that into the chains (~1e-10 here).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from hpcbnn.bnn.layers import PRIOR_FRACTION
from hpcbnn.data.convert import convert_diabetes
from hpcbnn.errors import UsageError
from hpcbnn.mcmc.__main__ import check, parse
from hpcbnn.mcmc.models import bnn_problem
from hpcbnn.mcmc.results import load
from hpcbnn.parallel.grid import ProcessGrid
from hpcbnn.run.evaluate import main as evaluate_main
from tests.mpi import run_mpi


@pytest.fixture(scope="module")
def diabetes(tmp_path_factory) -> Path:
    return convert_diabetes(tmp_path_factory.mktemp("data") / "diabetes.h5")


def test_the_target_is_the_networks_prior_plus_likelihood(diabetes) -> None:
    problem = bnn_problem(str(diabetes), [3], 0, 1, rows=20)
    x, y = problem.local.args[1], problem.local.observed["y"]
    assert problem.dim == 10 * 3 + 3 + 3 * 2 + 2 and problem.names[0] == "1.weight[0,0]"
    theta = problem.init(0, torch.arange(2)).requires_grad_(True)
    lp, grad = problem.local(theta)

    def by_hand(t: torch.Tensor) -> torch.Tensor:
        w1, b1, w2, b2 = t.split([30, 3, 6, 2])
        s1, s2 = PRIOR_FRACTION * math.sqrt(2 / 10), PRIOR_FRACTION * math.sqrt(2 / 3)  # the layers' fan-in priors
        prior = sum(
            (-0.5 * (v / s) ** 2 - math.log(s) - 0.5 * math.log(2 * math.pi)).sum()
            for v, s in ((w1, s1), (b1, s1), (w2, s2), (b2, s2))
        )
        out = torch.relu(x @ w1.view(3, 10).T + b1) @ w2.view(2, 3).T + b2
        mean, scale = out[:, :1], torch.nn.functional.softplus(out[:, 1:]) + 1e-6
        return prior + torch.distributions.Normal(mean, scale).log_prob(y).sum()

    for c in range(2):
        expected = by_hand(theta[c])
        (expected_grad,) = torch.autograd.grad(expected, theta)
        assert torch.allclose(lp[c], expected.detach(), rtol=1e-12)
        assert torch.allclose(grad[c], expected_grad[c], rtol=1e-10, atol=1e-12)


def sample(np_: int, diabetes: Path, out: Path, *grid: str) -> np.ndarray:
    args = [
        "-m",
        "hpcbnn.mcmc",
        "--model",
        "bnn",
        "--data",
        str(diabetes),
        "--rows",
        "64",
        "--hidden",
        "8,8",
        "--chains",
        "4",
        "--kernel",
        "hmc",
        "--num_steps",
        "8",
        "--warmup",
        "15",
        "--draws",
        "15",
        "--plots",
        "false",
        "--out",
        str(out),
        *grid,
    ]
    result = run_mpi(np_, args, timeout=240)
    assert result.returncode == 0, result.output
    draws, names, stats = load(out / "draws.h5")
    assert draws.shape == (4, 15, 10 * 8 + 8 + 8 * 8 + 8 + 8 * 2 + 2) and names[-1] == "5.bias[1]"
    assert stats["accept_prob"].mean() > 0.3
    return draws


@pytest.mark.mpi
def test_draws_on_one_two_and_four_ranks_agree_and_evaluate(diabetes, tmp_path, capsys) -> None:
    one = sample(1, diabetes, tmp_path / "p1")
    two = sample(2, diabetes, tmp_path / "p2", "--mode", "data")
    four = sample(4, diabetes, tmp_path / "p4", "--mode", "hybrid", "--sample_group", "2")
    np.testing.assert_allclose(two, one, rtol=0, atol=1e-8)
    np.testing.assert_allclose(four, one, rtol=0, atol=1e-8)
    # the draws are the predictive's samples: in this process, or two ranks splitting the 20 draws
    assert evaluate_main([str(tmp_path / "p1"), "--samples", "20"]) == 0
    single = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    result = run_mpi(2, ["-m", "hpcbnn.evaluate", str(tmp_path / "p1"), "--samples", "20", "--mode", "sample"])
    assert result.returncode == 0, result.output
    split = json.loads(result.stdout.strip().splitlines()[-1])
    assert single["posterior"] == "hmc" and single["samples"] == 20 and single["count"] == 88
    for key in ("rmse", "nll", "crps"):
        assert math.isfinite(single[key]) and split[key] == pytest.approx(single[key], rel=1e-9)
    assert (tmp_path / "p1" / "evaluation.json").is_file()


@pytest.mark.parametrize(
    "args, message",
    [([], "--model bnn needs --data FILE.h5"), (["--data", "x.h5", "--hidden", "50,a"], "--hidden '50,a'")],
)
def test_bnn_usage_errors_say_what_to_change(args: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=re.escape(message)):
        check(parse(["--model", "bnn", *args]), ProcessGrid(device="cpu"))
