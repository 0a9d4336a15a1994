"""The sample-parallel IWAE example: one step on 2 and 4 ranks is the one-process step (same K)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.mpi import run_mpi

pytestmark = pytest.mark.mpi


def step(ranks: int, tmp_path) -> tuple[dict, dict]:
    out = tmp_path / f"p{ranks}.pt"
    result = run_mpi(ranks, ["examples/iwae_vae.py", "--steps", "1", "--K", "8", "--dtype", "float64",
                             "--backend", "torch", "--save", str(out)], timeout=180)
    assert result.returncode == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1]), torch.load(out)


def test_one_step_on_two_and_four_ranks_equals_one_rank(tmp_path) -> None:
    line, one = step(1, tmp_path)
    assert line["K"] == 8 and line["ranks"] == 1
    for ranks in (2, 4):
        other_line, other = step(ranks, tmp_path)
        assert other_line["ranks"] == ranks
        assert other["loss"] == pytest.approx(one["loss"], rel=1e-12)
        assert other_line["test_bound"] == pytest.approx(line["test_bound"], rel=1e-12)
        for net in ("encoder", "decoder"):
            for name, value in one[net].items():
                torch.testing.assert_close(other[net][name], value, rtol=0, atol=1e-12)
    # the step moved the parameters: the comparison is not of the shared initial weights
    torch.manual_seed(0)
    initial = torch.nn.Linear(64, 128).double()
    assert not torch.allclose(one["encoder"]["0.weight"], initial.weight)
