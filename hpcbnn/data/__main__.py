"""python -m hpcbnn.data: convert data sets into hpcbnn's HDF5 layout, or check one."""

from __future__ import annotations

import argparse
import inspect
from collections.abc import Callable
from pathlib import Path

from hpcbnn.data import convert
from hpcbnn.data.format import SPLITS, open_dataset
from hpcbnn.errors import entry_point

EPILOG = """The layout, the loader's semantics and file locking are described in docs/data-format.md.
Nothing is downloaded: every converter reads files already on disk."""


def _flag(name: str) -> list[str]:
    """--some_option, also spelled --some-option."""
    return [f"--{name}", f"--{name.replace('_', '-')}"] if "_" in name else [f"--{name}"]


def _command(sub: argparse._SubParsersAction, name: str, fn: Callable, help: str) -> argparse.ArgumentParser:
    """A subcommand whose --help shows its converter's docstring."""
    return sub.add_parser(
        name,
        help=help,
        description=inspect.cleandoc(fn.__doc__ or help),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _splits(p: argparse.ArgumentParser, test: float | None = 0.1) -> None:
    p.add_argument(
        *_flag("val_fraction"),
        type=float,
        default=0.1,
        metavar="F",
        help="share of the training examples held out for validation (default 0.1)",
    )
    if test is not None:
        p.add_argument(
            *_flag("test_fraction"),
            type=float,
            default=test,
            metavar="F",
            help=f"share held out for testing when the source has no test split (default {test})",
        )
    p.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the random split (default 0)")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="python -m hpcbnn.data",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    top.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for name, fn, what in (
        ("digits", convert.convert_digits, "scikit-learn's bundled digits (the default data set)"),
        ("diabetes", convert.convert_diabetes, "scikit-learn's bundled diabetes regression set"),
    ):
        p = _command(sub, name, fn, what)
        p.add_argument(
            "out",
            type=Path,
            nargs="?",
            default=convert.cache_dir() / f"{name}.h5",
            help="output file (default: %(default)s)",
        )

    for name, inputs, what in (
        ("npz", ["IN.npz"], "a NumPy .npz with x, y or x_train, y_train [, x_val, y_val, x_test, y_test]"),
        ("npy", ["X.npy", "Y.npy"], "inputs and targets as two NumPy .npy files"),
    ):
        p = _command(sub, name, convert.convert_npz if name == "npz" else convert.convert_npy, what)
        for arg in inputs:
            p.add_argument(arg.split(".")[0].lower() + "_path", metavar=arg, type=Path)
        p.add_argument("out", type=Path, metavar="OUT.h5")
        p.add_argument(
            "--task",
            choices=["auto", "classification", "regression"],
            default="auto",
            help="auto: integer labels [N] are classification, anything else regression",
        )
        p.add_argument(*_flag("num_classes"), type=int, metavar="K", help="classes (default: largest label + 1)")
        p.add_argument(
            *_flag("channels_last"), action="store_true", help="images are [N, H, W, C]; store them channels first"
        )
        _splits(p)

    p = _command(sub, "cifar", convert.convert_cifar, "CIFAR-10 / CIFAR-100 python batches (cifar-10-batches-py/ etc.)")
    p.add_argument("directory", type=Path, metavar="DIR")
    p.add_argument("out", type=Path, metavar="OUT.h5")
    p.add_argument("--coarse", action="store_true", help="CIFAR-100: the 20 coarse labels")
    _splits(p, test=None)

    p = _command(sub, "mnist", convert.convert_mnist, "MNIST / Fashion-MNIST raw IDX files, optionally gzipped")
    p.add_argument("directory", type=Path, metavar="DIR")
    p.add_argument("out", type=Path, metavar="OUT.h5")
    _splits(p, test=None)

    p = _command(
        sub,
        "imagefolder",
        convert.convert_imagefolder,
        "an ImageFolder tree DIR/class/img.png, or DIR/{train,val,test}/class/...",
    )
    p.add_argument("directory", type=Path, metavar="DIR")
    p.add_argument("out", type=Path, metavar="OUT.h5")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="resize every image to H x W")
    p.add_argument("--grayscale", action="store_true", help="one channel instead of RGB")
    _splits(p)

    p = _command(sub, "csv", convert.convert_csv, "a CSV time series as sliding windows, split by time")
    p.add_argument("csv_path", type=Path, metavar="IN.csv")
    p.add_argument("out", type=Path, metavar="OUT.h5")
    p.add_argument(*_flag("input_length"), type=int, required=True, metavar="L", help="time steps per input window")
    p.add_argument("--horizon", type=int, default=1, metavar="H", help="future time steps to predict (default 1)")
    p.add_argument("--stride", type=int, default=1, metavar="S", help="time steps between window starts (default 1)")
    p.add_argument(
        "--columns", "--column", nargs="+", metavar="COLUMN", help="input columns (default: all numeric ones)"
    )
    p.add_argument("--targets", "--target", nargs="+", metavar="COLUMN", help="predicted columns (default: the inputs)")
    p.add_argument(
        *_flag("val_fraction"),
        type=float,
        default=0.1,
        metavar="F",
        help="share of time for validation, after the training part (default 0.1)",
    )
    p.add_argument(
        *_flag("test_fraction"),
        type=float,
        default=0.2,
        metavar="F",
        help="final share of time for testing (default 0.2)",
    )

    p = sub.add_parser("info", help="validate a file (every value) and describe it")
    p.add_argument("path", type=Path, metavar="FILE.h5")
    return top


