"""How fast does a job end after a fault? Each case under real mpirun, 2 ranks, timed from the fault.

    python -m benchmarks.faults [--timeout 5] [--only SUBSTRING]

Cases: a rank stopped with SIGSTOP (a hung node) while its peers enter a collective, for both
backends, rank 0 or rank 1, and rank 0 stopped inside a checkpoint write
(tests/programs/fault_stall.py, with --collective_timeout TIMEOUT); ranks started with different
options (an MPMD launch of hpcbnn.train); a second run on a run directory in use (a first run
holds it); a --pretrained file that is not a state_dict; SIGUSR1 during training and during
validation. The clock starts when the fault is injected (the stopped rank's own "stopping"
line, the signal, or the launch of a run that is refused) and stops when mpirun has exited;
the limit a stall must meet is TIMEOUT plus the roll call (min(3 s, TIMEOUT)) plus the abort.
Prints a table, then one line of JSON: {case: {"exit": code, "seconds": s}}.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MPIRUN = ["mpirun", "--oversubscribe", "--bind-to", "none"] + (["--allow-run-as-root"] if os.geteuid() == 0 else [])
TINY = ["--samples", "4", "--batch_size", "32", "--hidden", "[32]", "--log_every", "1", "--backend", "torch"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}


def timed(cmd: list[str], trigger: str | None = None, act=None) -> tuple[int, float, str]:  # type: ignore[no-untyped-def]
    """Run `cmd`; at the first output line matching `trigger` call `act(proc)` and start the clock
    (at the launch without a trigger). Returns the exit code, the seconds to exit, the output."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, start = [], time.monotonic()
    for line in proc.stdout:  # type: ignore[union-attr]
        lines.append(line)
        if trigger and re.search(trigger, line):
            if act:
                act(proc)
            start, trigger = time.monotonic(), None
    code = proc.wait()
    return code, time.monotonic() - start, "".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--timeout", type=float, default=5.0, help="--collective_timeout of the stall cases")
    parser.add_argument("--only", default="", help="run only the cases whose name contains this")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="hpcbnn-faults-"))
    (tmp / "garbage.pt").write_bytes(b"these are not weights")
    stall = [*MPIRUN, "-np", "2", sys.executable, "tests/programs/fault_stall.py"]
    train = [sys.executable, "-m", "hpcbnn.train", *TINY]
    cases = {
        "SIGSTOP rank 1, torch allreduce": (stall + ["torch", "1", "backend", str(args.timeout)], "stopping", None),
        "SIGSTOP rank 0, Horovod allreduce": (stall + ["horovod", "0", "backend", str(args.timeout)], "stopping", None),
        "SIGSTOP rank 1, MPI loss allreduce (Horovod run)": (
            stall + ["horovod", "1", "loss", str(args.timeout)],
            "stopping",
            None,
        ),
        "SIGSTOP rank 0 inside a checkpoint write (torch)": (
            stall + ["torch", "0", "checkpoint", str(args.timeout), str(tmp / "ckpt")],
            "stopping",
            None,
        ),
        "ranks with different options (MPMD)": (
            [*MPIRUN, "-np", "1", *train, "--run_dir", str(tmp / "mpmd"), ":", "-np", "1", *train, "--samples", "8"],
            None,
            None,
        ),
        "a second run on a directory in use": (
            [*MPIRUN, "-np", "2", *train, "--run_dir", str(tmp / "busy"), "--resume", "true"],
            None,
            None,
        ),
        "--pretrained file that is not a state_dict": (
            [*MPIRUN, "-np", "2", *train, "--run_dir", str(tmp / "pre"), "--pretrained", str(tmp / "garbage.pt")],
            None,
            None,
        ),
        "SIGUSR1 during training": (
            [*MPIRUN, "-np", "2", *train, "--run_dir", str(tmp / "usr1"), "--epochs", "3"],
            r"epoch 1 step 50/",
            lambda p: p.send_signal(signal.SIGUSR1),
        ),
        "SIGUSR1 during validation (--eval_samples 4096)": (
            [*MPIRUN, "-np", "2", *train, "--run_dir", str(tmp / "val"), "--epochs", "1", "--eval_samples", "4096"],
            r"epoch 0 step 39/",
            lambda p: p.send_signal(signal.SIGUSR1),
        ),
    }
    results = {}
    print(f"{'case':52s} {'exit':>4s} {'seconds':>8s}  what rank 0 (or the reporting rank) said")
    holder = None
    for name, (cmd, trigger, act) in cases.items():
        if args.only not in name:
            continue
        if "in use" in name:  # the first run, holding the directory while the second one tries
            first = [*MPIRUN, "-np", "1", *train, "--run_dir", str(tmp / "busy"), "--epochs", "1000"]
            log = open(tmp / "busy.log", "w")  # a file, not a pipe: a pipe left unread blocks the holder
            holder = subprocess.Popen(first, cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT)
            while "step 2/" not in (tmp / "busy.log").read_text():
                time.sleep(0.1)
        code, seconds, output = timed(cmd, trigger, act)
        if holder:
            holder.terminate()  # mpirun forwards it: the run checkpoints and exits 75
            holder.wait()
            holder = None
        said = [line for line in output.splitlines() if re.search(r": (error|stop signal)", line)]
        print(f"{name:52s} {code:4d} {seconds:8.1f}  {said[0][:110] if said else ''}", flush=True)
        results[name] = {"exit": code, "seconds": round(seconds, 2)}
    print(json.dumps(results))


if __name__ == "__main__":
    main()
