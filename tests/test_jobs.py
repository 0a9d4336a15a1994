"""The job scripts: shell syntax and directives, then real SLURM jobs on a one-node cluster.

The cluster tests submit jobs/slurm/train.sbatch unchanged through `sbatch`, overriding
only the resources a 2-core machine has, and check what a user would: the job's final
state and exit code, the run directory, the CPU binding the launcher reports, and that a
SIGUSR1 (what `--signal` sends before the time limit) ends in a checkpoint, a requeue and
a resumed run that finishes.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.mpi import run_mpi
from tests.slurm_cluster import ClusterError, Job, SlurmCluster
from tests.test_train import numbers

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "jobs" / "slurm" / "train.sbatch"
PBS = ROOT / "jobs" / "pbs" / "train.pbs"
SCRIPTS = sorted((ROOT / "jobs").glob("slurm/*.sbatch")) + sorted((ROOT / "jobs").glob("pbs/*.pbs"))
TINY = ["--model", "mlp", "--epochs", "1", "--samples", "2", "--batch_size", "32", "--max_steps", "8",
        "--dtype", "float64"]  # float64: every grid ends with the one-process run's metrics, to its rounding
PBS_OPTIONS = set("ACIJMNPSVWXacehjklmopqruvz")


def directives(path: Path, prefix: str) -> list[str]:
    """The directive lines, asserting they form one block right below the #! line: both
    schedulers stop reading directives at the first other line (PBS even at a comment)."""
    lines = path.read_text().splitlines()
    assert lines[0].startswith("#!"), f"{path.name}: no #! line"
    block = []
    for line in lines[1:]:
        if not line.startswith(prefix + " "):
            break
        block.append(line[len(prefix) + 1:])
    later = [line for line in lines[len(block) + 1:] if line.lstrip().startswith(prefix)]
    assert not later, f"{path.name}: directives after the first other line are ignored: {later}"
    assert block, f"{path.name}: no {prefix} directives"
    return block


def seconds(hms: str) -> int:
    h, m, s = (int(x) for x in hms.split(":"))
    return h * 3600 + m * 60 + s


def bound_cpus(text: str) -> list[str]:
    """The CPUs each rank was pinned to, from srun --cpu-bind=verbose or mpirun --report-bindings."""
    return (re.findall(r"cpu-bind=MASK - \S+, task +\d+ +\d+ \[\d+\]: mask (0x[0-9a-f]+) set", text)
            or re.findall(r"MCW rank \d+ bound to (.*)", text))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse_with_bash(script: Path) -> None:
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("script", sorted((ROOT / "jobs").glob("slurm/*.sbatch")), ids=lambda p: p.name)
def test_sbatch_directives_are_well_formed(script: Path) -> None:
    options = {}
    for text in directives(script, "#SBATCH"):
        match = re.fullmatch(r"--([a-z][a-z-]*)(?:=(\S+))?", text)
        assert match, f"{script.name}: '#SBATCH {text}' is not --option or --option=value"
        options[match[1]] = match[2]
    assert options["ntasks-per-node"] == options["gpus-per-node"], "one rank per GPU"
    assert re.fullmatch(r"B:USR1@\d+", options["signal"]), "the warning must reach the batch script"
    assert int(options["signal"].split("@")[1]) < seconds(options["time"])
    assert "requeue" in options and "%j" in options["output"]


@pytest.mark.parametrize("script", sorted((ROOT / "jobs").glob("pbs/*.pbs")), ids=lambda p: p.name)
def test_pbs_directives_are_well_formed(script: Path) -> None:
    resources: dict[str, str] = {}
    flags: dict[str, str] = {}
    for text in directives(script, "#PBS"):
        match = re.fullmatch(r"-([A-Za-z])(?: (\S+))?", text)
        assert match and match[1] in PBS_OPTIONS, f"{script.name}: '#PBS {text}' is not a qsub option"
        if match[1] == "l":
            key, _, value = match[2].partition("=")
            resources[key] = value
        else:
            flags[match[1]] = match[2]
    assert re.fullmatch(r"[A-Za-z][\w.-]{0,235}", flags["N"])
    assert flags["j"] == "oe" and flags["r"] == "y"
    assert re.fullmatch(r"(free|pack|scatter|vscatter)(:(excl|shared|exclhost))?", resources["place"])
    seconds(resources["walltime"])
    count, *chunk = resources["select"].split(":")
    spec = dict(item.split("=") for item in chunk)
    assert int(count) >= 1 and all(v.isdigit() for v in spec.values()), resources["select"]
    assert spec["mpiprocs"] == spec["ngpus"], "one rank per GPU"
    assert int(spec["ncpus"]) == int(spec["mpiprocs"]) * int(spec["ompthreads"])


def pbs_job(tmp_path: Path, ranks: int, **settings: str) -> dict[str, str]:
    """What pbs_mom gives a job (job id, a node file with one line per rank, the submission
    directory, ompthreads), since no PBS server installs here, plus the script's settings."""
    (tmp_path / "nodefile").write_text("localhost\n" * ranks)
    return {**os.environ, "PBS_JOBID": "4242.pbs-server", "PBS_JOBNAME": "hpcbnn",
            "PBS_O_WORKDIR": str(tmp_path), "PBS_NODEFILE": str(tmp_path / "nodefile"),
            "OMP_NUM_THREADS": "1", "PYTHON": sys.executable,
            "MPIEXEC_FLAGS": "--allow-run-as-root" if os.geteuid() == 0 else "", **settings}


