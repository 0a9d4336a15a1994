"""The training configuration: one dataclass, read from YAML and the command line.

jsonargparse turns the dataclass into `--help` (each field's docstring and default),
validates types, rejects unknown keys in files and flags, and dumps the resolved
configuration that is saved with every run.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Optional, TypeVar, Union

import yaml
from jsonargparse import ActionConfigFile, ArgumentError, ArgumentParser, set_parsing_settings

from hpcbnn.bnn.layers import Estimator, MeanInit
from hpcbnn.bnn.models import ModelName
from hpcbnn.bnn.objectives import DEFAULT_KL_WEIGHT
from hpcbnn.bounded import COLLECTIVE_TIMEOUT_S
from hpcbnn.data.augment import AugmentName
from hpcbnn.errors import UsageError, world_rank
from hpcbnn.optim.optimizers import RHO_LR_SCALE
from hpcbnn.parallel.collectives import Backend
from hpcbnn.parallel.engine import AugmentMode, Objective
from hpcbnn.parallel.grid import Mode
from hpcbnn.run.checkpoint import write_atomically

set_parsing_settings(docstring_parse_attribute_docstrings=True)
T = TypeVar("T")


@dataclass
class Config:
    """Train a Bayesian neural network with sample, data or hybrid parallelism."""

    data: Optional[str] = None
    """HDF5 file in hpcbnn's format (python -m hpcbnn.data converts); default: the bundled digits set."""
    model: ModelName = "mlp"
    """Network: MLP, CIFAR-style ResNet-18, the paper's small ViT, or torchvision's Swin-T."""
    hidden: list[int] = field(default_factory=lambda: [128, 128])
    """Hidden layer widths of the MLP."""
    bayesian_layers: Union[Literal["all"], int] = "all"
    """Which layers are Bayesian: all, or the last n weight layers."""
    pretrained: Optional[str] = None
    """A local file with deterministic weights (a state_dict) to centre the posterior on."""
    prior_scale: Union[float, Literal["fan_in"]] = "fan_in"
    """Standard deviation of the Gaussian prior on every weight; fan_in: 0.7 of each layer's He std
    sqrt(2/fan_in) (docs/uq.md, round 5)."""
    init_std: Union[float, Literal["fan_in"]] = "fan_in"
    """Initial posterior standard deviation; fan_in: a hundredth of each layer's He std."""
    rho_lr_scale: float = RHO_LR_SCALE
    """Learning rate of the posterior standard deviations' parameters (rho), relative to --lr: Adam moves
    each by about its learning rate per step, too slow at 1x for sigma to reach its fit (docs/uq.md)."""
    estimator: Estimator = "reparam"
    """Gradient estimator of the Bayesian layers."""
    components: Optional[int] = None
    """Components of the mixture posterior (hpcbnn.bnn.mixture), sample s using component s mod this;
    default: one per sample (= samples), the best on the validation split (docs/uq.md, rounds 3-4). The
    parameters are this many times a single network's; 1 is a single mean-field Gaussian, whose sigmas
    hardly grow at lr 1e-3 (use --lr 3e-3 with it; docs/uq.md, round 4). samples and eval_samples must be
    multiples of it."""
    means: Optional[MeanInit] = None
    """Where the posterior means start: prior draws each weight mean from its prior, module keeps the
    network's own weights (torch's initialisation, or --pretrained's). Default: prior for a mixture, which
    spreads its components apart (docs/uq.md, round 6); module with one component or --pretrained."""
    mode: Mode = "sample"
    """Parallelism: sample splits the MC samples over ranks, data the batch, hybrid both (K x D)."""
    sample_group: Optional[int] = None
    """hybrid: K ranks per sample group (default: the ranks per node)."""
    backend: Backend = "horovod"
    """Collectives: Horovod over MPI, or torch.distributed (Gloo on CPU, NCCL on GPU)."""
    collective_timeout: float = COLLECTIVE_TIMEOUT_S
    """Seconds any collective may wait for the slowest rank: past it, a stopped or hung rank ends the
    job with one line naming it (exit 1), instead of at the scheduler's time limit."""
    reduction: Literal["world", "hierarchical"] = "world"
    """Gradient averaging: one call over all ranks, or over the sample then the data communicator."""
    samples: int = 8
    """Monte-Carlo weight samples per step, global: each rank evaluates samples/K."""
    sample_chunk: Optional[int] = None
    """Evaluate each rank's samples this many at a time (default: all at once), which bounds the weight copies
    and activations in memory; the gradient is the same (the ELBO is a mean over samples; --objective elbo only)."""
    eval_samples: Optional[int] = None
    """Samples of the predictive at evaluation (default: samples); a multiple of K."""
    batch_size: int = 64
    """Examples per step, global: each data group sees batch_size/D."""
    epochs: int = 40
    """Passes over the training split."""
    max_steps: Optional[int] = None
    """Stop after this many optimizer steps (for short tests); None runs all epochs."""
    objective: Objective = "elbo"
    """ELBO (mean log-likelihood), or the predictive objective (log of the sample-averaged likelihood)."""
    kl_weight: float = DEFAULT_KL_WEIGHT
    """Weight of KL/N in the loss (a posterior temperature: <1 is a cold posterior). 1 is the plain ELBO,
    which on small data sets (the digits' 1257 examples, 25k weights) sets most sigmas to the prior's and
    underfits; the default is the best value on the validation split (docs/uq.md)."""
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    """Optimizer."""
    lr: float = 1e-3
    """Peak learning rate (1e-3: the best validation NLL of the 8-component mixture, docs/uq.md round 3)."""
    weight_decay: float = 0.0
    """Decoupled weight decay (adamw) or L2 (adam, sgd); on a mixture of K components the L2 is divided by K,
    so that it pulls each component as it would pull one network."""
    momentum: float = 0.9
    """SGD momentum."""
    warmup_epochs: float = 1.0
    """Linear warm-up length before the cosine decay."""
    schedule: Literal["cosine", "constant"] = "cosine"
    """Learning-rate schedule after warm-up."""
    clip_grad: Optional[float] = None
    """Clip the global gradient norm to this value."""
    amp: bool = False
    """Mixed precision (bfloat16 autocast) on GPU; ignored on CPU."""
    dtype: Literal["float32", "float64"] = "float32"
    """Parameter precision (float64 for exactness checks)."""
    augment: AugmentName = "none"
    """Batched image augmentation."""
    augment_mode: AugmentMode = "per-sample"
    """Augmentation randomness: per MC sample (partition-invariant), per rank (the paper's), or shared."""
    seed: int = 0
    """Seeds weight noise, data order and augmentation."""
    device: Optional[str] = None
    """Device, e.g. cpu or cuda:0 (default: cuda:local_rank when CUDA is there, else cpu)."""
    run_dir: Optional[str] = None
    """Where results go (default: runs/<date-time>)."""
    resume: bool = False
    """Continue from the latest checkpoint in run_dir."""
    checkpoint_every: int = 1
    """Write a checkpoint every n epochs (and always at the end and on SIGTERM/SIGUSR1)."""
    keep_checkpoints: int = 3
    """How many checkpoints to keep."""
    ece_bins: int = 15
    """Confidence bins of the calibration error and the reliability diagram."""
    ood: str = "auto"
    """Out-of-distribution inputs for the final OOD detection (an HDF5 file; its test split): auto is
    the bundled digits rotated by 90 degrees when --data is unset, else none; none turns it off."""
    log_every: int = 20
    """Steps between progress lines when the output is not a terminal."""


