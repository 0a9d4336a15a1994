"""Launch real `mpirun` jobs from tests (Open MPI: oversubscribed 2-core machines, root)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def mpirun_prefix(np: int) -> list[str]:
    cmd = ["mpirun", "--oversubscribe", "--bind-to", "none", "-np", str(np)]
    if os.geteuid() == 0:
        cmd.insert(1, "--allow-run-as-root")
    return cmd


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def run_mpi(np: int, args: list[str], timeout: float = 120, env: dict[str, str] | None = None,
            cwd: Path | str | None = None) -> Result:
    """Run `mpirun -np NP python ARGS...`; a hang fails the test instead of the suite."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                "PYTHONPATH": str(ROOT), **(env or {})}
    start = time.monotonic()
    proc = subprocess.run(mpirun_prefix(np) + [sys.executable, *args], capture_output=True,
                          text=True, timeout=timeout, env=full_env, cwd=cwd or ROOT)
    return Result(proc.returncode, proc.stdout, proc.stderr, time.monotonic() - start)
