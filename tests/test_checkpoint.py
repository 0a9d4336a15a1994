"""Checkpoints: round trip, retention, refusal of damaged or foreign files, and SIGKILL."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time

import pytest
import torch

from hpcbnn.run.checkpoint import (latest_checkpoint, load_checkpoint, model_fingerprint,
                                   save_checkpoint, state_fingerprint, write_atomically)
from hpcbnn.errors import UsageError
from tests.mpi import ROOT


def trained_state(model: torch.nn.Module, step: int) -> dict:
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
            "rng": torch.get_rng_state()}


def test_round_trip(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8))
    state = trained_state(model, 123)
    path = save_checkpoint(tmp_path, 123, state)
    assert path == tmp_path / "checkpoints" / "step-000123.pt"
    assert os.listdir(path.parent) == ["step-000123.pt"]
    loaded = load_checkpoint(path, model_fingerprint(model))
    assert loaded["step"] == 123 and torch.equal(loaded["rng"], state["rng"])
    for name, tensor in state["model"].items():
        assert torch.equal(loaded["model"][name], tensor), name
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8))
    fresh.load_state_dict(loaded["model"])
    torch.optim.Adam(fresh.parameters()).load_state_dict(loaded["optimizer"])


def test_keeps_the_newest_n_and_finds_the_latest(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    model = torch.nn.Linear(3, 2)
    for step in (1, 2, 3, 10, 11):
        save_checkpoint(tmp_path, step, {"model": model.state_dict()}, keep=3)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == [
        "step-000003.pt", "step-000010.pt", "step-000011.pt"]
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step-000011.pt"


def test_leftover_temporaries_are_ignored_then_removed(tmp_path):
    model = torch.nn.Linear(3, 2)
    save_checkpoint(tmp_path, 5, {"model": model.state_dict()})
    leftover = tmp_path / "checkpoints" / ".step-000006.pt.4242.tmp"
    leftover.write_bytes(b"half a checkpoint")
    assert latest_checkpoint(tmp_path).name == "step-000005.pt"
    save_checkpoint(tmp_path, 6, {"model": model.state_dict()})
    assert not leftover.exists()


@pytest.fixture
def saved(tmp_path):
    model = torch.nn.Linear(64, 64)
    return save_checkpoint(tmp_path, 7, {"model": model.state_dict()}), model_fingerprint(model)


def refusal(path, fingerprint) -> str:
    with pytest.raises(UsageError) as info:
        load_checkpoint(path, fingerprint)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    return message


def test_truncated_checkpoint_is_refused(saved):
    path, fingerprint = saved
    data = path.read_bytes()
    for size in (len(data) // 2, len(data) - 1, 3, 0):
        path.write_bytes(data[:size])
        message = refusal(path, fingerprint)
        assert "truncated" in message and "delete it or point --run_dir elsewhere" in message


def test_flipped_bytes_are_refused(saved):
    path, fingerprint = saved
    data = bytearray(path.read_bytes())
    for offset in (100, len(data) // 2, len(data) - 60):  # zip header, tensor data, zip directory
        flipped = bytearray(data)
        flipped[offset] ^= 0x10
        path.write_bytes(bytes(flipped))
        message = refusal(path, fingerprint)
        assert "corrupt (checksum mismatch)" in message and "delete it" in message


def test_checkpoint_of_another_model_is_refused(saved):
    path, fingerprint = saved
    assert load_checkpoint(path, fingerprint)  # the same file is fine for its own model
    message = refusal(path, model_fingerprint(torch.nn.Linear(64, 32)))
    assert "different model" in message
    assert model_fingerprint(torch.nn.Linear(64, 64)) == fingerprint  # values do not matter


def test_missing_checkpoint_is_a_usage_error(tmp_path):
    assert "cannot read checkpoint" in refusal(tmp_path / "step-000001.pt", "x")


MEGABYTES = 24


def wait_for_a_write(directory, writer: subprocess.Popen) -> None:
    """Return once the writer has opened its temporary file: it is inside the write window."""
    while not any(directory.glob(".step-*.tmp")):
        assert writer.poll() is None, "the writer died by itself"
        time.sleep(0.001)


def test_sigkill_inside_the_write_window_never_leaves_a_bad_checkpoint(tmp_path):
    """Kill a real writer at random moments while it writes; the files on disk stay whole."""
    directory = tmp_path / "checkpoints"
    fingerprint = state_fingerprint({"weight": torch.empty(MEGABYTES * 2**20 // 4)})
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    moments = random.Random(12345)
    kills_mid_write, step, leftovers = 0, 1, []
    for _ in range(12):
        writer = subprocess.Popen(
            [sys.executable, str(ROOT / "tests/programs/checkpoint_writer.py"), str(tmp_path),
             str(MEGABYTES), str(step)], stdout=subprocess.PIPE, text=True, env=env)
        saved = [int(writer.stdout.readline())]
        assert not any(p.exists() for p in leftovers)  # the first save removed them
        started = time.monotonic()
        saved.append(int(writer.stdout.readline()))
        cycle = time.monotonic() - started  # one save, of which most is the write
        wait_for_a_write(directory, writer)
        time.sleep(moments.uniform(0, 0.7 * cycle))
        writer.kill()
        saved += [int(line) for line in writer.communicate()[0].split()]
        assert writer.returncode == -9

        leftovers = list(directory.glob(".step-*.tmp"))
        kills_mid_write += bool(leftovers)
        finals = sorted(directory.glob("step-*.pt"))
        assert finals[-1] == latest_checkpoint(tmp_path)
        assert directory / f"step-{saved[-1]:06d}.pt" in finals
        for path in finals:  # the last reported save and any newer one are intact
            state = load_checkpoint(path, fingerprint)
            assert torch.all(state["model"]["weight"] == state["step"])
            assert path.name == f"step-{state['step']:06d}.pt"
        step = state["step"] + 1
        if kills_mid_write >= 4:
            break
    assert kills_mid_write >= 4, "the writer was never killed inside a write"


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    model = torch.nn.Linear(3, 2)
    save_checkpoint(tmp_path, 1, {"model": model.state_dict()})
    with torch.no_grad():
        model.bias[1] = float("nan")
    with pytest.raises(UsageError, match=r"the weights hold NaN or inf at step 2 \(bias\), so no checkpoint was written"):
        save_checkpoint(tmp_path, 2, {"model": model.state_dict()})
    assert os.listdir(tmp_path / "checkpoints") == ["step-000001.pt"]


def test_a_changed_option_is_refused_by_name(tmp_path):
    model = torch.nn.Linear(3, 2)
    path = save_checkpoint(tmp_path, 1, {"model": model.state_dict()}, run={"batch_size": 32, "seed": 0})
    assert load_checkpoint(path, model_fingerprint(model), run={"batch_size": 32, "seed": 0})
    with pytest.raises(UsageError, match=rf"--seed is 1, but checkpoint {path} was trained with 0: a resumed "
                                         r"run cannot change it; resume with --seed 0, or start a new --run_dir"):
        load_checkpoint(path, model_fingerprint(model), run={"batch_size": 32, "seed": 1})


@pytest.fixture
def full_disk(tmp_path):
    """A real 1 MiB file system (tmpfs; the tests run as root, as CI does): writes past it fail with ENOSPC."""
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_is_one_line_and_leaves_no_temporary_file(full_disk):
    small = torch.nn.Linear(3, 2)
    first = save_checkpoint(full_disk, 1, {"model": small.state_dict()})
    big = torch.nn.Linear(512, 512)  # 1 MiB of weights
    with pytest.raises(UsageError) as error:
        save_checkpoint(full_disk, 2, {"model": big.state_dict()})
    assert str(error.value) == (
        f"cannot write checkpoint {full_disk}/checkpoints/step-000002.pt: ENOSPC, No space left on device; "
        "free space on that file system (or lift the quota), or choose another --run_dir")
    assert os.listdir(full_disk / "checkpoints") == ["step-000001.pt"]
    assert load_checkpoint(first, model_fingerprint(small))["model"].keys() == small.state_dict().keys()


def test_an_atomic_write_on_a_full_disk_keeps_the_old_content(full_disk):
    target = full_disk / "summary.json"
    write_atomically(target, b"old\n")
    with pytest.raises(UsageError, match=r"cannot write .*summary.json: ENOSPC, No space left on device"):
        write_atomically(target, b"x" * 2**21)
    assert os.listdir(full_disk) == ["summary.json"] and target.read_bytes() == b"old\n"
