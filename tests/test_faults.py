"""Fault injection under real mpirun: whatever fails, every rank ends promptly, one clear line
says what to change, and the run directory's last good checkpoint stays intact.

The cases and what the user sees are tabled in docs/failures.md. Ranks are found through an
environment tag that mpirun hands to every rank it starts, so a test can kill one rank and
then check that no rank of its job is left. Bad flags and config files, a missing data file
and a truncated checkpoint are covered by tests/test_train.py; bad files at the library
level by tests/test_data_format.py and tests/test_checkpoint.py.
"""

from __future__ import annotations

import json
import os
import queue
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

import h5py
import numpy as np
import pytest
import torch

from hpcbnn.run.checkpoint import latest_checkpoint, load_checkpoint, model_fingerprint, save_checkpoint
from hpcbnn.run.config import load_config, parse_config, save_config
from hpcbnn.data import Loader, default_dataset, open_dataset
from hpcbnn.parallel.grid import ProcessGrid
from hpcbnn.run.network import build_network
from hpcbnn.run.rundir import resume_fingerprint
from hpcbnn.retry import retrying
from tests.mpi import ROOT, mpirun_prefix

BOUND = 30.0  # launch timeout after an injected fault: a guard against a hang, not a measurement
START = 240.0  # seconds a job may take to start and reach the point of injection
HOST = socket.gethostname()
PROGRAMS = ROOT / "tests" / "programs"
TAG = "HPCBNN_FAULT_TAG"
TINY = ["--samples", "4", "--batch_size", "32", "--hidden", "[32]", "--log_every", "1"]
STEPS_PER_EPOCH = 1257 // 32  # the bundled digits set at --batch_size 32


class Job:
    """`mpirun -np N python ARGS`, its merged output read in the background, its ranks findable."""

    def __init__(self, np: int, args: list[str]) -> None:
        self.tag = uuid.uuid4().hex
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": str(ROOT), TAG: self.tag}
        self.proc = subprocess.Popen(mpirun_prefix(np) + [sys.executable, *args], cwd=ROOT, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.lines: list[str] = []
        self.fresh: queue.Queue[str | None] = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            self.lines.append(line)
            self.fresh.put(line)
        self.fresh.put(None)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = START) -> None:
        """Block until a line contains a match of the regular expression `pattern`."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.fresh.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"no line matching {pattern!r} within {timeout} s:\n{self.output}")
            if line is None:
                pytest.fail(f"the job ended before a line matching {pattern!r}:\n{self.output}")
            if re.search(pattern, line):
                return

    def finish(self, timeout: float) -> int:
        """The job's exit code; fails the test if the job is still running after `timeout` s."""
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the job still runs {timeout} s later (ranks {self.ranks()}):\n{self.output}")
        self.reader.join(timeout=10)
        return code

    def ranks(self) -> dict[int, int]:
        """World rank -> pid of every live process of this job that is an MPI rank."""
        found = {}
        marker = f"{TAG}={self.tag}".encode()
        for entry in Path("/proc").iterdir():
            try:
                env = (entry / "environ").read_bytes().split(b"\0") if entry.name.isdigit() else []
            except OSError:
                continue
            ranks = [v for v in env if v.startswith(b"OMPI_COMM_WORLD_RANK=")]
            if marker in env and ranks:
                found[int(ranks[0].split(b"=")[1])] = int(entry.name)
        return found

    def kill(self) -> None:
        """End what is left of this job (after a failed test)."""
        for pid in self.ranks().values():
            os.kill(pid, signal.SIGKILL)
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture
def launch() -> Iterator[Callable[..., Job]]:
    started: list[Job] = []

    def start(np: int, args: list[str | Path]) -> Job:
        started.append(Job(np, [str(a) for a in args]))
        return started[-1]

    yield start
    for job in started:
        job.kill()


def train_args(run_dir: Path, *args: str) -> list[str | Path]:
    return ["-m", "hpcbnn.train", "--run_dir", run_dir, *args]


def final_checkpoint(run_dir: Path) -> dict:
    """The newest checkpoint, loaded the way --resume loads it (checked against the run's model)."""
    cfg = load_config(run_dir / "config.yaml")
    model = build_network(cfg, open_dataset(cfg.data or default_dataset(), "train", verify=False))
    return load_checkpoint(latest_checkpoint(run_dir), model_fingerprint(model))


