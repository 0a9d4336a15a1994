"""Uncertainty metrics against hand computations, closed forms and Monte Carlo."""

from __future__ import annotations

import json
import math

import pytest
import torch
from scipy import integrate, stats

from hpcbnn.uq import metrics
from tests.mpi import run_mpi

T = torch.float64


def test_ece_and_reliability_of_a_hand_made_prediction_set():
    # two weight samples, three classes; the averaged predictive decides
    probs = torch.tensor([
        [[0.8, 0.1, 0.1], [0.5, 0.3, 0.2], [0.9, 0.05, 0.05], [0.2, 0.7, 0.1], [0.35, 0.35, 0.3]],
        [[0.7, 0.2, 0.1], [0.4, 0.4, 0.2], [0.9, 0.05, 0.05], [0.1, 0.6, 0.3], [0.35, 0.3, 0.35]],
    ], dtype=T)
    y = torch.tensor([0, 1, 0, 2, 0])
    # averages: [.75 .15 .1] right, [.45 .35 .2] wrong, [.9 ...] right, [.15 .65 .2] wrong,
    # [.35 .325 .325] right; with 5 bins (lo, hi]: conf .35 -> bin 1, .45 -> bin 2,
    # .75 and .65 -> bin 3, .9 -> bin 4
    # ECE = (|1 - .35| * 1 + |0 - .45| * 1 + |.5 - .7| * 2 + |1 - .9| * 1) / 5 = 1.6 / 5
    m = metrics.classification_metrics(probs, y, bins=5)
    assert m["ece"] == pytest.approx(0.32, abs=1e-12)
    assert m["accuracy"] == pytest.approx(0.6)
    rel = m["reliability"]
    assert rel["count"] == [0, 1, 1, 2, 1]
    assert rel["confidence"][0] is None and rel["accuracy"][0] is None
    assert rel["confidence"][1:] == pytest.approx([0.35, 0.45, 0.7, 0.9])
    assert rel["accuracy"][1:] == pytest.approx([1.0, 0.0, 0.5, 1.0])
    assert rel["edges"] == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    json.dumps(m, allow_nan=False)


def test_brier_and_nll_of_simple_cases():
    y = torch.tensor([0, 1, 3])
    certain = torch.nn.functional.one_hot(y, 4).to(T)[None]
    m = metrics.classification_metrics(certain, y)
    assert (m["accuracy"], m["nll"], m["brier"], m["ece"]) == (1.0, 0.0, 0.0, 0.0)

    uniform = torch.full((3, 3, 4), 0.25, dtype=T)
    m = metrics.classification_metrics(uniform, y)
    assert m["nll"] == pytest.approx(math.log(4))
    assert m["brier"] == pytest.approx(0.75)  # (1 - 1/4)^2 + 3 * (1/4)^2

    # the NLL is that of the model average, not the average of per-sample NLLs (infinite here)
    split = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]], dtype=T)
    m = metrics.classification_metrics(split, torch.tensor([0]))
    assert m["nll"] == pytest.approx(math.log(2))
    assert m["brier"] == pytest.approx(0.5)


def test_mutual_information_is_zero_when_samples_agree_and_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    one = torch.softmax(torch.randn(1, 50, 6, generator=g, dtype=T), -1)
    y = torch.randint(0, 6, (50,), generator=g)
    agree = metrics.classification_metrics(one.expand(8, -1, -1), y)
    assert abs(agree["mutual_information"]) < 1e-12
    assert agree["entropy"] == pytest.approx(agree["expected_entropy"])

    disagree = metrics.classification_metrics(
        torch.softmax(torch.randn(8, 50, 6, generator=g, dtype=T), -1), y)
    assert disagree["mutual_information"] > 0.05

    opposite = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]], dtype=T)
    m = metrics.classification_metrics(opposite, torch.tensor([1]))
    assert m["expected_entropy"] == 0.0
    assert m["mutual_information"] == pytest.approx(math.log(2))


def gaussian_crps(m: float, s: float, y: float) -> float:
    z = (y - m) / s
    return s * (z * (2 * stats.norm.cdf(z) - 1) + 2 * stats.norm.pdf(z) - 1 / math.sqrt(math.pi))


def crps_of(mean, std, y) -> float:
    return metrics.regression_metrics(*(torch.tensor(v, dtype=T).reshape(-1, 1, 1)
                                        for v in (mean, std)), torch.tensor([[y]], dtype=T))["crps"]


@pytest.mark.parametrize("m,s,y", [(0.0, 1.0, 0.0), (1.5, 0.3, -0.2), (-2.0, 4.0, 3.0)])
def test_crps_of_a_gaussian_is_the_closed_form(m, s, y):
    assert crps_of([m], [s], y) == pytest.approx(gaussian_crps(m, s, y), rel=1e-12)


