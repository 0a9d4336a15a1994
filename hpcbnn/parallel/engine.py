"""One training step of a Bayesian network on the process grid.

Each rank evaluates its S/K Monte-Carlo samples on its data group's B/D examples in one
pass, builds its part of the objective, and gradients are averaged over the grid. Because
the weight noise of global sample s at step t depends on (seed, t, s) only, the per-rank
losses are means of equal-sized shares, and the one non-linear coupling (the predictive
objective's log-mean over samples) goes through an exact differentiable gather, the update
equals the single-process update with S samples and B examples, whatever the grid.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, get_args

import torch
from torch import Tensor, nn

from hpcbnn.bnn.layers import kl_divergence
from hpcbnn.bnn.mixture import check_samples, num_components
from hpcbnn.bnn.noise import generator_seed, sampling
from hpcbnn.bnn.objectives import (
    DEFAULT_KL_WEIGHT,
    categorical_loglik,
    elbo_loss,
    gaussian_loglik,
    predictive_loss,
)
from hpcbnn.bnn.softplus import shared as shared_softplus
from hpcbnn.errors import UsageError
from hpcbnn.parallel.collectives import Collectives
from hpcbnn.parallel.grid import ProcessGrid

if TYPE_CHECKING:
    from hpcbnn.data.augment import Augmentation

Objective = Literal["elbo", "predictive"]
AugmentMode = Literal["per-sample", "per-rank", "shared"]
OBJECTIVES: dict[str, Callable[..., Tensor]] = {"elbo": elbo_loss, "predictive": predictive_loss}
LIKELIHOODS = {"categorical": categorical_loglik, "gaussian": gaussian_loglik}
AUGMENT_MODES: tuple[AugmentMode, ...] = get_args(AugmentMode)
EVAL_STEP = -1  # a noise stream of its own: evaluation never reuses a training step's weights
AUGMENT_KEY, AUGMENT_STREAM = 0xA06, 2  # augmentation seeds never collide with any layer's noise


def check_chunk(chunk: int | None, local: int, objective: str, model: nn.Module) -> int | None:
    """`chunk`, the samples a rank evaluates at once (None: all its `local` ones), checked. It
    bounds the weight copies alive at a time; only the ELBO splits exactly, as the predictive
    objective's log of the mean over samples needs every sample's likelihood in one graph, and
    BatchNorm's statistics would cover one chunk's rows."""
    if chunk is None:
        return None
    if chunk < 1:
        raise UsageError(f"--sample_chunk {chunk}: use a number of samples >= 1")
    if chunk < local and objective != "elbo":
        raise UsageError(
            f"--sample_chunk {chunk} with --objective {objective}: only the ELBO splits exactly over sample chunks; "
            f"use --objective elbo or leave --sample_chunk unset"
        )
    norms = [name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if chunk < local and norms:
        raise UsageError(
            f"--sample_chunk {chunk}: the model has BatchNorm layers ({norms[0]}, ...) whose statistics would cover "
            "one chunk of samples, not all of them; leave --sample_chunk unset or use a model without BatchNorm"
        )
    return chunk


def check_batch_norm(model: nn.Module, grid: ProcessGrid) -> None:
    """Refuse to train BatchNorm on more than one data group: its batch statistics come from
    each rank's B/D rows only, so the update would depend on the grid (no exactness)."""
    norms = [name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if norms and grid.data_size > 1:
        raise UsageError(
            f"{grid.mode} mode on {grid.size} ranks has D={grid.data_size} data groups, but the model has "
            f"BatchNorm layers ({norms[0]}, ...) whose statistics would cover one rank's rows only, not the "
            "batch; use --mode sample (D=1) or a model without BatchNorm (mlp, vit, swin)"
        )


@dataclass
class StepResult:
    loss: float
    nll: float
    kl: float
    compute_s: float
    comm_s: float


class Engine:
    """Owns the step: inputs per sample -> model -> objective -> gradient reduction -> optimizer.

    Without an optimizer (`optimizer=None`) it only predicts: evaluation needs no update rule.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        grid: ProcessGrid,
        comm: Collectives,
        *,
        samples: int,
        batch_size: int,
        n_train: int,
        seed: int,
        objective: str = "elbo",
        likelihood: str = "categorical",
        kl_weight: float = DEFAULT_KL_WEIGHT,
        augment: Augmentation | None = None,
        augment_mode: str = "per-sample",
        hierarchical: bool = False,
        clip_grad: float | None = None,
        amp: bool = False,
        sample_chunk: int | None = None,
    ) -> None:
        grid.check(samples, batch_size)
        check_samples(samples, num_components(model))
        if optimizer is not None:
            check_batch_norm(model, grid)
        if objective not in OBJECTIVES:
            raise UsageError(f"unknown objective {objective!r}: choose one of {', '.join(OBJECTIVES)}")
        if augment_mode not in AUGMENT_MODES:
            raise UsageError(f"unknown augment_mode {augment_mode!r}: choose one of {', '.join(AUGMENT_MODES)}")
        self.model, self.optimizer, self.grid, self.comm = model, optimizer, grid, comm
        self.samples, self.batch_size, self.n_train, self.seed = samples, batch_size, n_train, seed
        self.objective, self.loglik = OBJECTIVES[objective], LIKELIHOODS[likelihood]
        self.kl_weight, self.augment, self.augment_mode = kl_weight, augment, augment_mode
        self.hierarchical, self.clip_grad = hierarchical, clip_grad
        self.amp = amp and grid.device.type == "cuda"
        self.local = list(grid.local_samples(samples))
        self.sample_chunk = check_chunk(sample_chunk, len(self.local), objective, model)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.dtype = self.params[0].dtype
        comm.broadcast_(model.state_dict().values())
        if optimizer is not None:
            comm.broadcast_(t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))

    def inputs(self, x: Tensor, rows: slice, step: int, samples: list[int]) -> Tensor:
        """The [k*B_local, ...] sample-major input: one (augmented) copy per sample of `samples`."""
        k, augment = len(samples), self.augment
        if augment is None:
            return x.expand(k, *x.shape).reshape(k * x.shape[0], *x.shape[1:])

        def augmented(stream: int) -> Tensor:
            seed = generator_seed(self.seed, step, stream, AUGMENT_KEY, AUGMENT_STREAM)
            return augment(x, torch.Generator().manual_seed(seed), rows, self.batch_size)

        if self.augment_mode == "per-sample":
            return torch.cat([augmented(s) for s in samples])
        stream = self.grid.rank if self.augment_mode == "per-rank" else -1
        return augmented(stream).repeat(k, *[1] * (x.dim() - 1))

    def loss(self, x: Tensor, y: Tensor, rows: slice, step: int, samples: list[int]) -> tuple[Tensor, Tensor, Tensor]:
        """This rank's objective on its `samples`, and its expected-NLL and KL parts."""
        k, b, x = len(samples), x.shape[0], x.to(self.dtype)
        inputs = self.inputs(x, rows, step, samples)
        # without per-sample augmentation the k samples see copies of one batch: layers may share products
        shared = inputs if self.augment is None or self.augment_mode != "per-sample" else None
        with shared_softplus():  # the forward's samples and the KL compute each sigma once
            with (
                sampling(self.seed, step, samples, rows, self.batch_size, shared_input=shared),
                torch.autocast(self.grid.device.type, torch.bfloat16, enabled=self.amp),
            ):
                out = self.model(inputs)
            kl = kl_divergence(self.model)
        loglik = self.loglik(out.to(self.dtype).view(k, b, *out.shape[1:]), y)
        loss = self.objective(
            loglik,
            kl,
            self.n_train,
            self.kl_weight,
            num_samples=self.samples,
            gather=lambda t: self.comm.allgather(t, "sample"),
        )
        return loss, -loglik.mean(), kl

    def step(self, x: Tensor, y: Tensor, rows: slice, step: int) -> StepResult:
        if self.optimizer is None:
            raise TypeError("Engine.step needs an optimizer: this engine was built to predict only")
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        loss, nll, kl = 0.0, 0.0, 0.0
        # The ELBO is a mean over samples: chunk c's objective, weighted by its share of the
        # rank's samples, has gradients that add up to the whole one, with c weight copies alive.
        chunk = self.sample_chunk or len(self.local)
        for i in range(0, len(self.local), chunk):
            samples = self.local[i : i + chunk]
            last = i + chunk >= len(self.local)
            part, part_nll, part_kl = self.loss(x, y, rows, step, samples)
            share = len(samples) / len(self.local)
            # The last backward starts each gradient's reduction as soon as it is ready: the
            # transfer of the last layers overlaps the backward of the first ones.
            with self.comm.reducing_gradients(self.params, self.hierarchical) if last else nullcontext():
                (part * share if share < 1 else part).backward()
                computed = time.perf_counter()
            loss, nll, kl = loss + share * part.item(), nll + share * part_nll.item(), part_kl.item()
        reduced = time.perf_counter()
        if self.clip_grad:
            nn.utils.clip_grad_norm_(self.params, self.clip_grad)
        self.optimizer.step()
        return StepResult(loss, nll, kl, computed - start, reduced - computed)

    @torch.no_grad()
    def predict(self, x: Tensor, rows: slice, global_batch: int, samples: int) -> Tensor:
        """Outputs of all `samples` weight samples on this data group's rows: [samples, B_local, ...]."""
        check_samples(samples, num_components(self.model))
        local = list(self.grid.local_samples(samples))
        b, x = x.shape[0], x.to(self.dtype)
        outs = []
        chunk = self.sample_chunk or len(local)
        with shared_softplus():
            for i in range(0, len(local), chunk):
                part = local[i : i + chunk]
                inputs = x.expand(len(part), *x.shape).reshape(len(part) * b, *x.shape[1:])
                with sampling(self.seed, EVAL_STEP, part, rows, global_batch, shared_input=inputs):
                    out = self.model(inputs)
                outs.append(out.view(len(part), b, *out.shape[1:]))
        out = torch.cat(outs) if len(outs) > 1 else outs[0]
        return self.comm.allgather(out.contiguous(), "sample")

    def sync_buffers(self) -> None:
        """Average floating buffers (e.g. BatchNorm running statistics) over the grid."""
        buffers = [b for b in self.model.buffers() if b.is_floating_point()]
        self.comm.allreduce_(buffers, "world")
