"""The Apptainer definitions, without Apptainer: spython parses them, the sections that
matter are there, their shell scriptlets are valid /bin/sh, the files they copy exist, and
the Horovod recipe (C++20 patch, build flags) is the project's."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from spython.main.parse.parsers import SingularityParser
from spython.main.parse.recipe import Recipe

ROOT = Path(__file__).resolve().parents[1]
DEFS = sorted((ROOT / "containers").glob("*.def"))
GPU, CPU = ROOT / "containers" / "hpcbnn-gpu.def", ROOT / "containers" / "hpcbnn-cpu.def"
SCRIPTLETS = ("post", "test", "runscript", "environment")
HOROVOD_FLAGS = ("HOROVOD_WITH_PYTORCH=1", "HOROVOD_WITH_MPI=1", "HOROVOD_WITHOUT_GLOO=1",
                 "HOROVOD_WITHOUT_TENSORFLOW=1", "HOROVOD_WITHOUT_MXNET=1")


def recipe(path: Path) -> Recipe:
    return SingularityParser(str(path)).recipe["spython-base"]


def sections(path: Path) -> dict[str, str]:
    """Raw section bodies by name: spython rewrites %test and %runscript for Docker."""
    parts = re.split(r"^%(\w+)[^\n]*\n", path.read_text(), flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def labels(path: Path) -> dict[str, str]:
    return dict(line.split(None, 1) for line in recipe(path).labels)


def test_both_images_are_defined() -> None:
    assert DEFS == [CPU, GPU]


@pytest.mark.parametrize("path", DEFS, ids=lambda p: p.name)
def test_definition_has_the_sections_that_matter(path: Path) -> None:
    r = recipe(path)
    assert r.fromHeader, "no From: base image"
    assert r.test, "no %test section"
    assert re.fullmatch(r'exec python3? -m hpcbnn\.train "\$@"', r.cmd), f"%runscript is {r.cmd!r}"
    assert "HDF5_USE_FILE_LOCKING=FALSE" in r.environ
    assert {"org.opencontainers.image.title", "hpcbnn.horovod", "hpcbnn.openmpi",
            "hpcbnn.mpi-model"} <= labels(path).keys()
    assert any(line.strip() for line in sections(path)["help"].splitlines())


@pytest.mark.parametrize("path", DEFS, ids=lambda p: p.name)
@pytest.mark.parametrize("section", SCRIPTLETS)
def test_scriptlets_are_valid_sh(path: Path, section: str) -> None:
    """Apptainer runs these with /bin/sh, so bash-only syntax would break the build."""
    proc = subprocess.run(["sh", "-n"], input=sections(path)[section], capture_output=True, text=True)
    assert proc.returncode == 0, f"%{section}: {proc.stderr}"


@pytest.mark.parametrize("path", DEFS, ids=lambda p: p.name)
def test_files_copied_into_the_image_exist(path: Path) -> None:
    sources = [line.split()[0] for line in recipe(path).files]
    assert "hpcbnn" in sources and "setup.cfg" in sources
    missing = [s for s in sources if not (ROOT / s).exists()]
    assert not missing, f"%files sources missing from the repository root: {missing}"


def test_gpu_image_is_cuda_torch_with_open_mpi_and_nccl_horovod() -> None:
    r = recipe(GPU)
    post = sections(GPU)["post"]
    assert r.fromHeader.startswith("nvidia/cuda:") and "-devel-" in r.fromHeader, r.fromHeader
    version = re.search(r"^\s*OMPI_VERSION=(\S+)", post, re.M)[1]
    assert labels(GPU)["hpcbnn.openmpi"] == version
    assert "./configure --prefix=/opt/openmpi --with-slurm" in post
    assert "PATH=/opt/venv/bin:/opt/openmpi/bin:" in " ".join(r.environ)
    assert "MPICC=/opt/openmpi/bin/mpicc" in post and "--no-binary mpi4py" in post
    for flag in (*HOROVOD_FLAGS, "HOROVOD_GPU_OPERATIONS=NCCL"):
        assert flag in post, flag
    assert "--no-build-isolation" in post
    assert re.search(r"^\s*HOROVOD_VERSION=(\S+)", post, re.M)[1] == labels(GPU)["hpcbnn.horovod"] == "0.28.1"
    assert "python3 -m pip install --no-cache-dir /opt/hpcbnn" in post


def test_gpu_image_applies_the_cxx20_patch_to_both_cmake_files(tmp_path: Path) -> None:
    """Run the definition's own patch command on the two lines it must change."""
    src = tmp_path / "horovod"
    (src / "horovod" / "torch").mkdir(parents=True)
    for cmake in (src / "CMakeLists.txt", src / "horovod" / "torch" / "CMakeLists.txt"):
        cmake.write_text("project(horovod)\nset(CMAKE_CXX_STANDARD 14)\n")
    patch = [line.strip() for line in sections(GPU)["post"].splitlines() if "CMAKE_CXX_STANDARD" in line]
    subprocess.run(["sh", "-ec", "\n".join(patch)], env={"src": str(src), "PATH": "/usr/bin:/bin"}, check=True)
    for cmake in (src / "CMakeLists.txt", src / "horovod" / "torch" / "CMakeLists.txt"):
        assert "set(CMAKE_CXX_STANDARD 20)" in cmake.read_text() and " 14)" not in cmake.read_text()


