"""OOD detection and selective prediction against scikit-learn, brute force and real mpirun."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score, roc_curve

from hpcbnn.uq import ood
from tests.mpi import run_mpi


def sklearn_fpr95(inside: np.ndarray, outside: np.ndarray) -> float:
    """The usual recipe (in-distribution positive, confidence = -score), every threshold kept."""
    labels = np.r_[np.ones(len(inside)), np.zeros(len(outside))]
    fpr, tpr, _ = roc_curve(labels, -np.r_[inside, outside], drop_intermediate=False)
    return float(fpr[np.argmax(tpr >= 0.95)])


@pytest.mark.parametrize("n_in, n_out, levels", [(300, 200, None), (41, 17, 5), (1000, 3, 2), (20, 20, None)])
def test_auroc_and_fpr95_equal_scikit_learn(n_in: int, n_out: int, levels: int | None) -> None:
    rng = np.random.default_rng(n_in)
    inside, outside = rng.normal(0, 1, n_in), rng.normal(0.8, 1.3, n_out)
    if levels:  # heavy ties, within and across the two sets
        inside, outside = np.round(inside * levels / 3), np.round(outside * levels / 3)
    expected = roc_auc_score(np.r_[np.zeros(n_in), np.ones(n_out)], np.r_[inside, outside])
    assert ood.auroc(inside, outside) == pytest.approx(expected, abs=1e-12)
    assert ood.fpr_at_tpr(inside, outside) == sklearn_fpr95(inside, outside)


def test_auroc_extremes_and_fpr_of_separated_sets() -> None:
    low, high = np.arange(10.0), np.arange(10.0) + 100
    assert ood.auroc(low, high) == 1.0 and ood.auroc(high, low) == 0.0
    assert ood.auroc(low, low) == 0.5  # all ties
    assert ood.fpr_at_tpr(low, high) == 0.0 and ood.fpr_at_tpr(high, low) == 1.0


def test_scores_of_agreeing_and_disagreeing_samples() -> None:
    g = torch.Generator().manual_seed(0)
    one = torch.softmax(torch.randn(1, 30, 5, generator=g, dtype=torch.float64), -1)
    agree = ood.uncertainty_scores(one.expand(6, -1, -1))
    assert np.abs(agree["mi"]).max() < 1e-12
    assert np.allclose(agree["maxprob"], one[0].max(-1).values.numpy())
    assert np.allclose(agree["entropy"], -(one[0] * one[0].log()).sum(-1).numpy())
    spread = ood.uncertainty_scores(torch.softmax(3 * torch.randn(6, 30, 5, generator=g), -1))
    assert (spread["mi"] > 0).all() and (spread["mi"] <= spread["entropy"] + 1e-12).all()


def test_detection_report_orients_every_score() -> None:
    g = torch.Generator().manual_seed(1)
    sure = torch.softmax(8 * torch.randn(1, 200, 10, generator=g), -1).expand(4, -1, -1)
    unsure = torch.softmax(torch.randn(4, 100, 10, generator=g), -1)  # flat and disagreeing
    report = ood.ood_detection(ood.uncertainty_scores(sure), ood.uncertainty_scores(unsure))
    for score in ood.SCORES:
        assert report[f"auroc_{score}"] > 0.95, score  # higher is better for every score
        assert report[f"fpr95_{score}"] < 0.2, score
    assert report["mi_out"] > report["mi_in"] and report["maxprob_out"] < report["maxprob_in"]
    hist = report["mi_histogram"]
    assert sum(hist["in"]) == 200 and sum(hist["out"]) == 100 and len(hist["edges"]) == ood.HISTOGRAM_BINS + 1
    json.dumps(report, allow_nan=False)


def test_risk_coverage_equals_brute_force_and_averages_over_tie_orders() -> None:
    rng = np.random.default_rng(2)
    confidence, correct = rng.random(57), rng.random(57) < 0.7
    order = np.argsort(-confidence)
    risk = np.cumsum(~correct[order]) / np.arange(1, 58)
    rc = ood.risk_coverage(confidence, correct, points=1000)
    assert rc["aurc"] == pytest.approx(risk.mean(), abs=1e-15)
    assert rc["risk"] == pytest.approx(risk.tolist(), abs=1e-15) and rc["coverage"][-1] == 1.0
    assert len(ood.risk_coverage(confidence, correct, points=11)["risk"]) == 11

    # with ties the AURC is the mean over every order of the tied examples, for any input order
    confidence = np.array([0.9, 0.5, 0.5, 0.5, 0.2, 0.9])
    correct = np.array([True, False, True, True, False, False])
    tied = [[0, 5], [1, 2, 3], [4]]
    orders = [np.concatenate(p) for p in itertools.product(*(itertools.permutations(t) for t in tied))]
    expected = np.mean([np.mean(np.cumsum(~correct[o]) / np.arange(1, 7)) for o in orders])
    for perm in ([0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0], [2, 0, 4, 1, 5, 3]):
        assert ood.risk_coverage(confidence[perm], correct[perm])["aurc"] == pytest.approx(expected, abs=1e-15)


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="need in- and out-of-distribution scores"):
        ood.auroc(np.array([]), np.array([1.0]))
    with pytest.raises(ValueError, match="finite"):
        ood.fpr_at_tpr(np.array([math.nan]), np.array([1.0]))
    with pytest.raises(ValueError, match="same length"):
        ood.risk_coverage(np.ones(3), np.ones(2, bool))
    with pytest.raises(ValueError, match=r"probs \[S, N, C\]"):
        ood.uncertainty_scores(torch.ones(3, 2))


@pytest.mark.mpi
@pytest.mark.parametrize("mode", ["data", "sample"])
def test_gathered_scores_on_two_ranks_give_the_one_rank_result(mode: str) -> None:
    one = run_mpi(1, ["tests/programs/ood_reduce.py", "sample"], timeout=120)
    two = run_mpi(2, ["tests/programs/ood_reduce.py", mode], timeout=120)
    assert one.returncode == 0 and two.returncode == 0, one.output + two.output
    a, b = (json.loads(r.stdout.splitlines()[-1]) for r in (one, two))
    assert_close(a, b)  # the same examples, gathered, give the same ranks: equal up to float rounding


def assert_close(a: object, b: object) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_close(a[key], b[key])
    elif isinstance(a, str):
        assert a == b
    else:
        assert a == pytest.approx(b, rel=1e-12, abs=1e-15)


def test_rotated_digits_are_the_digits_test_split_rotated(tmp_path: Path) -> None:
    from hpcbnn.data.convert import convert_digits, convert_digits_rotated
    from hpcbnn.data.format import open_h5

    with open_h5(convert_digits(tmp_path / "d.h5")) as f, open_h5(convert_digits_rotated(tmp_path / "r.h5")) as r:
        x, rotated = f["test"]["x"][:], r["test"]["x"][:]
        assert np.array_equal(np.rot90(x, 1, axes=(2, 3)), rotated)
        assert np.array_equal(f["test"]["y"][:], r["test"]["y"][:])
        assert np.allclose(f.attrs["mean"], r.attrs["mean"]) and np.allclose(f.attrs["std"], r.attrs["std"])


def untrained_run(run_dir: Path) -> None:
    """A run directory with a random float64 BNN in it: `hpcbnn.evaluate` needs no training."""
    from hpcbnn.data import default_dataset, open_dataset
    from hpcbnn.run.checkpoint import save_checkpoint
    from hpcbnn.run.config import Config, save_config
    from hpcbnn.run.network import build_network

    cfg = Config(hidden=[16], samples=4, batch_size=64, dtype="float64", backend="torch", run_dir=str(run_dir))
    torch.manual_seed(0)
    model = build_network(cfg, open_dataset(default_dataset(), "train"))
    run_dir.mkdir()
    save_config(cfg, run_dir / "config.yaml")
    save_checkpoint(run_dir, 0, {"model": model.state_dict(), "step": 0})


@pytest.mark.mpi
def test_evaluate_reports_ood_equal_to_scikit_learn_and_the_same_on_two_ranks(tmp_path: Path) -> None:
    from hpcbnn.data.convert import default_ood_dataset

    run_dir = tmp_path / "run"
    untrained_run(run_dir)
    ood_file = str(default_ood_dataset())
    args = ["-m", "hpcbnn.evaluate", str(run_dir), "--ood", ood_file]
    one = run_mpi(1, args, timeout=120)
    assert one.returncode == 0, one.output
    printed = json.loads(one.stdout.splitlines()[-1])
    written = json.loads((run_dir / "evaluation.json").read_text())
    assert written["ood"]["file"] == ood_file and written["ood"]["split"] == "test"
    for score in ood.SCORES:
        assert printed[f"ood_auroc_{score}"] == written["ood"][f"auroc_{score}"]
        assert 0 <= printed[f"ood_fpr95_{score}"] <= 1
    check = run_mpi(1, ["tests/programs/ood_sklearn.py", str(run_dir), ood_file], timeout=120)
    assert check.returncode == 0 and "OK" in check.stdout, check.output

    two = run_mpi(2, [*args, "--mode", "data"], timeout=120)
    assert two.returncode == 0, two.output
    assert_close(json.loads((run_dir / "evaluation.json").read_text())["ood"], written["ood"])
