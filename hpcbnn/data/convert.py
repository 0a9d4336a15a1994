"""Converters from the formats data arrives in to hpcbnn's HDF5 layout (format.py).

Each reads files already on disk (clusters have no internet: nothing is ever downloaded),
assigns train/val/test, and streams the rows through `DatasetWriter`, which validates
them, computes the normalisation statistics on the training split only and moves the
finished file into place atomically. Sources without a given split get one carved out by
a seeded random split, except time series, which are split by time.
"""

from __future__ import annotations

import csv
import gzip
import pickle
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

try:
    from numpy._core import multiarray as _multiarray
except ImportError:  # numpy 1
    from numpy.core import multiarray as _multiarray  # type: ignore[no-redef]

from hpcbnn import native
from hpcbnn.data.format import SCHEMA_VERSION, SPLITS, TASKS, DatasetWriter, Task, find_bad_values, open_h5
from hpcbnn.errors import UsageError

BLOCK_BYTES = 8 * 1024 * 1024
DIGITS_COUNTS = {"train": 1257, "val": 180, "test": 360}
DIGITS_SEED = 0
DIABETES_COUNTS = {"train": 266, "val": 88, "test": 88}  # 60/20/20
DIABETES_SEED = 0


def split_indices(n: int, n_val: int, n_test: int, seed: int, offset: int = 0) -> dict[str, np.ndarray]:
    """A seeded random split of rows 0..n-1; each part sorted so the source is read in order.

    `offset` rotates the permutation first, so offsets 0, n_test, 2 n_test, ... give test
    parts that do not overlap (cross-validation folds); offset 0 is the standard split.
    """
    perm = np.roll(np.random.default_rng(seed).permutation(n), -offset)
    return {
        "test": np.sort(perm[:n_test]),
        "val": np.sort(perm[n_test : n_test + n_val]),
        "train": np.sort(perm[n_test + n_val :]),
    }


def _count(n: int, fraction: float, option: str) -> int:
    if not 0 <= fraction < 1:
        raise UsageError(f"{option} {fraction} must lie in [0, 1)")
    return round(n * fraction)


def as_inputs(x: np.ndarray, channels_last: bool = False) -> np.ndarray:
    """A view of the inputs in stored layout: channels first, at least [N, F] (no copy, so
    memory-mapped sources stay on disk; the writer converts block by block)."""
    if x.ndim == 1:
        x = x[:, None]
    return np.moveaxis(x, -1, 1) if channels_last and x.ndim >= 3 else x


def stored_dtype(x: np.ndarray) -> np.dtype:
    """uint8 inputs (images) stay uint8, everything else becomes float32."""
    return np.dtype(np.uint8 if x.dtype == np.uint8 else np.float32)


def as_targets(
    ys: Sequence[np.ndarray], task: str, num_classes: int | None, source: str
) -> tuple[Task, list[np.ndarray], int]:
    """The task (inferred when 'auto'), the targets as stored and the output size."""
    if task == "auto":
        task = "classification" if all(y.ndim == 1 and y.dtype.kind in "iub" for y in ys) else "regression"
    if task not in TASKS:
        raise UsageError(f"{source}: unknown task {task!r}: choose auto or one of {', '.join(TASKS)}")
    if task == "regression":
        ys = [np.asarray(y, np.float32).reshape(len(y), -1) for y in ys]
        return "regression", ys, ys[0].shape[1]
    if any(y.ndim != 1 for y in ys):
        raise UsageError(
            f"{source}: classification labels must be one number per example, "
            f"got shape {list(ys[0].shape)}; use --task regression for vector targets"
        )
    if any(y.dtype.kind == "f" and not np.array_equal(y, np.round(y)) for y in ys):
        raise UsageError(
            f"{source}: classification labels must be whole numbers; use --task regression for real-valued targets"
        )
    ys = [y.astype(np.int64) for y in ys]
    return "classification", ys, num_classes or int(max(y.max() for y in ys)) + 1


