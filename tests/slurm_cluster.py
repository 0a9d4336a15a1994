"""A real one-node SLURM cluster on localhost, for testing the job scripts.

Starts munged, slurmctld and slurmd from Debian's packages with every file (key, socket,
state, spool, logs, slurm.conf) under one temporary directory and on free ports, so it
never touches a system installation. The node advertises more CPUs and GPUs than the
machine has (`config_overrides`; the GPUs are character devices like /dev/null): the
scheduler then accepts the job scripts' GPU requests unchanged and sets
CUDA_VISIBLE_DEVICES as on a GPU node, and the ranks, finding no CUDA device, train on the
CPU. There is no accounting database: finished jobs are read with `scontrol show job`.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

SBIN = ("/usr/sbin", "/sbin")
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


class ClusterError(RuntimeError):
    """The cluster did not come up or a job did not finish; the message quotes the logs."""


@dataclass(frozen=True)
class Job:
    """A job as `scontrol show job` reports it once it has finished."""

    id: int
    state: str
    exit_code: int
    restarts: int
    fields: dict[str, str]


def which(name: str) -> str | None:
    return shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), *SBIN]))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    """munged + slurmctld + slurmd for one node; use as a context manager."""

    def __init__(self, workdir: Path, cpus: int = 4, gpus: int = 4) -> None:
        self.dir = Path(workdir)
        self.node = socket.gethostname().split(".")[0]
        self.cpus = cpus
        self.gpus = gpus
        self.conf = self.dir / "slurm.conf"
        self.munge_socket = self.dir / "munge.socket"
        self.daemons: list[subprocess.Popen] = []

    @property
    def env(self) -> dict[str, str]:
        """The environment under which SLURM commands talk to this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def __enter__(self) -> SlurmCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 60) -> None:
        for sub in ("state", "spool", "log"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        key = self.dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self._daemon([which("munged"), "--foreground", "--force", f"--key-file={key}",
                      f"--socket={self.munge_socket}", f"--pid-file={self.dir / 'munged.pid'}",
                      f"--seed-file={self.dir / 'munged.seed'}",
                      f"--log-file={self.dir / 'log' / 'munged.log'}"], "munged")
        self._wait(lambda: self.munge_socket.exists(), timeout, "munged did not create its socket")
        self._write_config()
        self._daemon([which("slurmctld"), "-D", "-f", str(self.conf)], "slurmctld")
        self._wait(lambda: self._ok(["scontrol", "ping"]), timeout, "slurmctld does not answer")
        self._daemon([which("slurmd"), "-D", "-f", str(self.conf), "-N", self.node], "slurmd")
        self._wait(self._node_ready, timeout, "slurmd did not register its node as idle")

    def stop(self) -> None:
        """Cancel this cluster's jobs, then stop the daemons this object started, newest
        first; SIGKILL what lingers."""
        if any(p.poll() is None for p in self.daemons) and self._ok(["scontrol", "ping"]):
            subprocess.run(["scancel", "--user", getpass.getuser()], env=self.env, timeout=30)
            with contextlib.suppress(ClusterError):
                self._wait(lambda: not self._run(["squeue", "--noheader"]).strip(), 30, "jobs did not end")
        for proc in reversed(self.daemons):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.daemons):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.daemons.clear()

    def submit(self, script: Path | str, args: list[str] | None = None,
               options: list[str] | None = None, env: dict[str, str] | None = None,
               cwd: Path | str | None = None) -> int:
        """`sbatch [options] script [args]` from `cwd`; returns the job id."""
        proc = subprocess.run(["sbatch", "--parsable", *(options or []), str(script), *(args or [])],
                              capture_output=True, text=True, timeout=30, cwd=cwd,
                              env={**self.env, **(env or {})})
        if proc.returncode:
            raise ClusterError(f"sbatch failed ({proc.returncode}): {proc.stderr.strip()}")
        return int(proc.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        out = self._run(["scontrol", "show", "job", "--oneliner", str(job_id)])
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job_id: int, timeout: float = 180) -> Job:
        """Wait until the job reaches a final state; a job still running at `timeout` is cancelled."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            fields = self.job(job_id)
            if fields.get("JobState") in FINAL_STATES:
                code, _, sig = fields.get("ExitCode", "0:0").partition(":")
                return Job(job_id, fields["JobState"], int(code) or int(sig or 0),
                           int(fields.get("Restarts", 0)), fields)
            time.sleep(1)
        subprocess.run(["scancel", str(job_id)], env=self.env, timeout=30)
        raise ClusterError(f"job {job_id} did not finish within {timeout:.0f} s "
                           f"(state {self.job(job_id).get('JobState')}); {self.logs()}")

    def logs(self, lines: int = 15) -> str:
        """The tails of the daemon logs, for failure messages."""
        parts = []
        for log in sorted((self.dir / "log").glob("*.log")):
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {log.name} ---\n" + "\n".join(tail))
        return "\n".join(parts)

    def _write_config(self) -> None:
        d, log = self.dir, self.dir / "log"
        self.conf.write_text(f"""\
