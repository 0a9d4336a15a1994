"""The main job end to end under real mpirun: outputs, resume, signals, bad configurations."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from hpcbnn.data import default_dataset, open_dataset
from hpcbnn.errors import EXIT_USAGE
from hpcbnn.run.checkpoint import latest_checkpoint, load_checkpoint, model_fingerprint
from hpcbnn.run.config import load_config
from hpcbnn.run.network import build_network
from tests.mpi import ROOT, mpirun_prefix, run_mpi

TINY = ["--epochs", "2", "--samples", "4", "--batch_size", "32", "--hidden", "[32]"]


def train(np: int, run_dir: Path, *args: str, timeout: float = 300):  # type: ignore[no-untyped-def]
    return run_mpi(np, ["-m", "hpcbnn.train", "--run_dir", str(run_dir), *args], timeout=timeout)


TINY64 = [*TINY, "--dtype", "float64"]  # float64: the grids agree to its rounding


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    """The run every grid must reproduce: its final parameters and its summary."""
    run_dir = tmp_path_factory.mktemp("one-process") / "run"
    result = train(1, run_dir, *TINY64)
    assert result.returncode == 0, result.output
    return _final_state(run_dir)["model"], json.loads((run_dir / "summary.json").read_text())


def numbers(record: object, prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a JSON record by path."""
    if isinstance(record, dict):
        return {k: v for key, value in record.items() for k, v in numbers(value, f"{prefix}{key}.").items()}
    if isinstance(record, list):
        return {k: v for i, value in enumerate(record) for k, v in numbers(value, f"{prefix}{i}.").items()}
    return {prefix.rstrip("."): float(record)} if isinstance(record, (int, float)) else {}


