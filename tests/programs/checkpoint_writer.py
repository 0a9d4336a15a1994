"""Victim of the kill test: saves checkpoints of a large model in a loop until killed.

Usage: checkpoint_writer.py RUN_DIR MEGABYTES FIRST_STEP. The weights of step s are all s,
so a reader can tell that a file holds exactly what was written for its step. Prints each
step once its save has returned.
"""

import sys

import torch

from hpcbnn.run.checkpoint import save_checkpoint

run_dir, megabytes, first = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
numel = megabytes * 2**20 // 4
step = first
while True:
    save_checkpoint(run_dir, step, {"model": {"weight": torch.full((numel,), float(step))},
                                    "step": step}, keep=2)
    print(step, flush=True)
    step += 1