def test_cpu_image_builds_with_the_bare_metal_recipe() -> None:
    """The CPU image runs scripts/setup-env.sh after installing the CPU wheels of the very
    versions that script pins, so the image and bare metal cannot drift apart."""
    post = sections(CPU)["post"]
    setup_env = (ROOT / "scripts" / "setup-env.sh").read_text()
    assert "bash scripts/setup-env.sh" in post and "VENV=/opt/venv" in post
    for name in ("TORCH_VERSION", "TORCHVISION_VERSION"):
        assert re.search(rf"\b{name}={re.escape(pinned(name))}\b", post), f"{name} differs from setup-env.sh"
    assert "download.pytorch.org/whl/cpu" in post
    assert "PATH=/opt/venv/bin" in " ".join(recipe(CPU).environ)
    horovod = re.search(r"HOROVOD_VERSION=\$\{HOROVOD_VERSION:-([^}]+)\}", setup_env)[1]
    assert labels(CPU)["hpcbnn.horovod"] == horovod
    assert all(flag in setup_env for flag in HOROVOD_FLAGS)


def pinned(name: str) -> str:
    """A version scripts/setup-env.sh pins (bare metal, CI and the CPU image use it)."""
    return re.search(rf"{name}=\$\{{{name}:-([^}}]+)\}}", (ROOT / "scripts" / "setup-env.sh").read_text())[1]


def test_gpu_image_has_the_torch_line_of_the_cpu_environment() -> None:
    """torch 2.5.1 (the old base image) lacked torch.accelerator and allowed CVE-2025-32434."""
    post = sections(GPU)["post"]
    for name in ("TORCH_VERSION", "TORCHVISION_VERSION"):
        assert re.search(rf"\b{name}={re.escape(pinned(name))}\b", post), f"{name} differs from setup-env.sh"
    assert '"torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"' in post
    assert labels(GPU)["hpcbnn.torch"] == pinned("TORCH_VERSION")
    assert "pytorch/pytorch" not in recipe(GPU).fromHeader, "a base image brings its own, older torch"
    cuda = re.fullmatch(r"nvidia/cuda:(\d+\.\d+)\.\d+-devel-\S+", recipe(GPU).fromHeader)
    assert cuda and cuda[1] == labels(GPU)["hpcbnn.cuda"], recipe(GPU).fromHeader
    assert "PATH=/opt/venv/bin" in " ".join(recipe(GPU).environ)
    import torch

    if torch.__version__.split("+")[0] == pinned("TORCH_VERSION") and torch.version.cuda:
        # This environment's torch is PyPI's wheel of the same version: its CUDA is the image's toolkit.
        assert torch.version.cuda.startswith(labels(GPU)["hpcbnn.cuda"]), torch.version.cuda


def test_setup_cfg_floor_admits_the_pin_and_nothing_older_than_2_14() -> None:
    from packaging.requirements import Requirement
    from packaging.version import Version

    cfg = (ROOT / "setup.cfg").read_text()
    block = re.search(r"install_requires =\n((?:    .+\n)+)", cfg)[1]
    reqs = {r.name: r for r in (Requirement(line.strip()) for line in block.splitlines())}
    for name, pin in (("torch", "TORCH_VERSION"), ("torchvision", "TORCHVISION_VERSION")):
        assert reqs[name].specifier.contains(pinned(pin)), f"setup.cfg {reqs[name]} refuses the pinned {pinned(pin)}"
    assert not reqs["torch"].specifier.contains("2.13.99") and not reqs["torch"].specifier.contains("2.5.1")
    assert Version(pinned("TORCH_VERSION")) >= Version("2.14")


def test_open_mpi_tarball_is_checked_before_it_is_unpacked(tmp_path: Path) -> None:
    """The definition's own check, run on a tarball that is not the release: it must fail,
    and it passes only for the bytes whose sha256 the definition records."""
    post = sections(GPU)["post"]
    lines = [line.strip() for line in post.splitlines()]
    digest = re.search(r"^OMPI_SHA256=([0-9a-f]{64})$", post.replace("    ", ""), re.M)
    assert digest, "no OMPI_SHA256=<64 hex digits> in %post"
    fetch = next(i for i, line in enumerate(lines) if line.startswith("wget") and "openmpi-" in line)
    check = next(i for i, line in enumerate(lines) if "sha256sum -c" in line)
    unpack = next(i for i, line in enumerate(lines) if line.startswith("tar xjf") and "openmpi-" in line)
    assert fetch < check < unpack, "the checksum must be verified between the download and the unpack"
    tarball = tmp_path / "openmpi-4.1.6.tar.bz2"
    tarball.write_bytes(b"not the Open MPI release")
    env = {"PATH": "/usr/bin:/bin", "OMPI_VERSION": "4.1.6", "OMPI_SHA256": digest[1]}
    bad = subprocess.run(["sh", "-ec", lines[check]], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert bad.returncode != 0 and "FAILED" in bad.stdout + bad.stderr, bad.stdout + bad.stderr
    import hashlib

    env["OMPI_SHA256"] = hashlib.sha256(tarball.read_bytes()).hexdigest()
    good = subprocess.run(["sh", "-ec", lines[check]], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert good.returncode == 0, good.stdout + good.stderr
