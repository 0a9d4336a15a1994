#!/usr/bin/env bash
# Issue 13's GPU checks, one prepared run of under 8 minutes on one GPU:
#   1. benchmarks.layers on CUDA: the Bayesian step against the deterministic net doing the same
#      FLOPs (MLP with every estimator, the ViT with reparam), S=16, B=128;
#   2. one epoch of hpcbnn.train on the GPU with bf16 autocast (--amp true), through the
#      torch.distributed backend, which is NCCL on a GPU, on 1 rank.
# Usage: bash benchmarks/gpu.sh [OUT_DIR]    (default runs/gpu; PYTHON picks the interpreter)
# Everything it prints is also written to OUT_DIR: device.txt, layers.txt, train.txt and the run directory.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/gpu}
py=${PYTHON:-$(if [ -x .venv/bin/python ]; then echo .venv/bin/python; else echo python3; fi)}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"
"$py" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' | tee -a "$out/device.txt"

timeout 270 "$py" -m benchmarks.layers --device cuda --samples 16 --batch 128 --repeats 10 | tee "$out/layers.txt"

timeout 150 "$py" -m hpcbnn.train --device cuda --amp true --backend torch --epochs 1 \
    --run_dir "$out/train" | tee "$out/train.txt"
"$py" -c 'import json, sys; m = json.loads(open(sys.argv[1]).readlines()[-1]); print("epoch", {k: m[k] for k in ("seconds", "examples_per_s", "time_compute", "time_comm", "time_data")})' \
    "$out/train/metrics.jsonl" | tee -a "$out/train.txt"