def stub(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)
    return path


def qsub_stub(bin_dir: Path, calls: Path) -> None:
    """qsub: records its arguments (one per line) and answers with the next job id."""
    stub(bin_dir / "qsub", f'printf "%s\\n" "$@" > {calls}\necho 4243.pbs-server\n')


def apptainer_stub(bin_dir: Path, env_dir: Path) -> Path:
    """`apptainer exec` for a machine without Apptainer, doing what --cleanenv does: the
    command sees only APPTAINERENV_X (as X) and the image's %environment. It refuses a call
    without --cleanenv and writes each rank's environment to env_dir."""
    python = stub(bin_dir / "image" / "python3", f'exec {sys.executable} "$@"\n')
    env_dir.mkdir()
    return stub(bin_dir / "apptainer", f"""set -eu
[ "$1" = exec ] || {{ echo "apptainer stub: only exec" >&2; exit 64; }}
shift; clean=0
while [ $# -gt 0 ]; do
  case $1 in --cleanenv) clean=1; shift ;; --nv) shift ;; --bind) shift 2 ;; -*) echo "unknown $1" >&2; exit 64 ;; *) break ;; esac
done
[ "$clean" = 1 ] || {{ echo "apptainer stub: called without --cleanenv" >&2; exit 64; }}
[ -f "$1" ] || {{ echo "apptainer stub: no image $1" >&2; exit 64; }}
shift
vars=(HOME="$HOME" PATH={python.parent}:/usr/bin:/bin HDF5_USE_FILE_LOCKING=FALSE PYTHONUNBUFFERED=1)
for v in $(compgen -e); do case $v in APPTAINERENV_*) vars+=("${{v#APPTAINERENV_}}=${{!v}}") ;; esac; done
env -i "${{vars[@]}}" env > {env_dir}/rank-$$.env
exec env -i "${{vars[@]}}" "$@"
""")