def checkpoint_files(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


# 1. An exception on one rank while its peers wait in a collective.

@pytest.mark.mpi
@pytest.mark.parametrize("backend, fault, code, message", [
    ("torch", "bug", 1, f"fault_collective: rank 1 on {HOST} failed: RuntimeError: injected bug"),
    ("horovod", "oom", 1, f"fault_collective: rank 1 on {HOST} failed: RuntimeError: [enforce fail"),
    ("horovod", "usage", 2, f"fault_collective: error (rank 1 on {HOST}): injected: only this rank's file"),
], ids=["torch-bug", "horovod-oom", "horovod-usage"])
def test_a_failure_on_one_rank_ends_peers_blocked_in_a_collective(launch, backend: str, fault: str,
                                                                   code: int, message: str) -> None:
    job = launch(2, [PROGRAMS / "fault_collective.py", backend, fault])
    job.wait_for("rank 1: first allreduce done")
    assert job.finish(BOUND) == code, job.output
    assert job.output.count(message) == 1, job.output  # once: from the failing rank
    assert "second allreduce completed" not in job.output
    assert job.ranks() == {}


@pytest.mark.mpi
def test_a_failing_rank_dies_of_the_launchers_sigterm_during_its_grace(launch) -> None:
    """The rank would print its failure after the grace; a SIGTERM (what mpirun sends when
    another rank's exit ends the job) ends it first, although it caught SIGTERM until it failed."""
    job = launch(2, [PROGRAMS / "fault_collective.py", "torch", "bug"])
    job.wait_for("rank 1: first allreduce done")
    time.sleep(2)  # rank 1 has raised and sits in its grace (2 x GRACE_SECONDS)
    os.kill(job.ranks()[1], signal.SIGTERM)
    assert job.finish(BOUND) == 128 + signal.SIGTERM  # mpirun reports the signal that ended the rank
    assert "rank 1 with PID" in job.output and "exited on signal 15 (Terminated)" in job.output
    assert " failed: " not in job.output, job.output
    assert job.ranks() == {}


# 2. SIGKILL of one rank of a training run (the soak test below also resumes after it).

@pytest.mark.mpi
@pytest.mark.parametrize("backend, victim", [("horovod", 0), ("torch", 1)])
def test_a_killed_rank_ends_the_training_job_and_keeps_its_checkpoint(launch, tmp_path: Path,
                                                                      backend: str, victim: int) -> None:
    run_dir = tmp_path / "run"
    job = launch(2, train_args(run_dir, "--epochs", "50", "--backend", backend, *TINY))
    job.wait_for(rf"epoch \d+ step {STEPS_PER_EPOCH + 5}/")  # the first epoch's checkpoint is written
    os.kill(job.ranks()[victim], signal.SIGKILL)
    assert job.finish(BOUND) == 137  # docs/failures.md: a killed rank
    assert f"rank {victim} with PID" in job.output and "exited on signal 9 (Killed)" in job.output
    assert " failed: " not in job.output, job.output  # the survivor's lost connection is no second story
    assert job.ranks() == {}
    assert checkpoint_files(run_dir) == [f"step-{STEPS_PER_EPOCH:06d}.pt"]
    assert final_checkpoint(run_dir)["step"] == STEPS_PER_EPOCH
    assert not (run_dir / "summary.json").exists()


# 2b. A stopped rank (SIGSTOP: a hung node, a file-system call that never returns): its peers end
# after --collective_timeout with one line naming it and the collective, and so does the job.

STALL_TIMEOUT = 2.0


@pytest.mark.mpi
@pytest.mark.parametrize("backend, victim, where, what", [
    ("torch", 1, "backend", "an allreduce over the world ranks (torch.distributed)"),
    ("horovod", 0, "backend", "a Horovod allreduce over the world ranks"),
    ("horovod", 1, "loss", "the loss of step 1"),
    ("torch", 0, "checkpoint", "the checkpoint of step 7 (written by rank 0)"),
], ids=["torch-rank1", "horovod-rank0", "horovod-rank1-mpi", "torch-rank0-in-checkpoint"])
def test_a_stopped_rank_ends_the_job_with_one_line_naming_it(launch, tmp_path: Path, backend: str, victim: int,
                                                              where: str, what: str) -> None:
    job = launch(2, [PROGRAMS / "fault_stall.py", backend, str(victim), where, str(STALL_TIMEOUT), tmp_path / "run"])
    job.wait_for(f"rank {victim}: stopping")
    assert job.finish(STALL_TIMEOUT + BOUND) == 1, job.output
    survivor = 1 - victim
    line = (f"fault_stall: error: rank {survivor} on {HOST}: {what} did not complete within 2 s: "
            f"rank {victim} never reached it")
    assert job.output.count(line) == 1, job.output
    assert job.output.count("did not complete within") == 1, job.output
    assert "Traceback" not in job.output, job.output
    assert job.ranks() == {}  # the stopped rank too


@pytest.mark.mpi
def test_ranks_started_with_different_options_are_refused(tmp_path: Path) -> None:
    """An MPMD launch: rank 1 gets another --samples; rank 0 names it, every rank exits 2."""
    common = ["-m", "hpcbnn.train", "--run_dir", str(tmp_path / "run"), *TINY, "--backend", "torch"]
    rank0 = mpirun_prefix(1) + [sys.executable, *common]
    cmd = rank0 + [":", "-np", "1", sys.executable, *common, "--samples", "8"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=START, env=env, cwd=ROOT)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert output.count("hpcbnn.train: error: the ranks were started with different configurations "
                        "(--samples is 4 on rank 0 but 8 on rank 1)") == 1, output
    assert "Traceback" not in output, output
    assert not (tmp_path / "run").exists()


@pytest.mark.mpi
def test_a_second_run_on_the_same_directory_is_refused_and_changes_nothing(launch, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = launch(1, train_args(run_dir, "--epochs", "50", "--backend", "torch", *TINY))
    first.wait_for(rf"epoch \d+ step {STEPS_PER_EPOCH + 2}/")  # its first checkpoint is written
    (pid,) = first.ranks().values()
    os.kill(pid, signal.SIGSTOP)  # so that its files hold still while the second run tries
    before = files(run_dir)
    second = launch(2, train_args(run_dir, "--epochs", "50", "--backend", "torch", *TINY, "--resume", "true"))
    assert second.finish(START) == 2, second.output
    assert second.output.count(f"hpcbnn.train: error: {run_dir} is in use by another run") == 1, second.output
    assert "Traceback" not in second.output
    assert files(run_dir) == before
    os.kill(pid, signal.SIGCONT)


@pytest.mark.mpi
def test_a_stop_signal_during_validation_and_the_final_evaluation_is_honoured(launch, tmp_path: Path) -> None:
    """SIGUSR1 (to mpirun, which forwards it) while the epoch is validated: exit 75 before the
    next validation batch; the resume validates and logs the epoch, and a second SIGUSR1 during
    its final test evaluation exits 75 again; the third run only evaluates. Each epoch is logged once.
    A large --eval_samples makes each evaluation last seconds, so the signal lands inside it."""
    run_dir = tmp_path / "run"
    slow = ["--epochs", "1", "--backend", "torch", *TINY, "--eval_samples", "4096"]
    job = launch(2, train_args(run_dir, *slow))
    job.wait_for(rf"epoch 0 step {STEPS_PER_EPOCH}/")  # the epoch's last step: validation follows
    job.proc.send_signal(signal.SIGUSR1)
    assert job.finish(START) == 75, job.output
    assert job.output.count(f"stop signal during validation: checkpoint at step {STEPS_PER_EPOCH} written") == 1
    assert not (run_dir / "metrics.jsonl").exists()

    resumed = launch(2, train_args(run_dir, *slow, "--resume", "true"))
    resumed.wait_for(f"after {STEPS_PER_EPOCH} batches")
    deadline = time.monotonic() + START
    while not (run_dir / "metrics.jsonl").exists() and time.monotonic() < deadline:  # validated and logged:
        time.sleep(0.01)  # the final evaluation follows its checkpoint at once
    resumed.proc.send_signal(signal.SIGUSR1)
    assert resumed.finish(START) == 75, resumed.output
    assert resumed.output.count(f"stop signal during the final evaluation: the last checkpoint (step "
                                f"{STEPS_PER_EPOCH})") == 1, resumed.output
    assert not (run_dir / "summary.json").exists()

    last = launch(2, train_args(run_dir, *slow, "--resume", "true", "--eval_samples", "4"))  # may change
    assert last.finish(START) == 0, last.output
    assert [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1]
    assert (run_dir / "summary.json").exists()


@pytest.mark.mpi
def test_a_stop_checkpoint_that_cannot_be_written_still_exits_75(launch, tmp_path: Path) -> None:
    """The run directory on a real 32 KiB tmpfs (the tests run as root, as CI does): config.yaml
    fits, a 74 KB checkpoint does not. SIGUSR1 mid-epoch: the write fails with ENOSPC, the job
    says so in one line and still exits 75 for the job scripts' requeue; no temporary file stays."""
    run_dir = tmp_path / "small"
    run_dir.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32k", "tmpfs", str(run_dir)], check=True)
    try:
        job = launch(2, train_args(run_dir, "--epochs", "50", "--backend", "torch", *TINY))
        job.wait_for(r"epoch 0 step 10/")
        job.proc.send_signal(signal.SIGUSR1)
        assert job.finish(START) == 75, job.output
        assert job.output.count(f"hpcbnn.train: stop signal during training: cannot write checkpoint {run_dir}/"
                                f"checkpoints/step-") == 1, job.output
        assert "ENOSPC, No space left on device" in job.output and "exiting with 75" in job.output
        assert "Traceback" not in job.output
        assert list((run_dir / "checkpoints").iterdir()) == []
    finally:
        subprocess.run(["umount", str(run_dir)], check=True)


# 3. Bad input: one line from rank 0, exit 2 on every rank, nothing written.

def edited(edit: Callable[[h5py.File], None]) -> Callable[[Path], list[str]]:
    """A copy of the bundled data set changed by `edit`, passed with --data."""
    def make(tmp_path: Path) -> list[str]:
        path = tmp_path / "data.h5"
        shutil.copy(default_dataset(), path)
        with h5py.File(path, "r+") as f:
            edit(f)
        return ["--data", str(path)]
    return make


def truncated(tmp_path: Path) -> list[str]:
    path = tmp_path / "data.h5"
    data = Path(default_dataset()).read_bytes()
    path.write_bytes(data[:len(data) // 2])  # an interrupted copy
    return ["--data", str(path)]


def replace(name: str, data: np.ndarray) -> Callable[[h5py.File], None]:
    def edit(f: h5py.File) -> None:
        del f[name]
        f[name] = data
    return edit


def empty_split(f: h5py.File) -> None:
    for name, data in (("x", np.zeros((0, 1, 8, 8), np.float32)), ("y", np.zeros(0, np.int64))):
        replace(f"test/{name}", data)(f)
    f["test"].attrs["count"] = 0


def set_value(name: str, where: tuple, value: float) -> Callable[[h5py.File], None]:
    def edit(f: h5py.File) -> None:
        f[name][where] = value
    return edit


def other_model_checkpoint(tmp_path: Path) -> list[str]:
    """The run directory of a model with --hidden [16], resumed with --hidden [32]."""
    cfg = parse_config(["--hidden", "[16]"])
    model = build_network(cfg, open_dataset(default_dataset(), "train"))
    save_checkpoint(tmp_path / "run", STEPS_PER_EPOCH, {"model": model.state_dict()})
    save_config(cfg, tmp_path / "run" / "config.yaml")
    return ["--resume", "true"]


def checkpoint_of(tmp_path: Path, *changed: str) -> list[str]:
    """The run directory of the tiny run of the test below, resumed with the options `changed`."""
    cfg = parse_config([*TINY, "--epochs", "1", "--backend", "torch"])
    info = open_dataset(default_dataset(), "train")
    model = build_network(cfg, info)
    save_checkpoint(tmp_path / "run", STEPS_PER_EPOCH, {"model": model.state_dict()},
                    run=resume_fingerprint(cfg, info))
    save_config(cfg, tmp_path / "run" / "config.yaml")
    return ["--resume", "true", *changed]


def other_data(tmp_path: Path) -> list[str]:
    """Resumed on a data set whose training split has other statistics (another file, same shapes)."""
    args = checkpoint_of(tmp_path)
    return args + edited(lambda f: f.attrs.__setitem__("std", f.attrs["std"] * 2))(tmp_path)


def bad_pretrained(tmp_path: Path) -> list[str]:
    path = tmp_path / "data.pt"
    path.write_bytes(b"these are not weights")
    return ["--pretrained", str(path)]


BAD_INPUT = {
    "unreadable HDF5 file": (truncated, "data.h5: not a readable HDF5 file"),
    "wrong schema version": (edited(lambda f: f.attrs.__setitem__("schema_version", 7)),
                             "data.h5: schema version 7, but this hpcbnn reads version 1"),
    "mismatched shapes": (edited(replace("train/y", np.zeros(1000, np.int64))),
                          "data.h5: /train/y has shape [1000], expected [1257]"),
    "NaN input": (edited(set_value("train/x", (17, 0, 3, 3), np.nan)),
                  "data.h5: split 'train': NaN or inf in the inputs at row 17"),
    "label out of range": (edited(set_value("train/y", (23,), 10)),
                           "data.h5: split 'train': label 10 at row 23 is outside 0..9"),
    "empty test split": (edited(empty_split), "data.h5: split 'test' is empty"),
    "batch larger than the split": (lambda _: ["--batch_size", "2048"],
                                    "split 'train' has 1257 examples, fewer than one global batch of 2048"),
    "device that does not exist": (lambda _: ["--device", "cuda:3"],
                                   f"--device cuda:3 does not exist on {HOST} (it has 0 cuda devices)"),
    "checkpoint of another model": (other_model_checkpoint, "is of a different model"),
    "resume with another batch size": (lambda p: checkpoint_of(p, "--batch_size", "64"),
                                       "--batch_size is 64, but checkpoint "),
    "pretrained file that is not a state_dict": (bad_pretrained, "data.pt: not a state_dict saved with torch.save"),
    "resume on other data": (other_data, "--data is 1257 training examples of shape [1, 8, 8] (digest "),
}


@pytest.mark.mpi
@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_is_one_line_every_rank_exits_and_nothing_is_written(launch, tmp_path: Path,
                                                                      case: str) -> None:
    make, message = BAD_INPUT[case]
    args = make(tmp_path)
    run_dir = tmp_path / "run"
    before = files(run_dir)
    job = launch(2, train_args(run_dir, "--epochs", "1", "--backend", "torch", *TINY, *args))
    assert job.finish(START) == 2, job.output
    assert job.output.count(message) == 1, job.output
    assert "Traceback" not in job.output, job.output
    assert job.ranks() == {}
    after = files(run_dir)
    assert after.keys() == before.keys()
    assert [name for name in after if after[name] != before[name]] == []


def files(run_dir: Path) -> dict[str, bytes]:
    """Every file under `run_dir` (relative name -> content)."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}


# 4. SIGKILL inside a checkpoint write.

@pytest.mark.mpi
def test_a_kill_inside_a_checkpoint_write_leaves_the_previous_one_and_resume_works(
        launch, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    directory = run_dir / "checkpoints"
    first, second = (f"step-{n * STEPS_PER_EPOCH:06d}.pt" for n in (1, 2))
    big = ["--epochs", "2", "--samples", "4", "--batch_size", "32", "--hidden", "[1024,1024]",
           "--backend", "torch"]  # 27 MB checkpoints: their write takes a while
    job = launch(2, train_args(run_dir, *big))
    deadline = time.monotonic() + START
    while not (directory / first).exists() and job.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    writer = job.ranks()[0]
    partial: list[str] = []
    while not partial and job.proc.poll() is None and time.monotonic() < deadline:
        partial = [p.name for p in directory.glob(f".{second}.*.tmp")]
        time.sleep(0.001)
    assert partial, f"the second checkpoint's temporary file never appeared:\n{job.output}"
    os.kill(writer, signal.SIGKILL)
    assert job.finish(BOUND) == 137
    assert " failed: " not in job.output, job.output
    assert job.ranks() == {}
    assert checkpoint_files(run_dir) == [partial[0], first]  # killed inside the write window
    assert final_checkpoint(run_dir)["step"] == STEPS_PER_EPOCH

    resumed = launch(2, train_args(run_dir, *big, "--resume", "true"))
    assert resumed.finish(START) == 0, resumed.output
    assert final_checkpoint(run_dir)["step"] == 2 * STEPS_PER_EPOCH
    assert not list(directory.glob("*.tmp"))
    assert (run_dir / "summary.json").exists()


# 5. Transient read errors: retried a bounded number of times, then given up on.

def read_train_labels(path: Path) -> np.ndarray:
    with h5py.File(path, "r") as f:
        return f["train/y"][:]


def test_a_briefly_missing_file_is_read_after_announced_retries(tmp_path: Path, capfd) -> None:
    path, away = tmp_path / "data.h5", tmp_path / "elsewhere.h5"
    shutil.copy(default_dataset(), away)  # as during a file server fail-over: gone, then back
    back = threading.Timer(0.5, os.replace, (away, path))
    back.start()
    labels = retrying(lambda: read_train_labels(path), str(path), attempts=10, pause=0.1)
    back.join()
    np.testing.assert_array_equal(labels, read_train_labels(path))
    announced = capfd.readouterr().err
    assert f"rank 0 on {HOST}: reading {path} failed" in announced
    assert "No such file or directory" in announced and "attempt 1 of 10, retrying in 0.1 s" in announced


def test_the_loader_retries_a_batch_read_while_its_file_is_briefly_gone(tmp_path: Path, capfd) -> None:
    path, away = tmp_path / "data.h5", tmp_path / "elsewhere.h5"
    shutil.copy(default_dataset(), path)
    grid = ProcessGrid(device="cpu")
    loader = Loader(path, "train", grid, batch_size=32, preload=False, prefetch=0)  # opens x at the first read
    os.replace(path, away)
    back = threading.Timer(0.3, os.replace, (away, path))
    back.start()
    batch = next(loader.epoch(0))
    back.join()
    assert f"reading /train/x of {path} failed" in capfd.readouterr().err
    reference = next(Loader(path, "train", grid, batch_size=32, preload=False, prefetch=0).epoch(0))
    assert torch.equal(batch.x, reference.x) and torch.equal(batch.y, reference.y)


def test_a_read_that_keeps_failing_gives_up_after_the_bound(tmp_path: Path, capfd) -> None:
    path = tmp_path / "gone.h5"
    with pytest.raises(FileNotFoundError):
        retrying(lambda: read_train_labels(path), str(path), attempts=3, pause=0.01)
    announced = capfd.readouterr().err.splitlines()
    assert [line.split("; ")[-1] for line in announced] == [
        "attempt 1 of 3, retrying in 0.01 s", "attempt 2 of 3, retrying in 0.02 s"]


# 6. Soak: kill a rank at random steps and resume; the result is the uninterrupted run's.

@pytest.mark.mpi
@pytest.mark.slow
def test_soak_kills_and_resumes_end_where_an_uninterrupted_run_ends(launch, tmp_path: Path) -> None:
    rounds = int(os.environ.get("HPCBNN_SOAK_ROUNDS", "2"))
    total = (rounds + 2) * STEPS_PER_EPOCH
    common = ["--epochs", str(rounds + 2), "--backend", "torch", *TINY]
    whole = launch(2, train_args(tmp_path / "whole", *common))
    run_dir = tmp_path / "cut"
    rng = random.Random(rounds)
    for k in range(rounds):  # each round resumes from the previous one's checkpoint and dies mid-epoch
        at = (k + 1) * STEPS_PER_EPOCH + rng.randint(1, STEPS_PER_EPOCH - 1)
        job = launch(2, train_args(run_dir, *common, "--resume", "true"))
        job.wait_for(r"hpcbnn\.train: .* run directory")  # both ranks run: find them before the kill's window
        victim = job.ranks()[rng.randrange(2)]
        job.wait_for(rf"epoch \d+ step {at}/")
        os.kill(victim, signal.SIGKILL)
        assert job.finish(BOUND) == 137
        assert " failed: " not in job.output, job.output
        assert job.ranks() == {}
        assert k == 0 or f"resumed from the checkpoint of step {k * STEPS_PER_EPOCH} " in job.output
        assert final_checkpoint(run_dir)["step"] == (k + 1) * STEPS_PER_EPOCH
    last = launch(2, train_args(run_dir, *common, "--resume", "true"))
    assert last.finish(START) == 0, last.output
    assert whole.finish(START) == 0, whole.output
    a, b = final_checkpoint(tmp_path / "whole"), final_checkpoint(run_dir)
    assert a["step"] == b["step"] == total
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
