"""Run a product command the way a user does: under real mpirun, one thread per rank, output in a log."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def mpirun(ranks: int, bind_to: str = "none") -> list[str]:
    """mpirun for `ranks` processes on this machine: oversubscribed, unbound by default (more ranks
    than cores); `bind_to="core"` pins each rank to its own core, for timings with ranks <= cores."""
    prefix = ["mpirun", "--oversubscribe", "--bind-to", bind_to, "-np", str(ranks)]
    if os.geteuid() == 0:
        prefix.insert(1, "--allow-run-as-root")
    return prefix


def command(args: list[str], ranks: int, log: Path) -> None:
    """Run `python ARGS` (under mpirun for ranks > 1), its output in `log`; fail loudly."""
    prefix = mpirun(ranks) if ranks > 1 else []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "w") as out:
        done = subprocess.run([*prefix, sys.executable, *args], stdout=out, stderr=subprocess.STDOUT, env=env)
    if done.returncode:
        raise SystemExit(f"{' '.join(args[:2])} failed (exit {done.returncode}); see {log}")
