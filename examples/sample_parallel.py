"""Sample parallelism in your own training loop, in the style of Horovod's examples.

    mpirun -np 2 python examples/sample_parallel.py --steps 200

Every rank sees the same mini-batch and evaluates its share of the S weight samples, so the
averaged gradient is the one a single process computes with all S samples. The lines marked
`# hpcbnn:` are all it adds to an ordinary PyTorch loop.
"""

import argparse

import torch
import torchvision
from sklearn.datasets import load_digits

import hpcbnn as hb

parser = argparse.ArgumentParser(description="A Bayesian torchvision MLP on digits, samples split over the ranks")
parser.add_argument("--steps", type=int, default=200)
parser.add_argument("--samples", type=int, default=8, help="Monte-Carlo weight samples per step, over all ranks")
parser.add_argument("--batch_size", type=int, default=64)
parser.add_argument("--backend", choices=["horovod", "torch"], default="horovod")
args = parser.parse_args()

x, y = load_digits(return_X_y=True)
x, y = torch.tensor(x / 16, dtype=torch.float32), torch.tensor(y)
model = hb.bayesianize(torchvision.ops.MLP(64, [128, 10]))  # hpcbnn: any torchvision model, e.g. resnet18
grid = hb.ProcessGrid("sample")  # hpcbnn: all P ranks share each batch and split its samples
comm = hb.make_collectives(grid, args.backend)  # hpcbnn: Horovod or torch.distributed over the grid
comm.broadcast_(model.state_dict().values())  # hpcbnn: every rank starts from rank 0's weights
optimizer = hb.make_optimizer(model, "adam", lr=3e-3)  # hpcbnn: Adam, the posterior's sigmas on their own step
k = args.samples // grid.sample_size  # samples per rank

for step in range(args.steps):
    batch = torch.randint(len(x), (args.batch_size,), generator=torch.Generator().manual_seed(step))  # same on all
    with hb.sampling(seed=0, step=step, samples=grid.local_samples(args.samples)):  # hpcbnn: this rank's samples
        logits = model(x[batch].repeat(k, 1)).view(k, args.batch_size, -1)  # k copies of the batch, sample-major
    loglik = hb.categorical_loglik(logits, y[batch])  # [k, B]
    loss = hb.elbo_loss(loglik, hb.kl_divergence(model), n_train=len(x))
    optimizer.zero_grad()
    with comm.reducing_gradients(model.parameters()):  # hpcbnn: average the gradients over the ranks,
        loss.backward()  # each one's reduction started as soon as backward has it
    optimizer.step()
    nll = torch.stack([-loglik.mean().detach()])
    comm.allreduce_([nll])  # hpcbnn: the expected NLL over all S samples, for the log
    if grid.is_root and (step % 20 == 0 or step == args.steps - 1):
        print(f"step {step:4d}  loss {loss.item():.4f}  expected NLL {nll.item():.4f}", flush=True)