def _blocks(rows: np.ndarray, row_bytes: int) -> Iterator[np.ndarray]:
    step = max(1, BLOCK_BYTES // max(1, row_bytes))
    for s in range(0, len(rows), step):
        yield rows[s : s + step]


def write_arrays(
    out: Path | str,
    parts: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
    *,
    task: Task,
    num_classes: int,
    source: str,
    class_names: Sequence[str] | None = None,
    progress: bool = False,
) -> Path:
    """Write split -> (x, y, rows of x/y that belong to the split) from in-memory or mapped arrays."""
    x0 = parts["train"][0]
    with DatasetWriter(
        out,
        task=task,
        input_shape=x0.shape[1:],
        num_classes=num_classes,
        counts={s: len(parts[s][2]) for s in SPLITS},
        x_dtype=stored_dtype(x0),
        class_names=class_names,
        source=source,
        progress=progress,
    ) as writer:
        for split in SPLITS:
            x, y, rows = parts[split]
            for block in _blocks(rows, x[0].nbytes):
                writer.append(split, x[block], y[block])
    return Path(out)


def convert_arrays(
    out: Path | str,
    splits: Mapping[str, tuple[np.ndarray, np.ndarray]],
    *,
    source: str,
    task: str = "auto",
    num_classes: int | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    channels_last: bool = False,
    class_names: Sequence[str] | None = None,
    progress: bool = False,
) -> Path:
    """Arrays for "train" and optionally "val"/"test"; missing splits are carved out of train."""
    xs = {s: as_inputs(x, channels_last) for s, (x, _) in splits.items()}
    names = list(splits)
    kind, ys, num_classes = as_targets([splits[s][1] for s in names], task, num_classes, source)
    parts = {s: (xs[s], y, np.arange(len(y))) for s, y in zip(names, ys)}
    for s, (x, y, _) in parts.items():
        if len(x) != len(y):
            raise UsageError(f"{source}: {s} has {len(x)} inputs but {len(y)} targets")
        _check_values(x, y, kind, num_classes, f"{source}: {s}")
    x, y, _ = parts["train"]
    n = len(y)
    carved = split_indices(
        n,
        _count(n, val_fraction, "--val_fraction") if "val" not in parts else 0,
        _count(n, test_fraction, "--test_fraction") if "test" not in parts else 0,
        seed,
    )
    parts = {s: parts[s] if s in parts and s != "train" else (x, y, carved[s]) for s in SPLITS}
    return write_arrays(
        out, parts, task=kind, num_classes=num_classes, source=source, class_names=class_names, progress=progress
    )


def _check_values(x: np.ndarray, y: np.ndarray, task: str, num_classes: int, where: str) -> None:
    """Reject NaN/inf and bad labels before rows are split, so the message gives the source row."""
    step = max(1, BLOCK_BYTES // max(1, x[0].nbytes))
    for start in range(0, len(x), step):
        problem = find_bad_values(x[start : start + step], y[start : start + step], task, num_classes, start)
        if problem:
            raise UsageError(f"{where}: {problem}")


def convert_npz(path: Path | str, out: Path | str, **options: Any) -> Path:
    """An .npz with x, y (all carved) or x_train, y_train [, x_val, y_val] [, x_test, y_test]."""
    try:
        data = np.load(path)
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path}: cannot read as .npz ({exc})") from None
    with data:
        keys = set(data.files)
        if {"x", "y"} <= keys:
            splits = {"train": (data["x"], data["y"])}
        elif {"x_train", "y_train"} <= keys:
            splits = {s: (data[f"x_{s}"], data[f"y_{s}"]) for s in SPLITS if {f"x_{s}", f"y_{s}"} <= keys}
        else:
            raise UsageError(
                f"{path}: holds arrays {sorted(keys)}; expected x and y, or x_train and "
                f"y_train (with optional x_val/y_val, x_test/y_test)"
            )
    return convert_arrays(out, splits, source=str(path), **options)


def convert_npy(x_path: Path | str, y_path: Path | str, out: Path | str, **options: Any) -> Path:
    """Inputs and targets as two .npy files (memory-mapped, so they may exceed memory)."""
    arrays = []
    for p in (x_path, y_path):
        try:
            arrays.append(np.load(p, mmap_mode="r"))
        except (OSError, ValueError) as exc:
            raise UsageError(f"{p}: cannot read as .npy ({exc})") from None
    return convert_arrays(out, {"train": tuple(arrays)}, source=str(x_path), **options)


def _latin1(text: str, encoding: str = "utf-8") -> bytes:
    """How protocol-2 pickles written by Python 3 store bytes: `_codecs.encode(text, "latin1")`."""
    if encoding != "latin1":
        raise pickle.UnpicklingError(f"refuses _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


# Every global a CIFAR python batch refers to: numpy arrays (as numpy 1 and numpy 2 name their
# reconstructor) and the bytes of Python 3 protocol-2 pickles. Anything else (os.system,
# builtins.eval, subprocess.Popen, ...) is refused before it is looked up, so nothing runs.
CIFAR_PICKLE_GLOBALS: dict[tuple[str, str], Any] = {
    **{(m, "_reconstruct"): _multiarray._reconstruct for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(m, "scalar"): _multiarray.scalar for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1,
}


class _CifarUnpickler(pickle.Unpickler):
    """Dicts, lists, strings, numbers and numpy arrays only: a pickle can run any code it
    names, and a downloaded "CIFAR" directory is not necessarily what it claims to be."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return CIFAR_PICKLE_GLOBALS[module, name]
        except KeyError:
            raise pickle.UnpicklingError(
                f"it refers to {module}.{name}, which CIFAR batches never do (only numpy arrays, "
                "lists, strings and numbers); refusing to load it"
            ) from None


def _unpickle(path: Path) -> dict:
    """One CIFAR python batch (a pickled dict; written by Python 2, hence latin1)."""
    try:
        with open(path, "rb") as f:
            batch = _CifarUnpickler(f, encoding="latin1").load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError) as exc:
        raise UsageError(f"{path}: not a CIFAR python batch ({exc})") from None
    if not isinstance(batch, dict):
        raise UsageError(f"{path}: not a CIFAR python batch (it holds a {type(batch).__name__}, not a dict)")
    return batch


def _cifar_images(batch: dict, path: Path) -> np.ndarray:
    data = np.asarray(batch.get("data"))
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.dtype != np.uint8:
        raise UsageError(f"{path}: 'data' should be uint8 [N, 3072], got {data.dtype} {list(data.shape)}")
    return data.reshape(-1, 3, 32, 32)


def convert_cifar(
    directory: Path | str,
    out: Path | str,
    *,
    coarse: bool = False,
    val_fraction: float = 0.1,
    seed: int = 0,
    progress: bool = False,
) -> Path:
    """CIFAR-10 or CIFAR-100 python batches (as torchvision unpacks them) in `directory`."""
    root = Path(directory)
    candidates = [root, root / "cifar-10-batches-py", root / "cifar-100-python"]
    c10 = next((d for d in candidates if (d / "data_batch_1").is_file()), None)
    c100 = next((d for d in candidates if (d / "train").is_file() and (d / "meta").is_file()), None)
    if c10 is not None:
        files = {"train": [c10 / f"data_batch_{i}" for i in range(1, 6)], "test": [c10 / "test_batch"]}
        key, names = "labels", _unpickle(c10 / "batches.meta")["label_names"]
    elif c100 is not None:
        files = {"train": [c100 / "train"], "test": [c100 / "test"]}
        key = "coarse_labels" if coarse else "fine_labels"
        names = _unpickle(c100 / "meta")["coarse_label_names" if coarse else "fine_label_names"]
    else:
        raise UsageError(
            f"{root}: no CIFAR python batches found (looked for data_batch_1 or "
            f"train + meta in {', '.join(map(str, candidates))})"
        )
    splits = {}
    for split, paths in files.items():
        images, labels = [], []
        for p in paths:
            if not p.is_file():
                raise UsageError(f"{p}: missing; a CIFAR directory needs all its batch files")
            batch = _unpickle(p)
            if key not in batch:
                raise UsageError(f"{p}: no {key!r} entry in this CIFAR batch")
            images.append(_cifar_images(batch, p))
            labels.append(np.asarray(batch[key], np.int64))
        splits[split] = (np.concatenate(images), np.concatenate(labels))
    return convert_arrays(
        out,
        splits,
        source=str(root),
        task="classification",
        num_classes=len(names),
        val_fraction=val_fraction,
        seed=seed,
        class_names=names,
        progress=progress,
    )


IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format), gzipped or not."""
    with open(path, "rb") as f:
        head = f.read(2)
    with (gzip.open if head == b"\x1f\x8b" else open)(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in IDX_DTYPES:
        raise UsageError(f"{path}: not an IDX (MNIST) file: bad magic number {data[:4].hex()}")
    ndim = data[3]
    shape = tuple(int(s) for s in np.frombuffer(data, ">u4", ndim, 4))
    dtype = np.dtype(IDX_DTYPES[data[2]])
    body = np.frombuffer(data, dtype, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise UsageError(f"{path}: header says {list(shape)} but the file holds {body.size} values; it is truncated")
    return body.reshape(shape)


def _find(directory: Path, name: str) -> Path:
    """`name` or `name`.gz in the directory, its raw/, or torchvision's <Dataset>/raw/."""
    places = [directory, directory / "raw", *sorted(directory.glob("*/raw"))]
    for place in places:
        for candidate in (place / name, place / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    raise UsageError(f"{directory}: no {name}[.gz] found (looked in {', '.join(map(str, places))})")


def convert_mnist(
    directory: Path | str, out: Path | str, *, val_fraction: float = 0.1, seed: int = 0, progress: bool = False
) -> Path:
    """MNIST or Fashion-MNIST raw IDX files (train-images-idx3-ubyte etc., optionally .gz)."""
    root = Path(directory)
    splits = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(_find(root, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(_find(root, f"{prefix}-labels-idx1-ubyte"))
        if images.ndim != 3 or labels.ndim != 1:
            raise UsageError(
                f"{root}: {prefix} images must be [N, H, W] and labels [N], got "
                f"{list(images.shape)} and {list(labels.shape)}"
            )
        splits[split] = (images[:, None], labels.astype(np.int64))
    return convert_arrays(
        out,
        splits,
        source=str(root),
        task="classification",
        num_classes=10,
        val_fraction=val_fraction,
        seed=seed,
        progress=progress,
    )


def _image(path: str, mode: str, size: tuple[int, int] | None) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as file:
            img = file.convert(mode)
            if size is not None:
                img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            pixels = np.asarray(img, np.uint8)
    except (OSError, UnidentifiedImageError) as exc:
        raise UsageError(f"{path}: cannot read the image ({exc})") from None
    return pixels[None] if pixels.ndim == 2 else np.moveaxis(pixels, -1, 0)


def convert_imagefolder(
    directory: Path | str,
    out: Path | str,
    *,
    size: tuple[int, int] | None = None,
    grayscale: bool = False,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    progress: bool = False,
) -> Path:
    """An ImageFolder tree (class/image.png) or train/, val/, test/ trees of them; same-size images
    unless `size` (H, W) resizes them all."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    root = Path(directory)
    trees = {s: root / s for s in SPLITS if (root / s).is_dir()} if (root / "train").is_dir() else {"train": root}
    try:
        classes, class_to_idx = find_classes(trees["train"])
        for d in trees.values():
            extra = set(find_classes(d)[0]) - set(classes)
            if extra:
                raise UsageError(f"{d}: classes {sorted(extra)} do not occur in {trees['train']}")
        samples = {s: make_dataset(d, class_to_idx, IMG_EXTENSIONS) for s, d in trees.items()}
    except OSError as exc:
        raise UsageError(f"{root}: not an ImageFolder tree ({exc})") from None
    n = len(samples["train"])
    carved = split_indices(
        n,
        _count(n, val_fraction, "--val_fraction") if "val" not in trees else 0,
        _count(n, test_fraction, "--test_fraction") if "test" not in trees else 0,
        seed,
    )
    lists = {s: samples[s] if s in trees and s != "train" else [samples["train"][i] for i in carved[s]] for s in SPLITS}
    mode = "L" if grayscale else "RGB"
    first_path = lists["train"][0][0]
    first = _image(first_path, mode, size)
    with DatasetWriter(
        out,
        task="classification",
        input_shape=first.shape,
        num_classes=len(classes),
        counts={s: len(v) for s, v in lists.items()},
        x_dtype=np.uint8,
        class_names=classes,
        source=str(root),
        progress=progress,
    ) as writer:
        for split, items in lists.items():
            for s in range(0, len(items), 256):
                chunk = items[s : s + 256]
                images = [_image(p, mode, size) for p, _ in chunk]
                for (p, _), img in zip(chunk, images):
                    if img.shape != first.shape:
                        raise UsageError(
                            f"{p}: {img.shape[1]}x{img.shape[2]} pixels, but {first_path} has "
                            f"{first.shape[1]}x{first.shape[2]}; pass --size H W to resize all"
                        )
                writer.append(split, np.stack(images), np.array([c for _, c in chunk], np.int64))
    return Path(out)


def convert_csv(
    path: Path | str,
    out: Path | str,
    *,
    input_length: int,
    horizon: int = 1,
    stride: int = 1,
    columns: Sequence[str] | None = None,
    targets: Sequence[str] | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    progress: bool = False,
) -> Path:
    """A CSV time series (one row per time step, a header line) as sliding windows.

    The rows are split by time: the first part trains, the next validates, the last tests;
    windows never straddle two parts. An input is `columns` over `input_length` steps,
    stored [F, input_length]; its target is `targets` over the next `horizon` steps,
    flattened step-major to [horizon * T].
    """
    path = Path(path)
    if min(input_length, horizon, stride) < 1:
        raise UsageError("--input_length, --horizon and --stride must be at least 1")
    try:
        with open(path, newline="") as f:
            reader = csv.reader(f)
            header = next(reader)
            first = next(reader, [])
    except (OSError, StopIteration, csv.Error, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: cannot read a CSV header line ({exc})") from None
    if columns is None:
        columns = [name for name, value in zip(header, first) if _is_number(value)]
    targets = list(targets or columns)
    unknown = [c for c in dict.fromkeys([*columns, *targets]) if c not in header]
    if unknown or not columns:
        raise UsageError(f"{path}: no column(s) {unknown or 'with numbers'}; the header has {header}")
    used = list(dict.fromkeys([*columns, *targets]))
    try:
        series = np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2, usecols=[header.index(c) for c in used])
    except ValueError as exc:
        raise UsageError(f"{path}: {_bad_cell(path, used, header) or exc}") from None
    bad = ~np.isfinite(series)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise UsageError(f"{path}: column {used[c]!r} has a missing or non-finite value on line {r + 2}")
    t = len(series)
    n_test, n_val = _count(t, test_fraction, "--test_fraction"), _count(t, val_fraction, "--val_fraction")
    bounds = {"train": (0, t - n_val - n_test), "val": (t - n_val - n_test, t - n_test), "test": (t - n_test, t)}
    window = input_length + horizon
    xi, yi = [used.index(c) for c in columns], [used.index(c) for c in targets]
    parts = {}
    for split, (a, b) in bounds.items():
        if b - a < window:
            raise UsageError(
                f"{path}: the {split} part has {b - a} time steps, fewer than input length "
                f"+ horizon = {window}; use a longer series, other fractions or a shorter window"
            )
        w = np.lib.stride_tricks.sliding_window_view(series[a:b], window, axis=0)[::stride]
        x = np.ascontiguousarray(w[:, xi, :input_length], np.float32)
        y = np.ascontiguousarray(np.swapaxes(w[:, yi, input_length:], 1, 2), np.float32).reshape(len(w), -1)
        parts[split] = (x, y, np.arange(len(w)))
    return write_arrays(
        out, parts, task="regression", num_classes=horizon * len(targets), source=str(path), progress=progress
    )


def _bad_cell(path: Path, used: list[str], header: list[str]) -> str | None:
    """Where numpy's fast parser gave up, as line and column name (read again, slowly, only then)."""
    with open(path, newline="") as f:
        for line, row in enumerate(csv.reader(f), 1):
            if line == 1:
                continue
            for name in used:
                i = header.index(name)
                value = row[i] if i < len(row) else ""
                if not _is_number(value):
                    return f"line {line}, column {name!r}: {value!r} is not a number"
    return None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _write_fixed_split(
    out: Path | str, x: np.ndarray, y: np.ndarray, counts: Mapping[str, int], seed: int, **attrs: Any
) -> Path:
    """A bundled set split by a fixed seeded permutation (`split_indices`), so every copy is the same file."""
    parts = split_indices(len(y), counts["val"], counts["test"], seed)
    return write_arrays(out, {s: (x, y, rows) for s, rows in parts.items()}, **attrs)


def convert_digits(out: Path | str, progress: bool = False) -> Path:
    """scikit-learn's bundled digits (1797 8x8 images, values 0..16) as [N, 1, 8, 8] float32,
    split by a fixed seeded permutation into 1257 train / 180 val / 360 test."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return _write_fixed_split(
        out,
        digits.data.astype(np.float32).reshape(-1, 1, 8, 8),
        digits.target.astype(np.int64),
        DIGITS_COUNTS,
        DIGITS_SEED,
        task="classification",
        num_classes=10,
        source="sklearn.datasets.load_digits",
        class_names=[str(c) for c in digits.target_names],
        progress=progress,
    )


def diabetes_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled diabetes regression set, unscaled: x [442, 10], y [442, 1] float32
    (disease progression after one year), so the statistics come from the training split only."""
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True, scaled=False)
    return x.astype(np.float32), y.astype(np.float32).reshape(-1, 1)


def convert_diabetes(out: Path | str, progress: bool = False) -> Path:
    """scikit-learn's bundled diabetes regression set (442 patients, 10 features, 1 target),
    split by a fixed seeded permutation into 266 train / 88 val / 88 test."""
    x, y = diabetes_arrays()
    return _write_fixed_split(
        out,
        x,
        y,
        DIABETES_COUNTS,
        DIABETES_SEED,
        task="regression",
        num_classes=1,
        source="sklearn.datasets.load_diabetes",
        progress=progress,
    )


def cache_dir() -> Path:
    """$HPCBNN_CACHE/data, by default ~/.cache/hpcbnn/data (the same root scripts/setup-env.sh uses)."""
    return native.cache_root() / "data"


def _is_current(path: Path) -> bool:
    try:
        with open_h5(path) as f:
            return int(f.attrs.get("schema_version", -1)) == SCHEMA_VERSION
    except OSError:
        return False


def convert_digits_rotated(out: Path | str, progress: bool = False) -> Path:
    """The digits file with every image rotated by 90 degrees (labels: the source digits'), the
    default out-of-distribution set of the bundled data: a structural corruption that keeps
    each image's pixel values, so its intensity statistics are the digits' own and only the
    shape tells it apart."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = np.ascontiguousarray(np.rot90(digits.data.astype(np.float32).reshape(-1, 1, 8, 8), 1, axes=(2, 3)))
    parts = split_indices(len(x), DIGITS_COUNTS["val"], DIGITS_COUNTS["test"], DIGITS_SEED)
    return write_arrays(
        out,
        {s: (x, digits.target.astype(np.int64), rows) for s, rows in parts.items()},
        task="classification",
        num_classes=10,
        source="sklearn.datasets.load_digits rotated by 90 degrees",
        progress=progress,
    )


def default_ood_dataset() -> Path:
    """Where `default_dataset` puts the rotated digits (`convert_digits_rotated`)."""
    return cache_dir() / "digits-rotated.h5"


def default_dataset(comm=None) -> Path:
    """The built-in digits file (and its rotated copy, the default OOD set), converted on
    first use into the cache directory.

    With `comm`, one rank per node writes it (the cache may be node-local; on a shared file
    system concurrent writers are safe as each renames its own complete file into place)
    and every rank of `comm` gets the same result, or the same error.
    """
    path = cache_dir() / "digits.h5"
    node = None
    if comm is not None:
        from mpi4py import MPI

        node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    error = None
    if node is None or node.Get_rank() == 0:
        try:
            if not _is_current(path):
                convert_digits(path)
            if not _is_current(default_ood_dataset()):
                convert_digits_rotated(default_ood_dataset())
        except (UsageError, OSError) as exc:
            error = (
                f"cannot create the default data set in {path.parent} ({exc}); set HPCBNN_CACHE to a writable directory"
            )
    if node is not None:
        node.Free()
    if comm is not None:
        error = next((e for e in comm.allgather(error) if e), None)
    if error:
        raise UsageError(error)
    return path
