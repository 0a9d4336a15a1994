"""The HDF5 layout: a good file describes itself; every kind of bad file is one clear line."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import pytest

from hpcbnn.data import SCHEMA_VERSION, open_dataset
from hpcbnn.data.format import DatasetWriter, file_locking
from hpcbnn.errors import UsageError
from tests.mpi import ROOT, run_mpi


def write(path: Path, task: str = "classification", n: int = 40) -> Path:
    """A small valid file: 3-channel 4x4 images, 5 classes (or 2 regression targets)."""
    rng = np.random.default_rng(0)
    counts = {"train": n, "val": n // 4, "test": n // 4}
    k = 5 if task == "classification" else 2
    with DatasetWriter(path, task=task, input_shape=(3, 4, 4), num_classes=k, counts=counts,
                       class_names=list("abcde") if task == "classification" else None) as w:
        for split, m in counts.items():
            x = rng.normal(2.0, 3.0, (m, 3, 4, 4)).astype(np.float32)
            y = rng.integers(0, k, m) if task == "classification" else rng.normal(size=(m, k))
            w.append(split, x, y)
    return path


def test_a_good_file_describes_itself(tmp_path: Path) -> None:
    path = write(tmp_path / "good.h5")
    info = open_dataset(path, "val")
    assert (info.n, info.input_shape, info.task, info.num_classes) == (10, (3, 4, 4), "classification", 5)
    assert info.class_names == tuple("abcde") and info.target_mean is None
    with h5py.File(path, "r") as f:
        train = f["train/x"][:].astype(np.float64)
        assert f.attrs["schema_version"] == SCHEMA_VERSION
        assert f["train/x"].fletcher32 and f["train/x"].chunks[1:] == (3, 4, 4)  # chunked along N only
    np.testing.assert_allclose(info.mean, train.mean(axis=(0, 2, 3)))
    np.testing.assert_allclose(info.std, train.std(axis=(0, 2, 3)))
    reg = open_dataset(write(tmp_path / "reg.h5", "regression"), "test")
    assert reg.task == "regression" and reg.num_classes == 2 and reg.target_mean.shape == (2,)


def edit(fn: Callable[[h5py.File], None]) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        with h5py.File(path, "r+") as f:
            fn(f)
    return apply


def replace(name: str, data: np.ndarray) -> Callable[[h5py.File], None]:
    def fn(f: h5py.File) -> None:
        del f[name]
        f[name] = data
    return fn


def set_value(name: str, where: tuple, value: float) -> Callable[[h5py.File], None]:
    def fn(f: h5py.File) -> None:
        f[name][where] = value
    return fn


def truncate_chunk(path: Path) -> None:
    with h5py.File(path, "r") as f:
        offset = f["val/x"].id.get_chunk_info(0).byte_offset
    with open(path, "r+b") as f:
        f.seek(offset + 8)
        f.write(b"\x7f" * 16)


BAD_FILES = {
    "missing dataset": (edit(lambda f: f.__delitem__("val/y")), r"dataset /val/y is missing"),
    "missing split": (edit(lambda f: f.__delitem__("val")), r"dataset /val/x is missing"),
    "wrong input shape": (edit(replace("val/x", np.zeros((10, 3, 4, 5), np.float32))),
                          r"/val/x has shape \[10, 3, 4, 5\], expected \[N, 3, 4, 4\]"),
    "targets and inputs disagree": (edit(replace("val/y", np.zeros(9, np.int64))),
                                    r"/val/y has shape \[9\], expected \[10\]"),
    "count disagrees": (edit(lambda f: f["val"].attrs.__setitem__("count", 11)),
                        r"holds 10 examples but its count attribute says 11"),
    "NaN input": (edit(set_value("val/x", (3, 1, 2, 2), np.nan)), r"NaN or inf in the inputs at row 3"),
    "inf input": (edit(set_value("val/x", (9, 0, 0, 0), -np.inf)), r"NaN or inf in the inputs at row 9"),
    "label too large": (edit(set_value("val/y", (4,), 5)), r"label 5 at row 4 is outside 0..4"),
    "negative label": (edit(set_value("val/y", (0,), -1)), r"label -1 at row 0 is outside 0..4"),
    "float labels": (edit(replace("val/y", np.zeros(10, np.float32))), r"labels must be integers"),
    "wrong schema version": (edit(lambda f: f.attrs.__setitem__("schema_version", 7)),
                             r"schema version 7, but this hpcbnn reads version 1; re-convert"),
    "no schema version": (edit(lambda f: f.attrs.__delitem__("schema_version")),
                          r"no schema_version attribute, so not an hpcbnn data file"),
    "unknown task": (edit(lambda f: f.attrs.__setitem__("task", "ranking")), r"task 'ranking' is neither"),
    "per-channel stats of the wrong length": (edit(lambda f: f.attrs.__setitem__("std", [1.0, 2.0])),
                                              r"mean/std have 3/2 entries, expected 3"),
    "zero std": (edit(lambda f: f.attrs.__setitem__("std", [1.0, 0.0, 1.0])), r"std > 0"),
    "damaged chunk": (truncate_chunk, r"cannot read /val rows 0..\d+ .*damaged"),
    "not HDF5": (lambda p: p.write_text("time,load\n0,1\n"), r"not a readable HDF5 file"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_a_bad_file_is_one_line_naming_file_and_problem(tmp_path: Path, case: str) -> None:
    damage, message = BAD_FILES[case]
    path = write(tmp_path / "bad.h5")
    damage(path)
    with pytest.raises(UsageError) as err:
        open_dataset(path, "val")
    text = str(err.value)
    assert text.startswith(f"{path}: ") and "\n" not in text
    assert re.search(message, text), text


def test_missing_file_and_unknown_split(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=rf"{tmp_path}/none.h5: no such file; convert .* python -m hpcbnn.data"):
        open_dataset(tmp_path / "none.h5")
    with pytest.raises(UsageError, match="unknown split 'dev': choose one of train, val, test"):
        open_dataset(write(tmp_path / "good.h5"), "dev")


def test_values_are_only_scanned_when_asked(tmp_path: Path) -> None:
    path = write(tmp_path / "nan.h5")
    edit(set_value("train/x", (0, 0, 0, 0), np.nan))(path)
    assert open_dataset(path, "train", verify=False).n == 40
    with pytest.raises(UsageError, match="NaN"):
        open_dataset(path, "train")


def test_the_writer_refuses_bad_rows_and_leaves_no_file(tmp_path: Path) -> None:
    path = tmp_path / "out.h5"
    with pytest.raises(UsageError, match=r"src.npz: train split: label 7 at row 2 is outside 0..4"):
        with DatasetWriter(path, task="classification", input_shape=(2,), num_classes=5, source="src.npz",
                           counts={"train": 4, "val": 1, "test": 1}) as w:
            w.append("train", np.zeros((4, 2)), np.array([0, 1, 7, 2]))
    assert os.listdir(tmp_path) == []
    with pytest.raises(UsageError, match="the val split would be empty"):
        DatasetWriter(path, task="regression", input_shape=(2,), num_classes=1,
                      counts={"train": 4, "val": 0, "test": 1})


def test_writer_statistics_come_from_the_training_split_only(tmp_path: Path) -> None:
    with DatasetWriter(tmp_path / "s.h5", task="regression", input_shape=(2,), num_classes=1,
                       counts={"train": 4, "val": 2, "test": 2}) as w:
        w.append("train", np.array([[0, 5], [2, 5]]), np.array([[1.0], [3.0]]))
        w.append("train", np.array([[4, 5], [6, 5]]), np.array([[5.0], [7.0]]))
        w.append("val", np.full((2, 2), 1000.0), np.full((2, 1), 1000.0))
        w.append("test", np.full((2, 2), -1000.0), np.full((2, 1), -1000.0))
    info = open_dataset(tmp_path / "s.h5", "val")
    np.testing.assert_allclose(info.mean, [3.0, 5.0])
    np.testing.assert_allclose(info.std, [np.sqrt(5.0), 1.0])  # a constant channel is only centred
    np.testing.assert_allclose([info.target_mean[0], info.target_std[0]], [4.0, np.sqrt(5.0)])


def test_progress_lines_for_long_conversions(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with DatasetWriter(tmp_path / "p.h5", task="regression", input_shape=(1,), num_classes=1,
                       counts={"train": 2, "val": 1, "test": 1}, progress=True) as w:
        w.progress.every = 0.0
        w.append("train", np.zeros((2, 1)), np.zeros((2, 1)))
        w.append("val", np.zeros((1, 1)), np.zeros((1, 1)))
        w.append("test", np.zeros((1, 1)), np.zeros((1, 1)))
    err = capsys.readouterr().err
    assert f"writing {tmp_path}/p.h5: 2/4 examples (50%)" in err and "4/4 examples (100%)" in err


def test_file_locking_is_off_unless_the_environment_says(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HDF5_USE_FILE_LOCKING", raising=False)
    assert file_locking() is False
    monkeypatch.setenv("HDF5_USE_FILE_LOCKING", "TRUE")
    assert file_locking() is None


def test_readers_need_no_lock_while_a_writer_holds_the_file(tmp_path: Path) -> None:
    """Parallel file systems often cannot lock; a reader must not depend on it (HDF5 locks by default)."""
    path = write(tmp_path / "held.h5")
    probe = """if True:
        import os, sys
        from hpcbnn.data.format import open_h5
        open_h5(sys.argv[1]).close()
        print("read without a lock")
        os.environ["HDF5_USE_FILE_LOCKING"] = "TRUE"
        open_h5(sys.argv[1])
    """
    env = {k: v for k, v in os.environ.items() if k != "HDF5_USE_FILE_LOCKING"}
    with h5py.File(path, "a", locking=True):
        r = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True,
                           env={**env, "PYTHONPATH": str(ROOT)})
    assert r.stdout == "read without a lock\n" and r.returncode != 0 and "lock" in r.stderr, r.stderr


@pytest.mark.mpi
def test_a_bad_file_stops_every_rank_with_one_message(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.h5")
    edit(set_value("train/x", (17, 0, 1, 1), np.inf))(path)
    r = run_mpi(2, ["tests/programs/data_open.py", str(path), "train"], timeout=120)
    assert r.returncode == 2, r.output
    assert r.stderr.count("error:") == 1 and "NaN or inf in the inputs at row 17" in r.stderr
    assert "examples" not in r.stdout


@pytest.mark.mpi
def test_a_file_missing_on_one_rank_stops_all_ranks_without_a_hang(tmp_path: Path) -> None:
    write(tmp_path / "rank0.h5")
    r = run_mpi(2, ["tests/programs/data_open.py", str(tmp_path / "rank{rank}.h5"), "val"], timeout=120)
    assert r.returncode == 2, r.output
    assert r.stderr.count("error:") == 1
    assert f"{tmp_path}/rank1.h5: no such file" in r.stderr and "(seen by ranks [1] of 2)" in r.stderr