def parse_options(cls: type[T], prog: str, argv: list[str] | None = None) -> T:
    """Parse flags (and --config YAML files) into the dataclass `cls`; a bad option is one
    UsageError line, and `--help` prints on rank 0 only."""
    parser = ArgumentParser(prog=prog, description=cls.__doc__, exit_on_error=False, default_config_files=[])
    parser.add_argument("--config", action=ActionConfigFile, help="A YAML file of options; flags after it override it.")
    parser.add_class_arguments(cls)
    quiet = contextlib.redirect_stdout(io.StringIO()) if world_rank() else contextlib.nullcontext()
    try:
        with quiet:
            ns = parser.parse_args(argv)
    except ArgumentError as exc:
        raise UsageError(" ".join(str(exc).split()) + " (see --help)") from None
    values = ns.as_dict()
    values.pop("config", None)
    return cls(**values)


# What a resume must not change, because the run continued would no longer be the run
# checkpointed: the data (`data` compares the training split's identity, not the path, so a
# staged copy resumes), the model and its posterior, the objective, the optimizer and the
# randomness. Everything else (epochs, the grid, the backend, logging, evaluation) may change.
RESUME_FIXED = (
    "data",
    "model",
    "hidden",
    "bayesian_layers",
    "pretrained",
    "prior_scale",
    "init_std",
    "rho_lr_scale",
    "estimator",
    "components",
    "samples",
    "batch_size",
    "objective",
    "kl_weight",
    "optimizer",
    "lr",
    "weight_decay",
    "momentum",
    "warmup_epochs",
    "schedule",
    "clip_grad",
    "dtype",
    "augment",
    "augment_mode",
    "seed",
)
# Options that may differ between the ranks of one job (each rank's own device).
PER_RANK = ("device",)


def parse_config(argv: list[str] | None = None) -> Config:
    cfg = parse_options(Config, "python -m hpcbnn.train", argv)
    if not cfg.collective_timeout > 0:
        raise UsageError(f"--collective_timeout {cfg.collective_timeout:g}: use a number of seconds > 0")
    return cfg


def save_config(cfg: Config, path: Path) -> None:
    """Write the resolved configuration atomically: a kill never leaves half of it."""
    write_atomically(path, yaml.safe_dump(asdict(cfg), sort_keys=False).encode())


def load_config(path: Path) -> Config:
    if not path.is_file():
        raise UsageError(f"{path} is missing: is this a run directory written by hpcbnn.train?")
    return parse_config(["--config", str(path)])