def describe(path: Path, verify: bool) -> str:
    infos = [open_dataset(path, s, verify=verify) for s in SPLITS]
    i = infos[0]
    outputs = f"{i.num_classes} classes" if i.task == "classification" else f"{i.num_classes} targets"
    counts = ", ".join(f"{s} {info.n}" for s, info in zip(SPLITS, infos))
    return (
        f"{path}: {i.task}, {outputs}, inputs {list(i.input_shape)} {i.x_dtype}; {counts}; "
        f"mean {i.mean.round(4).tolist()}, std {i.std.round(4).tolist()}"
    )


@entry_point("hpcbnn.data")
def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    progress = not args.quiet
    fractions = {k: getattr(args, k) for k in ("val_fraction", "test_fraction", "seed") if hasattr(args, k)}
    if args.command == "info":
        print(describe(args.path, verify=True))
        return
    if args.command in ("digits", "diabetes"):
        out = getattr(convert, f"convert_{args.command}")(args.out, progress=progress)
    elif args.command in ("npz", "npy"):
        inputs = [args.in_path] if args.command == "npz" else [args.x_path, args.y_path]
        fn: Callable[..., Path] = convert.convert_npz if args.command == "npz" else convert.convert_npy
        out = fn(
            *inputs,
            args.out,
            task=args.task,
            num_classes=args.num_classes,
            channels_last=args.channels_last,
            progress=progress,
            **fractions,
        )
    elif args.command == "cifar":
        out = convert.convert_cifar(args.directory, args.out, coarse=args.coarse, progress=progress, **fractions)
    elif args.command == "mnist":
        out = convert.convert_mnist(args.directory, args.out, progress=progress, **fractions)
    elif args.command == "imagefolder":
        out = convert.convert_imagefolder(
            args.directory,
            args.out,
            size=args.size and tuple(args.size),
            grayscale=args.grayscale,
            progress=progress,
            **fractions,
        )
    else:
        out = convert.convert_csv(
            args.csv_path,
            args.out,
            input_length=args.input_length,
            horizon=args.horizon,
            stride=args.stride,
            columns=args.columns,
            targets=args.targets,
            progress=progress,
            **fractions,
        )
    print(describe(out, verify=False))


if __name__ == "__main__":
    main()
