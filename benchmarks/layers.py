"""What do S weight samples cost? One Bayesian training step vs the deterministic net on S*B.

    python -m benchmarks.layers [--threads 2] [--models mlp vit] [--estimators reparam flipout local]
                                [--samples 16] [--batch 128]

For each model (the MLP 784-1024-1024-10 with every estimator, the small ViT for 32x32 images
with reparam) it times one training step (forward, backward, fused Adam step) of the Bayesian
network with S samples on a batch of B, against the same deterministic network on a batch of
S*B (the same FLOPs for reparam; flipout and local do two products per layer, hence their goals),
alternating the two in one process and taking medians of wall time and of CPU time
(all threads; the fairer ratio when other jobs share the cores). Peak memory: each variant runs its
steps again in a fresh subprocess, which reports its peak resident set size
(VmHWM) and the resident size just before the model was built; the ratio of the differences is the
memory the step itself needs (parameters, optimizer state, activations, weight samples),
the ratio of the peaks what the whole process needs. Time goals (issue 13): MLP reparam 1.5,
flipout 2.5, local 2.2; ViT reparam 1.5. The last line is JSON: {"rows": [...], "chunks": [...]}.

`--inputs shared` (the default) passes the batch as hpcbnn's Engine does without per-sample
augmentation: the S samples see copies of one batch, and flipout and local reparameterisation
compute the first layer's sample-invariant products once (`Sampling.shared_rows`). `--inputs
per-sample` gives each sample its own copy, as per-sample augmentation does.

Sample chunks (`--sample_chunk` of hpcbnn.train): the Bayesian step again with its S samples
evaluated c at a time (the ELBO of each chunk weighted by c/S, backward per chunk: the same
gradient), at c = S and c = --chunk (default S/4): time per step and the step's memory.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from hpcbnn.bnn.bayesianize import bayesianize
from hpcbnn.bnn.layers import ESTIMATORS, kl_divergence
from hpcbnn.bnn.models import mlp, small_vit
from hpcbnn.bnn.noise import sampling
from hpcbnn.bnn.objectives import categorical_loglik, elbo_loss
from hpcbnn.bnn.softplus import shared as shared_softplus

N_TRAIN = 50_000
GOALS = {("mlp", "reparam"): 1.5, ("mlp", "flipout"): 2.5, ("mlp", "local"): 2.2, ("vit", "reparam"): 1.5}


def build(model: str) -> tuple[nn.Module, tuple[int, ...]]:
    if model == "mlp":
        return mlp(784, [1024, 1024], 10), (784,)
    return small_vit(10), (3, 32, 32)


class Step:
    """One optimizer step of a deterministic (batch S*B) or Bayesian (S samples x B) network."""

    def __init__(
        self,
        model: str,
        bayesian: bool,
        samples: int,
        batch: int,
        chunk: int = 0,
        estimator: str = "reparam",
        device: str = "cpu",
        shared: bool = True,
    ) -> None:
        torch.manual_seed(0)
        net, shape = build(model)
        self.net = (bayesianize(net, estimator=estimator) if bayesian else net).to(device)
        self.device = torch.device(device)
        self.bayesian, self.samples, self.batch, self.chunk = bayesian, samples, batch, chunk or samples
        self.shared = shared  # as the Engine without per-sample augmentation: the samples share the batch
        rows = batch if bayesian else samples * batch
        self.x = torch.randn(rows, *shape, device=device)
        self.y = torch.randint(0, 10, (rows,), device=device)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=1e-4, fused=True)
        self.t = 0

    def __call__(self) -> tuple[float, float]:
        """(wall, CPU) seconds of one step; CPU time (all threads) is robust to a busy machine."""
        start, cpu = time.perf_counter(), time.process_time()
        self.opt.zero_grad(set_to_none=True)
        if self.bayesian:
            b = self.batch
            for first in range(0, self.samples, self.chunk):  # as hpcbnn's Engine.step does
                part = range(first, min(self.samples, first + self.chunk))
                x = self.x.expand(len(part), *self.x.shape).reshape(len(part) * b, *self.x.shape[1:])
                with shared_softplus():  # as the Engine: the samples and the KL share each sigma
                    with sampling(0, self.t, part, shared_input=x if self.shared else None):
                        out = self.net(x)
                    kl = kl_divergence(self.net)
                loglik = categorical_loglik(out.view(len(part), b, -1), self.y)
                (elbo_loss(loglik, kl, N_TRAIN) * (len(part) / self.samples)).backward()
        else:
            F.cross_entropy(self.net(self.x), self.y).backward()
        self.opt.step()
        self.t += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start, time.process_time() - cpu


def status_kib(field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process; unlike ru_maxrss, not inherited over fork+exec."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def child(
    model: str, bayesian: bool, samples: int, batch: int, steps: int, chunk: int, estimator: str, device: str,
    shared: bool,
) -> None:
    """Run in a fresh process: print the resident size before the model and the peak after `steps`
    (on a GPU: the memory allocated on it, 0 before the model, and its peak)."""
    cuda = torch.device(device).type == "cuda"
    before = 0 if cuda else status_kib("VmRSS")
    step = Step(model, bayesian, samples, batch, chunk, estimator, device, shared)
    for _ in range(steps):
        step()
    peak = torch.cuda.max_memory_allocated(device) // 1024 if cuda else status_kib("VmHWM")
    print(json.dumps({"before_kib": before, "peak_kib": peak}))


def memory(
    model: str, bayesian: bool, args: argparse.Namespace, chunk: int = 0, estimator: str = "reparam"
) -> dict[str, int]:
    cmd = [sys.executable, "-m", "benchmarks.layers", "--child", model, str(int(bayesian)), estimator,
           "--threads", str(args.threads), "--samples", str(args.samples), "--batch", str(args.batch),
           "--chunk", str(chunk), "--device", args.device, "--inputs", args.inputs]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def compare(model: str, estimator: str, args: argparse.Namespace) -> dict[str, float]:
    det = Step(model, False, args.samples, args.batch, device=args.device)
    bayes = Step(model, True, args.samples, args.batch, estimator=estimator, device=args.device,
                 shared=args.inputs == "shared")
    det(), bayes()  # warm-up: allocator, thread pools
    times: dict[str, list[tuple[float, float]]] = {"det": [], "bayes": []}
    for _ in range(args.repeats):
        times["det"].append(det())
        times["bayes"].append(bayes())
    del det, bayes
    t_det, t_bayes = (statistics.median(t for t, _ in times[v]) for v in ("det", "bayes"))
    c_det, c_bayes = (statistics.median(c for _, c in times[v]) for v in ("det", "bayes"))
    m_det, m_bayes = memory(model, False, args), memory(model, True, args, estimator=estimator)

    def step_mib(m: dict[str, int]) -> float:
        return (m["peak_kib"] - m["before_kib"]) / 1024

    return {"model": model, "estimator": estimator, "goal": GOALS.get((model, estimator), math.nan),
            "t_det": t_det, "t_bayes": t_bayes, "time_ratio": t_bayes / t_det, "cpu_ratio": c_bayes / c_det,
            "mem_det": step_mib(m_det), "mem_bayes": step_mib(m_bayes),
            "mem_ratio": step_mib(m_bayes) / step_mib(m_det),
            "peak_det": m_det["peak_kib"] / 1024, "peak_bayes": m_bayes["peak_kib"] / 1024,
            "peak_ratio": m_bayes["peak_kib"] / m_det["peak_kib"]}


def chunks(model: str, args: argparse.Namespace) -> list[dict[str, float]]:
    """Time (median of alternating steps) and step memory of the Bayesian step at c = S and c = --chunk."""
    sizes = (args.samples, args.chunk or max(1, args.samples // 4))
    steps = [Step(model, True, args.samples, args.batch, c, device=args.device, shared=args.inputs == "shared")
             for c in sizes]
    for step in steps:
        step()  # warm-up
    times: list[list[float]] = [[], []]
    for _ in range(args.repeats):
        for t, step in zip(times, steps):
            t.append(step()[0])
    del steps
    rows = []
    for c, t in zip(sizes, times):
        m = memory(model, True, args, c)
        rows.append({"chunk": c, "step_s": statistics.median(t), "step_mib": (m["peak_kib"] - m["before_kib"]) / 1024})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]; on a GPU memory is its peak allocation")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (default: all)")
    parser.add_argument("--models", nargs="+", choices=("mlp", "vit"), default=["mlp", "vit"])
    parser.add_argument("--estimators", nargs="+", choices=ESTIMATORS, default=list(ESTIMATORS),
                        help="the MLP's estimators (the ViT runs reparam)")
    parser.add_argument("--samples", type=int, default=16, help="S, Monte-Carlo samples per step")
    parser.add_argument("--batch", type=int, default=128, help="B, examples per step")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per variant (median)")
    parser.add_argument("--chunk", type=int, default=0, help="the sample chunk to compare with c = S (default S/4)")
    parser.add_argument("--inputs", choices=("shared", "per-sample"), default="shared",
                        help="shared: the S samples see one batch, as the Engine passes it without per-sample "
                             "augmentation (flipout and local compute the first layer's mean products once); "
                             "per-sample: S separate copies, as with per-sample augmentation")
    parser.add_argument("--child", nargs=3, metavar=("MODEL", "BAYESIAN", "ESTIMATOR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        child(args.child[0], bool(int(args.child[1])), args.samples, args.batch, 2, args.chunk, args.child[2],
              args.device, args.inputs == "shared")
        return
    where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else f"{args.threads} threads"
    print(f"S={args.samples} B={args.batch}, {where}, {args.inputs} inputs; deterministic net on a batch of "
          f"{args.samples * args.batch}; time: median of {args.repeats} alternating steps; "
          f"memory: step = peak RSS - RSS before the model, peak = whole process (GPU: peak allocated)")
    print(f"{'model':6} {'estimator':9} {'det s':>8} {'bayes s':>8} {'time x':>7} {'goal':>5} {'cpu x':>6} "
          f"{'det MiB':>8} {'bayes MiB':>9} {'step mem x':>10} {'peak x':>7}")
    rows = []
    for model in args.models:
        for estimator in args.estimators if model == "mlp" else ["reparam"]:
            r = compare(model, estimator, args)
            rows.append(r)
            print(f"{model:6} {estimator:9} {r['t_det']:8.3f} {r['t_bayes']:8.3f} {r['time_ratio']:7.2f} "
                  f"{r['goal']:5.1f} {r['cpu_ratio']:6.2f} {r['mem_det']:8.0f} {r['mem_bayes']:9.0f} "
                  f"{r['mem_ratio']:10.2f} {r['peak_ratio']:7.2f}", flush=True)
    print(f"sample chunks: the Bayesian step with its S={args.samples} samples evaluated c at a time (same gradient)")
    print(f"{'model':6} {'c':>4} {'step s':>8} {'step MiB':>9}")
    chunk_rows = []
    for model in args.models:
        for row in chunks(model, args):
            chunk_rows.append({"model": model, **row})
            print(f"{model:6} {row['chunk']:4d} {row['step_s']:8.3f} {row['step_mib']:9.0f}", flush=True)
    print(json.dumps({"inputs": args.inputs, "rows": rows, "chunks": chunk_rows}))


if __name__ == "__main__":
    main()