def test_crps_of_a_mixture_matches_its_integral_and_monte_carlo():
    mean, std, y = [-1.0, 0.5, 2.0], [0.5, 1.0, 0.3], 0.8
    crps = crps_of(mean, std, y)

    def integrand(x: float) -> float:
        cdf = sum(stats.norm.cdf(x, m, s) for m, s in zip(mean, std)) / 3
        return (cdf - (x >= y)) ** 2

    exact = sum(integrate.quad(integrand, a, b, limit=200)[0]
                for a, b in ((-30, y), (y, 30)))
    assert crps == pytest.approx(exact, rel=1e-8)

    g = torch.Generator().manual_seed(1)
    n = 1_000_000

    def draw() -> torch.Tensor:
        k = torch.randint(0, 3, (n,), generator=g)
        return torch.tensor(mean, dtype=T)[k] + torch.tensor(std, dtype=T)[k] * torch.randn(
            n, generator=g, dtype=T)

    x, x2 = draw(), draw()
    estimate = (x - y).abs() - 0.5 * (x - x2).abs()
    assert crps == pytest.approx(float(estimate.mean()), abs=4 * float(estimate.std()) / n**0.5)


def test_gaussian_nll_and_rmse():
    mean = torch.tensor([[[1.0, -1.0]]], dtype=T)
    std = torch.tensor([[[2.0, 0.5]]], dtype=T)
    y = torch.tensor([[0.0, 0.0]], dtype=T)
    m = metrics.regression_metrics(mean, std, y)
    expected = -(stats.norm.logpdf(0, 1, 2) + stats.norm.logpdf(0, -1, 0.5))
    assert m["nll"] == pytest.approx(expected, rel=1e-12)
    assert m["rmse"] == pytest.approx(1.0)


def test_coverage_of_the_true_distribution_is_nominal_and_overconfidence_shows():
    g = torch.Generator().manual_seed(2)
    S, N, d = 5, 20000, 2
    mean = torch.randn(S, N, d, generator=g, dtype=T) * 2
    std = torch.rand(S, N, d, generator=g, dtype=T) + 0.1
    pick = torch.randint(0, S, (N, d), generator=g)
    y = mean.gather(0, pick[None])[0] + std.gather(0, pick[None])[0] * torch.randn(
        N, d, generator=g, dtype=T)

    m = metrics.regression_metrics(mean, std, y, levels=(0.5, 0.9, 0.95))
    assert m["coverage"] == pytest.approx({"0.5": 0.5, "0.9": 0.9, "0.95": 0.95}, abs=0.012)
    curve = m["calibration"]
    assert curve["observed"] == pytest.approx(curve["nominal"], abs=0.012)
    assert (curve["observed"][0], curve["observed"][-1]) == (0.0, 1.0)

    # a Gaussian four times too sharp covers P(|Z| < 1.645 / 4) = 0.32 instead of 0.9
    y1 = mean[0] + std[0] * torch.randn(N, d, generator=g, dtype=T)
    overconfident = metrics.regression_metrics(mean[:1], std[:1] / 4, y1)
    assert overconfident["coverage"]["0.9"] == pytest.approx(0.32, abs=0.012)


def assert_same(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, z in zip(a, b):
            assert_same(x, z)
    elif a is None or b is None:
        assert a is b
    else:
        assert a == pytest.approx(b, rel=1e-12, abs=1e-14)


def add(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: sum(p[k] for p in parts) for k in parts[0]}


def test_sums_over_a_split_of_the_data_finalize_to_the_unsplit_metrics():
    g = torch.Generator().manual_seed(3)
    S, N, C, d = 6, 41, 4, 3
    probs = torch.softmax(torch.randn(S, N, C, generator=g) * 3, -1)
    labels = torch.randint(0, C, (N,), generator=g)
    mean, std = torch.randn(S, N, d, generator=g), torch.rand(S, N, d, generator=g) + 0.1
    y = torch.randn(N, d, generator=g)
    shards = [slice(0, 7), slice(7, 30), slice(30, N)]

    cls = add([metrics.classification_sums(probs[:, i], labels[i], 12) for i in shards])
    assert_same(metrics.finalize_classification(cls),
                metrics.classification_metrics(probs, labels, 12))
    reg = add([metrics.regression_sums(mean[:, i], std[:, i], y[i]) for i in shards])
    assert_same(metrics.finalize_regression(reg), metrics.regression_metrics(mean, std, y))


@pytest.mark.mpi
def test_allreduce_over_ranks_gives_the_single_process_metrics():
    r = run_mpi(2, ["tests/programs/metrics_reduce.py"], timeout=120)
    assert r.returncode == 0 and "OK 2 37 37" in r.stdout, r.output


def test_bad_inputs_are_refused_with_the_reason():
    with pytest.raises(ValueError, match=r"probs \[S, N, C\]"):
        metrics.classification_sums(torch.rand(4, 3), torch.zeros(4))
    with pytest.raises(ValueError, match="std must be positive"):
        metrics.regression_sums(torch.zeros(1, 2, 1), torch.zeros(1, 2, 1), torch.zeros(2, 1))
    with pytest.raises(ValueError, match=r"coverage level 0\.9123"):
        metrics.regression_metrics(torch.zeros(1, 2, 1), torch.ones(1, 2, 1), torch.zeros(2, 1),
                                   levels=(0.9123,))