@pytest.mark.mpi
@pytest.mark.parametrize("np, mode", [(2, "sample"), (2, "data"), (4, "sample"), (4, "data"), (4, "hybrid")])
def test_run_learns_and_writes_a_complete_run_directory(one_process: tuple[dict, dict], tmp_path: Path, np: int,
                                                        mode: str) -> None:
    """Every grid trains the one-process model: the same parameters, per tensor and element, and
    the same test, OOD and posterior metrics, to float64 rounding (the grid-exactness of MISSION.md)."""
    run_dir = tmp_path / "run"
    extra = ["--sample_group", "2"] if mode == "hybrid" else []
    result = train(np, run_dir, *TINY64, "--mode", mode, *extra)
    assert result.returncode == 0, result.output
    assert result.stderr.count("hpcbnn.train: done.") == 1  # rank 0 only
    assert f"Results in {run_dir}" in result.stderr

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["samples"] == 4 and config["mode"] == mode and "lr" in config
    epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [1, 2]
    for e in epochs:
        assert {"loss", "nll", "kl", "kl_per_n", "examples_per_s", "time_compute", "time_comm", "time_data"} <= e.keys()
        assert e["val"]["count"] == 180  # every validation example once, no fill-up rows
        assert e["val"]["mutual_information"] >= 0
        assert_healthy_sigmas(e["sigma"])
    assert epochs[1]["nll"] < epochs[0]["nll"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["test"]["count"] == 360
    assert summary["test"]["accuracy"] > 0.5  # ten classes: chance is 0.1
    assert 0 <= summary["test"]["ece"] <= 1
    assert 0 <= summary["test"]["selective"]["aurc"] <= 1
    assert_healthy_sigmas(summary["posterior"]["sigma"])
    assert summary["posterior"]["kl_per_n"] > 0
    ood = summary["ood"]  # the bundled digits come with their rotated copy as the default OOD set
    assert ood["count_in"] == ood["count_out"] == 360
    assert all(0 <= ood[f"auroc_{s}"] <= 1 and 0 <= ood[f"fpr95_{s}"] <= 1 for s in ("maxprob", "entropy", "mi"))
    assert f"mutual information {ood['mi_in']:.3g} in vs {ood['mi_out']:.3g} on OOD inputs" in result.stderr
    for picture in ("reliability.png", "uncertainty.png", "curves.png"):
        assert (run_dir / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", picture
    assert list((run_dir / "checkpoints").glob("step-*.pt"))

    want_params, want_summary = one_process
    params = _final_state(run_dir)["model"]
    assert params.keys() == want_params.keys()
    for name, want in want_params.items():
        error = (params[name] - want).abs().max().item()
        assert error <= 1e-10 * max(1.0, want.abs().max().item()), f"{name} differs by {error:.2e} ({np} ranks, {mode})"
    got, want_numbers = numbers(summary), numbers(want_summary)
    compared = [k for k in want_numbers if k.split(".")[0] in ("test", "ood", "posterior")]
    assert {"test.accuracy", "test.nll", "test.ece", "ood.auroc_mi", "posterior.kl_per_n"} <= set(compared)
    for key in compared:
        assert math.isclose(got[key], want_numbers[key], rel_tol=1e-9, abs_tol=1e-12), (
            f"{key}: {got[key]!r} on {np} ranks ({mode}), {want_numbers[key]!r} on one")
    if np > 2 or mode != "sample":
        return  # the commands on a run directory: once is enough

    again = run_mpi(1, ["-m", "hpcbnn.evaluate", str(run_dir), "--samples", "8"], timeout=120)
    assert again.returncode == 0, again.output
    assert json.loads(again.stdout.splitlines()[-1])["count"] == 360

    (run_dir / "curves.png").unlink()
    redrawn = subprocess.run([sys.executable, "-m", "hpcbnn.plots", str(run_dir)], capture_output=True, text=True,
                             cwd=ROOT, timeout=120)
    assert redrawn.returncode == 0, redrawn.stderr
    assert str(run_dir / "curves.png") in redrawn.stdout
    assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def assert_healthy_sigmas(sigma: dict) -> None:
    """One entry per Bayesian layer, by qualified name, with finite positive ordered quantiles."""
    assert sigma, "no Bayesian layer reported"
    for name, q in sigma.items():
        values = [q[k] for k in ("min", "p10", "median", "p90", "max")]
        assert all(0 < v < float("inf") for v in values) and values == sorted(values), (name, q)


def start(np: int, args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(mpirun_prefix(np) + [sys.executable, "-m", "hpcbnn.train", *args], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.mpi
def test_signal_checkpoints_and_resume_equals_uninterrupted(tmp_path: Path) -> None:
    common = ["--epochs", "3", "--samples", "4", "--batch_size", "32", "--hidden", "[32]", "--log_every", "1"]
    whole = train(2, tmp_path / "whole", *common)
    assert whole.returncode == 0, whole.output

    job = start(2, ["--run_dir", str(tmp_path / "cut"), *common])
    lines = []
    for line in job.stdout:  # type: ignore[union-attr]
        lines.append(line)
        if line.startswith("epoch 1 step 60/"):  # mid-epoch 2: the resume must skip batches
            job.send_signal(signal.SIGUSR1)  # mpirun forwards it to every rank
            break
    rest, _ = job.communicate(timeout=120)
    output = "".join(lines) + rest
    assert job.returncode == 75, output
    assert output.count("stop signal during training: checkpoint at step") == 1
    assert not (tmp_path / "cut" / "summary.json").exists()

    resumed = train(2, tmp_path / "cut", *common, "--resume", "true")
    assert resumed.returncode == 0, resumed.output
    a, b = (_final_state(tmp_path / name) for name in ("whole", "cut"))
    assert a["step"] == b["step"] == 3 * (1257 // 32)
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name


def _final_state(run_dir: Path) -> dict:
    """The newest checkpoint, loaded the way --resume loads it (checked against the run's model)."""
    cfg = load_config(run_dir / "config.yaml")
    model = build_network(cfg, open_dataset(default_dataset(), "train"))
    return load_checkpoint(latest_checkpoint(run_dir), model_fingerprint(model))


def _epochs(run_dir: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.mpi
def test_a_damaged_latest_checkpoint_falls_back_and_no_epoch_is_logged_twice(tmp_path: Path) -> None:
    """Checkpoints every 2 epochs; the last one (epoch 3) is damaged, as by a run killed between
    logging epoch 3 and checkpointing it: the resume warns, continues from epoch 2, and logs
    epoch 3 once. With every checkpoint damaged, the resume is refused."""
    run_dir = tmp_path / "run"
    common = [*TINY, "--checkpoint_every", "2"]
    assert train(2, run_dir, *common, "--epochs", "3").returncode == 0
    older, last = (run_dir / "checkpoints" / f"step-{n * (1257 // 32):06d}.pt" for n in (2, 3))
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    result = train(2, run_dir, *common, "--epochs", "4", "--resume", "true")
    assert result.returncode == 0, result.output
    assert result.stderr.count(f"hpcbnn.train: warning: checkpoint {last} is truncated") == 1, result.output
    assert f"resuming from {older}, the newest valid one" in result.stderr
    assert "resumed from the checkpoint of step 78 (epoch 3, after 0 batches)" in result.stderr
    assert _epochs(run_dir) == [1, 2, 3, 4]

    for path in (run_dir / "checkpoints").glob("step-*.pt"):
        path.write_bytes(path.read_bytes()[:100])
    refused = train(2, run_dir, *common, "--epochs", "5", "--resume", "true", timeout=120)
    assert refused.returncode == EXIT_USAGE, refused.output
    assert refused.stderr.count("hpcbnn.train: error: no valid checkpoint: checkpoint ") == 1, refused.output
    assert "Traceback" not in refused.output
    assert _epochs(run_dir) == [1, 2, 3, 4]


@pytest.mark.mpi
@pytest.mark.parametrize("args, message", [
    (["--bogus", "1"], "unrecognized arguments: --bogus 1"),
    (["--samples", "many"], 'Parser key "samples"'),
    (["--samples", "3"], "--samples 3 is not divisible by the K=2"),
    (["--mode", "data", "--batch_size", "33"], "--batch_size 33 is not divisible by the D=2"),
    (["--mode", "hybrid", "--sample_group", "3"], "2 ranks are not divisible into sample groups of K=3"),
    (["--data", "/nonexistent/data.h5"], "/nonexistent/data.h5"),
    (["--ood", "/nonexistent/ood.h5"], "--ood: /nonexistent/ood.h5: no such file"),
    (["--config", "CONFIG"], "Option 'bogus' is not accepted"),
    (["--lr", "1e12", "--warmup_epochs", "0"], "at step"),  # "the loss is nan|inf at step N"
    (["--mode", "data", "--model", "resnet"], "D=2 data groups, but the model has BatchNorm layers"),
])
def test_bad_configuration_is_one_line_and_every_rank_exits(tmp_path: Path, args: list[str],
                                                            message: str) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("samples: 4\nbogus: 1\n")
    args = [str(config) if a == "CONFIG" else a for a in args]
    result = train(2, tmp_path / "run", *args, timeout=120)
    assert result.returncode == EXIT_USAGE, result.output
    assert result.stderr.count(message) == 1, result.output  # one line, from rank 0
    assert "Traceback" not in result.output
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.mpi
def test_time_series_regression_end_to_end(tmp_path: Path) -> None:
    """The paper's MLP task in miniature: a CSV load curve -> sliding windows -> Gaussian BNN."""
    t = torch.arange(3000, dtype=torch.float64)
    load = 50 + 10 * torch.sin(2 * torch.pi * t / 24) + torch.randn(3000, generator=torch.Generator().manual_seed(0))
    csv = tmp_path / "load.csv"
    csv.write_text("hour,load\n" + "".join(f"{int(h)},{v:.4f}\n" for h, v in zip(t, load)))
    data = tmp_path / "load.h5"
    converted = subprocess.run([sys.executable, "-m", "hpcbnn.data", "csv", str(csv), str(data), "--input_length",
                                "24", "--columns", "load"], capture_output=True, text=True, cwd=ROOT)
    assert converted.returncode == 0, converted.stderr
    run_dir = tmp_path / "run"
    result = train(2, run_dir, "--data", str(data), "--mode", "data", "--epochs", "3", "--samples", "4",
                   "--batch_size", "64", "--hidden", "[32]")
    assert result.returncode == 0, result.output
    test = json.loads((run_dir / "summary.json").read_text())["test"]
    assert test["rmse"] < 5  # in load units: the signal's amplitude is 10, its noise 1
    assert 0 < test["crps"] < test["rmse"]
    assert set(test["coverage"]) == {"0.5", "0.9", "0.95"}
    assert (run_dir / "calibration.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_pretrained_mixture_keeps_its_weights_and_a_fresh_one_starts_from_the_prior(tmp_path: Path) -> None:
    """--means defaults to the prior's draws for a mixture, and to the network's own weights with --pretrained."""
    from hpcbnn.bnn.models import build_model
    from hpcbnn.run.config import parse_config

    info = open_dataset(default_dataset(), "train")
    torch.manual_seed(3)
    net = build_model("mlp", info.input_shape, info.num_classes, hidden=[128, 128])
    path = tmp_path / "weights.pt"
    torch.save(net.state_dict(), path)
    first = net[1].weight.detach()

    pretrained = build_network(parse_config(["--pretrained", str(path)]), info)
    assert torch.equal(pretrained.components[0][1].weight_mu.detach(), first)
    drawn = build_network(parse_config([]), info).components[0][1]
    torch.testing.assert_close(float(drawn.weight_mu.detach().std()), drawn.prior_scale, rtol=0.05, atol=0)
    chosen = build_network(parse_config(["--pretrained", str(path), "--means", "prior"]), info).components[0][1]
    assert not torch.equal(chosen.weight_mu.detach(), first)