@pytest.mark.mpi
def test_pbs_walltime_timer_checkpoints_and_resubmits_from_a_clean_image_environment(tmp_path: Path) -> None:
    """The script's own logic with stub qstat and qsub (no PBS server installs here) and a
    stub apptainer, around the real mpiexec, binding and training: qstat's walltime arms the
    timer, its SIGUSR1 reaches the ranks through mpiexec, they checkpoint and exit 75, and
    the script resubmits its copy with the count raised."""
    bin_dir, run = tmp_path / "bin", tmp_path / "runs" / "hpcbnn-4242"
    apptainer = apptainer_stub(bin_dir, tmp_path / "rank-env")
    # qstat -f: once the first epoch is logged (the ranks are past start-up), a walltime whose
    # WARN_SECONDS warning falls two seconds later.
    stub(bin_dir / "qstat", f"""[ "$1 $2" = "-f 4242.pbs-server" ] || exit 1
for _ in $(seq 900); do [ -s {run}/metrics.jsonl ] && break; sleep 0.2; done
walltime=$((SECONDS + 2 + WARN_SECONDS))
printf 'Job Id: 4242.pbs-server\n    Resource_List.walltime = %02d:%02d:%02d\n' \
  $((walltime / 3600)) $((walltime % 3600 / 60)) $((walltime % 60))
""")
    qsub_stub(bin_dir, tmp_path / "qsub.args")
    (tmp_path / "hpcbnn.sif").write_bytes(b"")
    for name in ("2", "3", "16"):  # what an unquoted [32] or '[16, 8]' would glob to
        (tmp_path / name).touch()
    args = "--model mlp --epochs 200 --samples 2 --batch_size 32 --hidden '[16, 8]'"
    env = pbs_job(tmp_path, 2, MODE="data", BACKEND="torch", TRAIN_ARGS=args, WARN_SECONDS="600",
                  IMAGE=str(tmp_path / "hpcbnn.sif"), APPTAINER=str(apptainer), HOST_ONLY="leaks",
                  PATH=f"{bin_dir}:{os.environ['PATH']}")
    proc = subprocess.run(["bash", str(PBS)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 75, text
    assert "walltime near, asking the ranks to checkpoint" in text and "exiting with 75" in text, text
    assert "resubmitted as job 4243.pbs-server" in text, text
    assert (tmp_path / "qsub.args").read_text().splitlines() == [
        "-V", "-v", f"RUN_DIR={run},RESUBMIT_COUNT=1", str(run / "job.pbs")]
    assert (run / "job.pbs").read_text() == PBS.read_text()
    assert list((run / "checkpoints").glob("step-*.pt")) and not (run / "summary.json").exists()
    assert yaml.safe_load((run / "config.yaml").read_text())["hidden"] == [16, 8]
    envs = [dict(line.split("=", 1) for line in f.read_text().splitlines() if "=" in line)
            for f in sorted((tmp_path / "rank-env").glob("*.env"))]
    assert len(envs) == 2, "one container per rank"
    assert sorted(e["OMPI_COMM_WORLD_RANK"] for e in envs) == ["0", "1"], "the launcher's wiring got in"
    for e in envs:
        assert (e["MASTER_ADDR"], e["MASTER_PORT"], e["OMP_NUM_THREADS"]) == ("localhost", "24242", "1")
        assert "HOST_ONLY" not in e and "PBS_JOBID" not in e, "--cleanenv let the host environment in"
    cpus = bound_cpus(text)
    assert len(cpus) == 2 and len(set(cpus)) == 2, f"ranks not pinned to distinct cores: {cpus}"


@pytest.mark.mpi
@pytest.mark.parametrize("count, resubmitted", [(0, True), (3, False)])
def test_pbs_resubmits_on_exit_75_until_max_resubmits(tmp_path: Path, count: int, resubmitted: bool) -> None:
    """Ranks that exit 75 (checkpointed, as on SIGUSR1): resubmission with the count raised,
    until RESUBMIT_COUNT reaches MAX_RESUBMITS. qstat fails, as on a site that hides it."""
    bin_dir = tmp_path / "bin"
    qsub_stub(bin_dir, tmp_path / "qsub.args")
    stub(bin_dir / "qstat", "exit 1\n")
    ranks = stub(tmp_path / "checkpointed", "exit 75\n")
    env = pbs_job(tmp_path, 2, PYTHON=str(ranks), RESUBMIT_COUNT=str(count), MAX_RESUBMITS="3",
                  PATH=f"{bin_dir}:{os.environ['PATH']}")
    proc = subprocess.run(["bash", str(PBS)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 75, text
    run = tmp_path / "runs" / "hpcbnn-4242"
    if resubmitted:
        assert (tmp_path / "qsub.args").read_text().splitlines()[2] == f"RUN_DIR={run},RESUBMIT_COUNT=1"
    else:
        assert not (tmp_path / "qsub.args").exists(), "resubmitted past MAX_RESUBMITS"
        assert "already resubmitted 3 times (MAX_RESUBMITS)" in text


def test_pbs_refuses_unbalanced_quotes_in_train_args(tmp_path: Path) -> None:
    env = pbs_job(tmp_path, 1, TRAIN_ARGS="--hidden '[16, 8]")
    proc = subprocess.run(["bash", str(PBS)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "TRAIN_ARGS=--hidden '[16, 8]: unbalanced quotes" in proc.stderr, proc.stderr


# --- a real SLURM cluster ------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    if os.geteuid() != 0:
        pytest.skip("the one-node SLURM cluster needs root (slurmd, and apt-get for slurm-wlm and munge)")
    install = subprocess.run(["bash", str(ROOT / "scripts" / "install-slurm.sh")],
                             capture_output=True, text=True, timeout=900)
    if install.returncode:
        pytest.skip(f"SLURM could not be installed: {install.stderr.strip().splitlines()[-1:]}")
    with SlurmCluster(tmp_path_factory.mktemp("slurm")) as running:
        yield running


def submit(cluster: SlurmCluster, workdir: Path, ranks: int, args: list[str], **settings: str) -> int:
    """sbatch the unchanged script with this machine's resources and the given settings."""
    workdir.mkdir(exist_ok=True)
    flags = "--allow-run-as-root --oversubscribe" if os.geteuid() == 0 else "--oversubscribe"
    env = {"PYTHON": sys.executable, "MPIRUN_FLAGS": flags, **settings}
    options = ["--nodes=1", f"--ntasks-per-node={ranks}", "--cpus-per-task=1", "--time=15"]
    return cluster.submit(SBATCH, args, options, env=env, cwd=workdir)


def log(workdir: Path, job: int) -> str:
    return (workdir / f"hpcbnn-{job}.out").read_text(errors="replace")


def finished(cluster: SlurmCluster, workdir: Path, job_id: int, timeout: float = 180) -> Job:
    job = cluster.wait(job_id, timeout)
    print(log(workdir, job_id))
    return job


@pytest.mark.slurm
def test_sbatch_accepts_the_directives(cluster: SlurmCluster, tmp_path: Path) -> None:
    """slurmctld validates every directive of the script; only the size is made to fit."""
    proc = subprocess.run(["sbatch", "--test-only", "--nodes=1", "--cpus-per-task=1", str(SBATCH)],
                          capture_output=True, text=True, env=cluster.env, cwd=tmp_path, timeout=30)
    assert proc.returncode == 0 and "to start at" in proc.stderr, proc.stderr


MODES = {
    "sample": dict(ranks=2, settings=dict(MODE="sample", LAUNCHER="srun", BACKEND="horovod")),
    "data": dict(ranks=2, settings=dict(MODE="data", LAUNCHER="mpirun", BACKEND="torch")),
    "hybrid": dict(ranks=4, settings=dict(MODE="hybrid", LAUNCHER="srun", BACKEND="horovod",
                                          SAMPLE_GROUP="2", CPU_BIND="none")),
}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory) -> dict[str, float]:
    """The test metrics every job must reproduce: the same run as one process under mpirun."""
    run = tmp_path_factory.mktemp("one-process") / "run"
    result = run_mpi(1, ["-m", "hpcbnn.train", "--run_dir", str(run), *TINY], timeout=300)
    assert result.returncode == 0, result.output
    return numbers(json.loads((run / "summary.json").read_text())["test"])


@pytest.mark.slurm
@pytest.mark.parametrize("mode", MODES)
def test_train_job_completes(cluster: SlurmCluster, one_process: dict[str, float], tmp_path: Path,
                             mode: str) -> None:
    """Each mode's job, through sbatch and its launcher, ends with the one-process run's test
    metrics. The sample job runs in an image (a stub apptainer that keeps what --cleanenv keeps),
    so srun's per-rank wiring must reach it through PASS_ENV."""
    ranks, settings = MODES[mode]["ranks"], dict(MODES[mode]["settings"])
    if mode == "sample":
        (tmp_path / "hpcbnn.sif").write_bytes(b"")
        apptainer = apptainer_stub(tmp_path / "bin", tmp_path / "rank-env")
        settings.update(IMAGE=str(tmp_path / "hpcbnn.sif"), APPTAINER=str(apptainer), HOST_ONLY="leaks")
    job_id = submit(cluster, tmp_path, ranks, TINY, **settings)
    job = finished(cluster, tmp_path, job_id)
    assert (job.state, job.exit_code) == ("COMPLETED", 0), log(tmp_path, job_id)

    run = tmp_path / "runs" / f"hpcbnn-{job_id}"
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert (config["mode"], config["backend"]) == (mode, settings["BACKEND"])
    assert config["sample_group"] == (int(settings["SAMPLE_GROUP"]) if "SAMPLE_GROUP" in settings else None)
    epochs = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1]
    test = numbers(json.loads((run / "summary.json").read_text())["test"])
    assert test.keys() == one_process.keys() and {"accuracy", "nll", "ece"} <= test.keys()
    for key, want in one_process.items():
        assert math.isclose(test[key], want, rel_tol=1e-9, abs_tol=1e-12), f"{key}: {test[key]!r} here, {want!r} on one"
    if mode == "sample":
        envs = [dict(line.split("=", 1) for line in f.read_text().splitlines() if "=" in line)
                for f in sorted((tmp_path / "rank-env").glob("*.env"))]
        assert sorted(e["SLURM_PROCID"] for e in envs) == ["0", "1"] and all("PMIX_RANK" in e for e in envs)
        assert not any("HOST_ONLY" in e for e in envs), "--cleanenv let the host environment in"
    assert list((run / "checkpoints").glob("step-*.pt"))
    text = log(tmp_path, job_id)
    assert f"{ranks} ranks" in text and "hpcbnn.train: done" in text
    if settings.get("CPU_BIND", "core") == "core":
        cpus = bound_cpus(text)
        assert len(cpus) == ranks and len(set(cpus)) == ranks, f"ranks not pinned to distinct cores: {cpus}"


@pytest.mark.slurm
def test_time_limit_warning_checkpoints_requeues_and_resumes(cluster: SlurmCluster, tmp_path: Path) -> None:
    """The SIGUSR1 that `--signal=B:USR1@600` sends, delivered now: exit 75, requeue, resume."""
    epochs = 8
    args = ["--model", "mlp", "--epochs", str(epochs), "--samples", "2", "--batch_size", "32"]
    job_id = submit(cluster, tmp_path, 2, args, MODE="sample", LAUNCHER="srun", BACKEND="torch")
    metrics = tmp_path / "runs" / f"hpcbnn-{job_id}" / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while not (metrics.exists() and metrics.read_text().strip()):
        if time.monotonic() > deadline or cluster.job(job_id)["JobState"] not in ("PENDING", "RUNNING"):
            raise ClusterError(f"job {job_id} never finished its first epoch:\n{log(tmp_path, job_id)}")
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", "--batch", str(job_id)], env=cluster.env, check=True, timeout=30)

    job = finished(cluster, tmp_path, job_id, timeout=240)
    text = log(tmp_path, job_id)
    assert (job.state, job.exit_code, job.restarts) == ("COMPLETED", 0, 1), text
    assert "exiting with 75" in text and f"requeueing job {job_id}" in text
    assert "(restart 1)" in text
    logged = [json.loads(line)["epoch"] for line in metrics.read_text().splitlines()]
    assert logged == list(range(1, epochs + 1)), f"the requeued run did not resume: epochs {logged}"


@pytest.mark.slurm
@pytest.mark.parametrize("settings, message", [
    (dict(MODE="bogus"), "MODE=bogus: choose sample, data or hybrid"),
    (dict(MODE="data", IMAGE="/nonexistent/hpcbnn-gpu.sif"), "IMAGE=/nonexistent/hpcbnn-gpu.sif does not exist"),
], ids=["mode", "image"])
def test_a_bad_setting_ends_the_job_with_exit_2(cluster: SlurmCluster, tmp_path: Path,
                                               settings: dict[str, str], message: str) -> None:
    job_id = submit(cluster, tmp_path, 2, TINY, **settings)
    job = finished(cluster, tmp_path, job_id)
    assert (job.state, job.exit_code) == ("FAILED", 2)
    assert message in log(tmp_path, job_id)
