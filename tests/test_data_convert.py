"""Converters: round trips from small files the tests write in each real on-disk format."""

from __future__ import annotations

import gzip
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from hpcbnn.data import cache_dir, open_dataset
from hpcbnn.data.__main__ import main
from hpcbnn.data.convert import (convert_cifar, convert_csv, convert_digits, convert_imagefolder,
                                 convert_mnist, convert_npy, convert_npz, read_idx, split_indices)
from hpcbnn.errors import UsageError
from tests.mpi import ROOT

rng = np.random.default_rng(42)


def stored(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    with h5py.File(path, "r") as f:
        return {s: (f[s]["x"][:], f[s]["y"][:]) for s in ("train", "val", "test")}


def rows_of(source: np.ndarray, part: np.ndarray) -> list[int]:
    """Where each row of `part` sits in `source` (rows are unique random data)."""
    keys = {r.tobytes(): i for i, r in enumerate(source)}
    return [keys[r.tobytes()] for r in part]


def test_digits_fixed_split_and_values(tmp_path: Path) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    data = stored(convert_digits(tmp_path / "d.h5"))
    assert [len(data[s][0]) for s in ("train", "val", "test")] == [1257, 180, 360]
    assert data["train"][0].shape[1:] == (1, 8, 8) and data["train"][0].dtype == np.float32
    seen = []
    for x, y in data.values():
        flat = x.reshape(len(x), -1)
        idx = [int(np.flatnonzero((digits.data == r).all(axis=1) & (digits.target == t))[0])
               for r, t in zip(flat, y)]
        seen += idx
    assert sorted(seen) == list(range(1797))  # every image once, in exactly one split
    info = open_dataset(tmp_path / "d.h5")
    assert np.isclose(info.mean[0], data["train"][0].mean()) and info.class_names == tuple("0123456789")
    assert np.array_equal(stored(convert_digits(tmp_path / "again.h5"))["val"][1], data["val"][1])


def test_split_offsets_give_disjoint_test_folds_and_offset_0_is_the_standard_split() -> None:
    n, n_val, n_test = 1797, 180, 360
    perm = np.random.default_rng(0).permutation(n)
    standard = split_indices(n, n_val, n_test, 0)
    assert np.array_equal(standard["test"], np.sort(perm[:n_test]))
    assert np.array_equal(standard["val"], np.sort(perm[n_test : n_test + n_val]))
    folds = [split_indices(n, n_val, n_test, 0, offset=f * n_test) for f in range(5)]
    for parts in folds:
        assert sorted(np.concatenate(list(parts.values())).tolist()) == list(range(n))
        assert len(parts["test"]) == n_test and len(parts["val"]) == n_val
    tests = [set(parts["test"].tolist()) for parts in folds]
    assert all(not tests[i] & tests[j] for i in range(4) for j in range(i + 1, 4))
    assert set().union(*tests) == set(range(n)) and len(tests[4] & tests[0]) == 5 * n_test - n


def test_npz_with_a_test_split_carves_val_and_normalises_on_train(tmp_path: Path) -> None:
    x_train = rng.normal(0, 1, (50, 6)).astype(np.float32)
    x_test = rng.normal(100, 1, (20, 6)).astype(np.float32)
    y_train, y_test = rng.integers(0, 3, 50), rng.integers(0, 3, 20)
    np.savez(tmp_path / "in.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    out = convert_npz(tmp_path / "in.npz", tmp_path / "o.h5", val_fraction=0.2, seed=1)
    data = stored(out)
    np.testing.assert_array_equal(data["test"][0], x_test)
    np.testing.assert_array_equal(data["test"][1], y_test)
    train_rows, val_rows = rows_of(x_train, data["train"][0]), rows_of(x_train, data["val"][0])
    assert len(val_rows) == 10 and sorted(train_rows + val_rows) == list(range(50))
    np.testing.assert_array_equal(data["val"][1], y_train[val_rows])
    info = open_dataset(out, "test")
    assert info.task == "classification" and info.num_classes == 3 and info.input_shape == (6,)
    np.testing.assert_allclose(info.mean, data["train"][0].mean(axis=0), atol=1e-6)
    assert np.abs(info.mean).max() < 1  # the test split (mean 100) did not leak in


def test_npz_regression_and_channels_last_images(tmp_path: Path) -> None:
    x = rng.integers(0, 256, (30, 5, 4, 3), dtype=np.uint8)
    y = rng.normal(size=30)
    np.savez(tmp_path / "in.npz", x=x, y=y)
    out = convert_npz(tmp_path / "in.npz", tmp_path / "o.h5", channels_last=True)
    data = stored(out)
    assert data["train"][0].dtype == np.uint8 and data["train"][0].shape[1:] == (3, 5, 4)
    assert [len(data[s][0]) for s in ("train", "val", "test")] == [24, 3, 3]
    rows = rows_of(np.moveaxis(x, -1, 1), data["val"][0])
    np.testing.assert_allclose(data["val"][1][:, 0], y[rows], rtol=1e-6)
    info = open_dataset(out)
    assert info.task == "regression" and info.num_classes == 1 and info.target_std[0] > 0


def test_npy_pair_and_bad_inputs(tmp_path: Path) -> None:
    x, y = rng.normal(size=(40, 3)), rng.integers(0, 4, 40)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    data = stored(convert_npy(tmp_path / "x.npy", tmp_path / "y.npy", tmp_path / "o.h5", test_fraction=0.25))
    assert [len(data[s][0]) for s in ("train", "val", "test")] == [26, 4, 10]
    np.testing.assert_array_equal(data["test"][1], y[rows_of(x.astype(np.float32), data["test"][0])])
    np.save(tmp_path / "nan.npy", np.where(np.arange(120).reshape(40, 3) == 7, np.nan, x))
    with pytest.raises(UsageError, match=r"nan.npy: train: NaN or inf in the inputs at row 2$"):
        convert_npy(tmp_path / "nan.npy", tmp_path / "y.npy", tmp_path / "bad.h5")
    np.savez(tmp_path / "keys.npz", inputs=x)
    with pytest.raises(UsageError, match=r"keys.npz: holds arrays \['inputs'\]; expected x and y"):
        convert_npz(tmp_path / "keys.npz", tmp_path / "bad.h5")
    assert not (tmp_path / "bad.h5").exists()


def cifar_batch(n: int, key: str, classes: int) -> dict:
    return {"batch_label": "testing batch", "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            key: rng.integers(0, classes, n).tolist(), "filenames": [f"img_{i}.png" for i in range(n)]}


def dump(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def test_cifar10_python_batches(tmp_path: Path) -> None:
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    batches = [cifar_batch(8, "labels", 10) for _ in range(5)]
    for i, b in enumerate(batches, 1):
        dump(root / f"data_batch_{i}", b)
    test = cifar_batch(6, "labels", 10)
    dump(root / "test_batch", test)
    dump(root / "batches.meta", {"label_names": [f"class{i}" for i in range(10)], "num_vis": 3072})
    out = convert_cifar(tmp_path, tmp_path / "c.h5", val_fraction=0.25)
    data = stored(out)
    images = np.concatenate([b["data"] for b in batches]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([b["labels"] for b in batches])
    np.testing.assert_array_equal(data["test"][0], test["data"].reshape(-1, 3, 32, 32))
    np.testing.assert_array_equal(data["test"][1], test["labels"])
    rows = rows_of(images, data["train"][0]) + rows_of(images, data["val"][0])
    assert sorted(rows) == list(range(40)) and len(data["val"][0]) == 10
    np.testing.assert_array_equal(data["train"][1], labels[rows[:30]])
    info = open_dataset(out)
    assert info.input_shape == (3, 32, 32) and info.num_classes == 10 and info.class_names[3] == "class3"
    (root / "data_batch_4").unlink()
    with pytest.raises(UsageError, match=r"data_batch_4: missing"):
        convert_cifar(root, tmp_path / "c2.h5")


def test_cifar100_fine_and_coarse(tmp_path: Path) -> None:
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    train, test = cifar_batch(20, "fine_labels", 100), cifar_batch(5, "fine_labels", 100)
    for b in (train, test):
        b["coarse_labels"] = [f // 5 for f in b["fine_labels"]]
    dump(root / "train", train)
    dump(root / "test", test)
    dump(root / "meta", {"fine_label_names": [f"f{i}" for i in range(100)],
                         "coarse_label_names": [f"c{i}" for i in range(20)]})
    fine = open_dataset(convert_cifar(tmp_path, tmp_path / "f.h5"), "test")
    coarse = open_dataset(convert_cifar(tmp_path, tmp_path / "c.h5", coarse=True), "test")
    assert (fine.num_classes, coarse.num_classes) == (100, 20) and coarse.class_names[-1] == "c19"
    np.testing.assert_array_equal(stored(tmp_path / "c.h5")["test"][1], test["coarse_labels"])


class _Runs:
    """A pickle that calls `call(*args)` when loaded: what a malicious "CIFAR batch" holds."""

    def __init__(self, call, *args) -> None:  # type: ignore[no-untyped-def]
        self.call, self.args = call, args

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return self.call, self.args


@pytest.mark.parametrize("protocol", [2, 5])
@pytest.mark.parametrize("attack", ["os.system", "builtins.exec", "subprocess.Popen", "codecs"])
def test_cifar_pickle_that_runs_code_is_refused_and_nothing_runs(tmp_path: Path, attack: str,
                                                                 protocol: int) -> None:
    import builtins
    import codecs
    import os

    marker = tmp_path / "ran"
    payload = {
        "os.system": _Runs(os.system, f"touch {marker}"),
        "builtins.exec": _Runs(builtins.exec, f"open({str(marker)!r}, 'w').close()"),
        "subprocess.Popen": _Runs(subprocess.Popen, ["touch", str(marker)]),
        "codecs": _Runs(codecs.encode, "abc", "rot13"),  # an allowed global, misused
    }[attack]
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    for i in range(1, 6):
        dump(root / f"data_batch_{i}", cifar_batch(4, "labels", 10))
    dump(root / "test_batch", cifar_batch(4, "labels", 10))
    with open(root / "batches.meta", "wb") as f:  # the first file the converter reads
        pickle.dump({"label_names": [f"c{i}" for i in range(10)], "evil": payload}, f, protocol=protocol)
    if attack == "os.system" and protocol == 2:  # once through the command: one line, exit 2
        proc = subprocess.run([sys.executable, "-m", "hpcbnn.data", "cifar", str(tmp_path), str(tmp_path / "c.h5")],
                              capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "batches.meta: not a CIFAR python batch" in lines[0], proc.stderr
        assert "refusing to load it" in lines[0] and "Traceback" not in proc.stderr
    else:
        with pytest.raises(UsageError, match=r"batches.meta: not a CIFAR python batch \(.*refus"):
            convert_cifar(tmp_path, tmp_path / "c.h5")
    assert not marker.exists(), "the pickle's code ran"
    assert not (tmp_path / "c.h5").exists()


def test_cifar_batches_written_by_numpy_1_and_python_2_still_load(tmp_path: Path) -> None:
    """The real CIFAR files: protocol 2 from Python 2, numpy.core.multiarray, byte strings read as latin1."""
    from hpcbnn.data.convert import _unpickle

    data = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
    raw = pickle.dumps({"data": data, "labels": [1, 2, 3]}, protocol=2)
    raw = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    (tmp_path / "b").write_bytes(raw)
    batch = _unpickle(tmp_path / "b")
    np.testing.assert_array_equal(batch["data"], data)
    assert batch["labels"] == [1, 2, 3]
    (tmp_path / "list").write_bytes(pickle.dumps([1, 2], protocol=2))
    with pytest.raises(UsageError, match="holds a list, not a dict"):
        _unpickle(tmp_path / "list")


def write_idx(path: Path, array: np.ndarray) -> None:
    """The IDX format: two zero bytes, type 0x08 (ubyte), the rank, big-endian sizes, the data."""
    raw = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(raw)
    else:
        path.write_bytes(raw)


def test_mnist_idx_files_in_torchvision_layout(tmp_path: Path) -> None:
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    train_x, train_y = rng.integers(0, 256, (30, 28, 28), dtype=np.uint8), rng.integers(0, 10, 30, dtype=np.uint8)
    test_x, test_y = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8), rng.integers(0, 10, 7, dtype=np.uint8)
    write_idx(raw / "train-images-idx3-ubyte.gz", train_x)
    write_idx(raw / "train-labels-idx1-ubyte.gz", train_y)
    write_idx(raw / "t10k-images-idx3-ubyte", test_x)
    write_idx(raw / "t10k-labels-idx1-ubyte", test_y)
    data = stored(convert_mnist(tmp_path, tmp_path / "m.h5"))
    np.testing.assert_array_equal(data["test"][0][:, 0], test_x)
    np.testing.assert_array_equal(data["test"][1], test_y)
    rows = rows_of(train_x, data["train"][0][:, 0]) + rows_of(train_x, data["val"][0][:, 0])
    assert sorted(rows) == list(range(30)) and len(data["val"][0]) == 3
    np.testing.assert_array_equal(np.concatenate([data["train"][1], data["val"][1]]), train_y[rows])
    (raw / "bad-idx").write_bytes(b"\x08\x03\x00\x00")
    with pytest.raises(UsageError, match="bad-idx: not an IDX .*bad magic number 08030000"):
        read_idx(raw / "bad-idx")
    write_idx(raw / "t10k-labels-idx1-ubyte", test_y)
    (raw / "t10k-labels-idx1-ubyte").write_bytes((raw / "t10k-labels-idx1-ubyte").read_bytes()[:-2])
    with pytest.raises(UsageError, match=r"header says \[7\] but the file holds 5 values"):
        convert_mnist(tmp_path, tmp_path / "m2.h5")


def png_tree(root: Path, classes: dict[str, int], size: tuple[int, int] = (6, 5)) -> dict[bytes, str]:
    """PNG files root/<class>/<i>.png; returns pixels (C, H, W bytes) -> class name."""
    from PIL import Image

    pixels = {}
    for name, count in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            img = rng.integers(0, 256, (size[0], size[1], 3), dtype=np.uint8)
            Image.fromarray(img).save(root / name / f"{i}.png")
            pixels[np.moveaxis(img, -1, 0).tobytes()] = name
    return pixels


def test_imagefolder_single_tree_and_split_trees(tmp_path: Path) -> None:
    pixels = png_tree(tmp_path / "one", {"cat": 6, "dog": 5, "eel": 4})
    out = convert_imagefolder(tmp_path / "one", tmp_path / "one.h5", val_fraction=0.2, test_fraction=0.2)
    info = open_dataset(out)
    assert info.class_names == ("cat", "dog", "eel") and info.input_shape == (3, 6, 5)
    data = stored(out)
    assert [len(data[s][0]) for s in ("train", "val", "test")] == [9, 3, 3]
    for x, y in data.values():
        assert [pixels[img.tobytes()] for img in x] == [info.class_names[c] for c in y]
    assert {pixels[img.tobytes()] for x, _ in data.values() for img in x} == {"cat", "dog", "eel"}

    png_tree(tmp_path / "split" / "train", {"a": 4, "b": 4})
    test_pixels = png_tree(tmp_path / "split" / "test", {"a": 2, "b": 1})
    data = stored(convert_imagefolder(tmp_path / "split", tmp_path / "split.h5", val_fraction=0.25))
    assert [len(data[s][0]) for s in ("train", "val", "test")] == [6, 2, 3]
    assert [test_pixels[img.tobytes()] for img in data["test"][0]] == ["a", "a", "b"]


def test_imagefolder_sizes_must_agree_unless_resized(tmp_path: Path) -> None:
    from PIL import Image

    png_tree(tmp_path / "t", {"a": 5, "b": 5})
    Image.fromarray(np.zeros((9, 9), np.uint8)).save(tmp_path / "t" / "b" / "odd.png")
    with pytest.raises(UsageError, match=r"odd.png: 9x9 pixels, but .* has 6x5; pass --size H W"):
        convert_imagefolder(tmp_path / "t", tmp_path / "t.h5", seed=3)
    data = stored(convert_imagefolder(tmp_path / "t", tmp_path / "g.h5", size=(4, 4), grayscale=True))
    assert data["train"][0].shape[1:] == (1, 4, 4)


def write_series(path: Path, t: int) -> np.ndarray:
    series = np.stack([np.arange(t) * 1.0, np.arange(t) * -2.0 + 0.5, np.sin(np.arange(t))], axis=1)
    lines = ["time,load,price,temp"] + [f"2024-01-01T{i:05d},{a},{b},{c}" for i, (a, b, c) in enumerate(series)]
    path.write_text("\n".join(lines) + "\n")
    return series


def test_csv_windows_split_by_time(tmp_path: Path) -> None:
    series = write_series(tmp_path / "s.csv", 100)
    out = convert_csv(tmp_path / "s.csv", tmp_path / "s.h5", input_length=6, horizon=2, stride=3,
                      columns=["load", "temp"], targets=["load"], val_fraction=0.2, test_fraction=0.2)
    data = stored(out)
    x, y = data["train"]
    assert x.shape[1:] == (2, 6) and y.shape[1:] == (2,)
    np.testing.assert_allclose(x[1], series[3:9, [0, 2]].T, rtol=1e-6)
    np.testing.assert_allclose(y[1], series[9:11, 0], rtol=1e-6)
    # train covers steps 0..59, val 60..79, test 80..99; no window straddles a boundary.
    assert len(x) == (60 - 8) // 3 + 1 and x[-1, 0, 0] + 7 <= 59
    assert data["val"][0][0, 0, 0] == 60 and data["val"][1][-1, -1] <= 79
    assert data["test"][0][0, 0, 0] == 80 and data["test"][1][-1, -1] <= 99
    info = open_dataset(out, "test")
    assert info.task == "regression" and info.num_classes == 2
    np.testing.assert_allclose(info.mean[0], x[:, 0].mean(), rtol=1e-5)
    default = stored(convert_csv(tmp_path / "s.csv", tmp_path / "all.h5", input_length=4, horizon=3))
    assert default["train"][0].shape[1:] == (3, 4) and default["train"][1].shape[1:] == (9,)
    np.testing.assert_allclose(default["train"][1][0], series[4:7].reshape(-1), rtol=1e-6)


def test_csv_errors_name_the_problem(tmp_path: Path) -> None:
    write_series(tmp_path / "s.csv", 40)
    with pytest.raises(UsageError, match=r"no column\(s\) \['wind'\]; the header has \['time', 'load'"):
        convert_csv(tmp_path / "s.csv", tmp_path / "o.h5", input_length=4, columns=["wind"])
    with pytest.raises(UsageError, match=r"the val part has 4 time steps, fewer than input length \+ horizon = 11"):
        convert_csv(tmp_path / "s.csv", tmp_path / "o.h5", input_length=10, val_fraction=0.1)
    text = (tmp_path / "s.csv").read_text().splitlines()
    text[5] = "2024-01-01T00004,,1.0,2.0"
    (tmp_path / "gap.csv").write_text("\n".join(text))
    with pytest.raises(UsageError, match=r"gap.csv: line 6, column 'load': '' is not a number"):
        convert_csv(tmp_path / "gap.csv", tmp_path / "o.h5", input_length=4)
    assert not (tmp_path / "o.h5").exists()


def test_cli_converts_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_series(tmp_path / "s.csv", 60)
    main(["--quiet", "csv", str(tmp_path / "s.csv"), str(tmp_path / "s.h5"), "--input-length", "3",
          "--horizon", "2", "--column", "load"])
    assert "s.h5: regression, 2 targets, inputs [1, 3] float32; train 38, val 2, test 8" in capsys.readouterr().out
    main(["info", str(tmp_path / "s.h5")])
    assert "train 38, val 2, test 8" in capsys.readouterr().out


def test_cli_usage_errors_are_one_line_and_exit_2(tmp_path: Path) -> None:
    (tmp_path / "x.npy").write_text("not numpy")
    r = subprocess.run([sys.executable, "-m", "hpcbnn.data", "npy", str(tmp_path / "x.npy"),
                        str(tmp_path / "y.npy"), str(tmp_path / "o.h5")],
                       capture_output=True, text=True, cwd=ROOT, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert r.stderr.startswith(f"hpcbnn.data: error: {tmp_path}/x.npy: cannot read as .npy")


def test_default_dataset_goes_to_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hpcbnn.data import default_dataset

    monkeypatch.setenv("HPCBNN_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path / "data"
    path = default_dataset()
    assert path == tmp_path / "data" / "digits.h5" and open_dataset(path, "test").n == 360
    with h5py.File(path, "r+") as f:
        f.attrs["schema_version"] = 0  # an old cache is replaced, not used
    assert open_dataset(default_dataset(), "test").n == 360


def test_diabetes_command_writes_a_valid_regression_file(tmp_path: Path) -> None:
    from sklearn.datasets import load_diabetes

    main(["--quiet", "diabetes", str(tmp_path / "diabetes.h5")])
    infos = {s: open_dataset(tmp_path / "diabetes.h5", s) for s in ("train", "val", "test")}
    assert [infos[s].n for s in infos] == [266, 88, 88]
    assert all(i.task == "regression" and i.input_shape == (10,) and i.num_classes == 1 for i in infos.values())
    data = stored(tmp_path / "diabetes.h5")
    assert data["train"][1].shape == (266, 1) and data["train"][0].dtype == np.float32
    np.testing.assert_allclose(infos["train"].target_mean, data["train"][1].mean(0), rtol=1e-5)
    y = load_diabetes().target
    assert np.array_equal(np.sort(np.concatenate([d[1][:, 0] for d in data.values()])), np.sort(y))
