"""C kernels compiled on first use: one library per source, compiler and flags, built once per node.

    lib = native.load(Path("normal.c"), "normal-avx2", ["-O3", "-mavx2"], threading=(["-fopenmp"], []))

The system C compiler ($CC, cc, gcc or clang) builds the source into $HPCBNN_CACHE/kernels
(default ~/.cache/hpcbnn/kernels) under a file lock, so the ranks of a node build it once and a
shared $HOME sees whole files only. `threading` lists flag sets to try in order (OpenMP first,
then none where the compiler has no OpenMP). hpcbnn.bnn.rng and hpcbnn.mcmc.kernel use it.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import os
import shutil
import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path

__all__ = ["CompilerNotFound", "cache_dir", "cache_root", "compiler", "cpu_flags", "load"]


class CompilerNotFound(RuntimeError):
    """No C compiler to build a kernel: the caller may fall back to torch."""


def cache_root() -> Path:
    """hpcbnn's cache: $HPCBNN_CACHE, else $XDG_CACHE_HOME/hpcbnn or ~/.cache/hpcbnn (as scripts/setup-env.sh)."""
    base = os.environ.get("HPCBNN_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hpcbnn"
    return Path(base)


def cache_dir() -> Path:
    """Where the built libraries live: <cache_root>/kernels."""
    return cache_root() / "kernels"


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The instruction-set flags of /proc/cpuinfo (empty where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def compiler() -> str:
    """$CC, else the first of cc, gcc and clang on PATH."""
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return cc
    raise CompilerNotFound(
        "hpcbnn needs a C compiler to build its kernels on first use: install gcc "
        "(Debian/Ubuntu: apt-get install build-essential) or set CC"
    )


def load(source: Path, name: str, flags: Sequence[str], threading: Sequence[Sequence[str]] = ((),)) -> ctypes.CDLL:
    """The library built from `source` with `flags` plus the first `threading` set that compiles."""
    cc = compiler()
    tag = hashlib.sha256(source.read_bytes() + "\0".join([cc, *flags]).encode()).hexdigest()[:16]
    cache = cache_dir()
    path = cache / f"{name}-{tag}.so"
    if not path.exists():
        try:
            cache.mkdir(parents=True, exist_ok=True)
            lock = open(cache / "build.lock", "w")
        except OSError as e:
            raise RuntimeError(
                f"cannot build {source.name} in {cache} ({e}): set HPCBNN_CACHE to a writable directory"
            ) from e
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not path.exists():  # another rank may have built it while we waited
                tmp = path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")  # a shared $HOME
                for extra in threading:
                    proc = subprocess.run(
                        [cc, *flags, *extra, "-o", str(tmp), str(source)], capture_output=True, text=True
                    )
                    if not proc.returncode:
                        break
                if proc.returncode:
                    tmp.unlink(missing_ok=True)
                    raise RuntimeError(f"building {source} with {cc} failed:\n{proc.stderr}")
                os.replace(tmp, path)
    return ctypes.CDLL(str(path))