ClusterName=hpcbnn-test
SlurmctldHost={self.node}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
AuthType=auth/munge
CredType=cred/munge
# cred_expire also delays the restart of a requeued job (default 120 s)
AuthInfo=socket={self.munge_socket},cred_expire=10
StateSaveLocation={d / 'state'}
SlurmdSpoolDir={d / 'spool'}
SlurmctldPidFile={d / 'slurmctld.pid'}
SlurmdPidFile={d / 'slurmd.pid'}
SlurmctldLogFile={log / 'slurmctld.log'}
SlurmdLogFile={log / 'slurmd.log'}
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig={d / 'plugstack.conf'}
ProctrackType=proctrack/pgid
TaskPlugin=task/affinity
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
GresTypes=gpu
ReturnToService=2
# finished jobs stay visible to scontrol for an hour
MinJobAge=3600
KillWait=10
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} Gres=gpu:{self.gpus} RealMemory=4096 State=UNKNOWN
PartitionName=test Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
""")
        devices = d / "dev"
        devices.mkdir(exist_ok=True)
        for i in range(self.gpus):  # character devices like /dev/null: slurmd insists on devices
            gpu = devices / f"gpu{i}"
            if not gpu.exists():
                os.mknod(gpu, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        files = f"{devices}/gpu[0-{self.gpus - 1}]"
        (d / "gres.conf").write_text(f"NodeName={self.node} Name=gpu File={files}\n")
        (d / "plugstack.conf").write_text("")

    def _daemon(self, cmd: list[str | None], name: str) -> None:
        if cmd[0] is None:
            raise ClusterError(f"{name} is not installed (run scripts/install-slurm.sh)")
        out = open(self.dir / "log" / f"{name}.stdout.log", "wb")
        self.daemons.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                             env=self.env, start_new_session=True))
        out.close()

    def _node_ready(self) -> bool:
        return self._ok(["sinfo", "--noheader", "--states=idle", "--format=%N"], expect=self.node)

    def _ok(self, cmd: list[str], expect: str = "") -> bool:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30, env=self.env)
        return proc.returncode == 0 and expect in proc.stdout

    def _run(self, cmd: list[str]) -> str:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30, env=self.env)
        if proc.returncode:
            raise ClusterError(f"{' '.join(cmd)} failed: {proc.stderr.strip()}")
        return proc.stdout

    def _wait(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [p for p in self.daemons if p.poll() is not None]
            if dead:
                raise ClusterError(f"{what}: a daemon exited with {dead[0].returncode}\n{self.logs()}")
            if ready():
                return
            time.sleep(0.5)
        raise ClusterError(f"{what} within {timeout:.0f} s\n{self.logs()}")
