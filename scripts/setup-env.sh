#!/usr/bin/env bash
# Brings a bare Debian + Python 3.11 machine to a ready hpcbnn environment, idempotently:
# Open MPI (apt), a virtual environment with pinned torch/torchvision and the Python
# dependencies, and Horovod 0.28.1 built from its sdist with the C++20 patch. The Horovod
# wheel is cached outside the repository, keyed by the versions it was built against.
set -euo pipefail

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3.11}
TORCH_VERSION=${TORCH_VERSION:-2.14.1}
TORCHVISION_VERSION=${TORCHVISION_VERSION:-0.29.1}
HOROVOD_VERSION=${HOROVOD_VERSION:-0.28.1}
CACHE=${HPCBNN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hpcbnn}
CUDA_DIR=${CUDA_HOME:-/usr/local/cuda-13.0}
EXTRAS=${EXTRAS:-test}

say() { printf '[setup] %s\n' "$*" >&2; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }

sudo_if_needed() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

install_mpi() {
  if command -v mpirun >/dev/null && command -v mpicc >/dev/null; then return; fi
  say "installing Open MPI from Debian (libopenmpi-dev openmpi-bin)"
  sudo_if_needed apt-get update -qq
  sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenmpi-dev openmpi-bin >/dev/null \
    || die "apt-get could not install Open MPI; install libopenmpi-dev and openmpi-bin by hand (or load your site's MPI module) and rerun"
}

# hpcbnn.bnn.rng compiles its noise kernel with the C compiler on first use; Horovod's build needs g++.
install_compiler() {
  if command -v cc >/dev/null && command -v g++ >/dev/null; then return; fi
  say "installing a C/C++ compiler from Debian (gcc g++)"
  sudo_if_needed apt-get update -qq
  sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc g++ >/dev/null \
    || die "apt-get could not install gcc and g++; install a C/C++ compiler by hand (or load your site's compiler module) and rerun"
}

make_venv() {
  if [ ! -x "$VENV/bin/python" ]; then
    say "creating virtual environment $VENV"
    "$PYTHON" -m venv "$VENV" || die "could not create $VENV with $PYTHON; install python3.11-venv or set PYTHON=/path/to/python3.11"
  fi
  PY="$(cd "$VENV" && pwd)/bin/python"
  if ! "$PY" -c "import torch, torchvision, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
    say "installing torch==$TORCH_VERSION torchvision==$TORCHVISION_VERSION (several GB, once)"
    "$PY" -m pip install -q "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
  fi
  # Reinstall when the declared dependencies change, not only when an import fails.
  local stamp="$VENV/.hpcbnn-setup.cfg.sha256" want
  want=$(sha256sum setup.cfg | cut -d' ' -f1)
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    say "installing hpcbnn and its dependencies (pip install -e .[$EXTRAS])"
    "$PY" -m pip install -q -e ".[$EXTRAS]"
    echo "$want" >"$stamp"
  fi
}

horovod_wheel() {
  local torch_tag cuda_tag key dir
  torch_tag=$("$PY" -c "import torch; print(torch.__version__.replace('+', '_'))")
  cuda_tag=$([ -d "$CUDA_DIR" ] && basename "$CUDA_DIR" || echo cpu)
  key="horovod-$HOROVOD_VERSION-torch-$torch_tag-$cuda_tag-$(uname -m)-py$("$PY" -c 'import sys; print(f"{sys.version_info.major}{sys.version_info.minor}")')"
  dir="$CACHE/wheels/$key"
  if ! ls "$dir"/horovod-*.whl >/dev/null 2>&1; then
    build_horovod "$dir" >&2
  fi
  ls "$dir"/horovod-*.whl
}

build_horovod() {
  local out=$1 work log
  work=$(mktemp -d)
  log="$CACHE/horovod-build.log"
  mkdir -p "$out" "$CACHE"
  say "building Horovod $HOROVOD_VERSION (about 12 minutes on 2 cores, once; log: $log)"
  "$PY" -m pip install -q cmake packaging wheel setuptools
  "$PY" -m pip download -q --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$work" \
    || die "could not download the Horovod $HOROVOD_VERSION sdist from PyPI"
  tar xzf "$work/horovod-$HOROVOD_VERSION.tar.gz" -C "$work"
  local src="$work/horovod-$HOROVOD_VERSION"
  # Horovod 0.28.1 predates PyTorch's move to C++20: its two C++14 pins are the whole patch.
  sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 20)/' "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"
  grep -q 'CMAKE_CXX_STANDARD 20' "$src/horovod/torch/CMakeLists.txt" || die "the C++20 patch did not apply to the Horovod sdist"
  local -a env_vars=(HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_MPI=1 HOROVOD_WITHOUT_GLOO=1
    HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 HOROVOD_CPU_OPERATIONS=MPI
    MAKEFLAGS="-j$(nproc)")
  if [ -d "$CUDA_DIR" ]; then env_vars+=(CUDA_HOME="$CUDA_DIR" CUDAToolkit_ROOT="$CUDA_DIR"); fi
  if ! (cd "$src" && env "${env_vars[@]}" "$PY" -m pip wheel -v --no-build-isolation --no-deps -w "$out" . >"$log" 2>&1); then
    tail -n 25 "$log" >&2
    die "the Horovod build failed (full log: $log). Check that cmake, g++ and the Open MPI headers (libopenmpi-dev) are installed, and CUDA_HOME points at the CUDA toolkit matching torch; then rerun"
  fi
  rm -rf "$work"
}

install_horovod() {
  if "$PY" -c "import horovod.torch as hvd, sys; sys.exit(not hvd.mpi_built())" 2>/dev/null; then return; fi
  local wheel
  wheel=$(horovod_wheel)
  say "installing $(basename "$wheel")"
  "$PY" -m pip install -q "$wheel"
  "$PY" -c "import horovod.torch" || die "Horovod does not import (above); delete $(dirname "$wheel") and rerun to rebuild it"
  "$PY" -c "import horovod.torch as hvd, sys; sys.exit(not hvd.mpi_built())" \
    || die "Horovod was built without MPI; install libopenmpi-dev, delete $(dirname "$wheel") and rerun"
}

install_mpi
install_compiler
make_venv
install_horovod
"$PY" -c 'import torch; from hpcbnn.bnn.rng import fill_normal; fill_normal(torch.empty(1, 4), [0])' \
  || die "could not build hpcbnn's noise kernel (above); check the C compiler, or set HPCBNN_CACHE to a writable directory"
say "environment ready: $VENV ($("$PY" -c 'import torch, horovod; print("torch", torch.__version__, "horovod", horovod.__version__)'))"
