"""Batched image augmentations whose randomness the caller owns.

`aug(x, generator, rows, global_batch)` draws the random parameters (crop offsets, flip
bits: a few numbers per row) for the whole global batch from `generator`, keeps the
rows `rows` this rank holds, and applies them to the local `x` in a few tensor ops. So
example i of a global batch is augmented the same way whichever data group holds it, and
the engine decides what seeds the generator (per sample, per rank, or shared).

torchvision's v2 transforms do not fit this contract: they draw one parameter set per
call from the global RNG, not one per example from a given generator. Its functional
kernels for these operations are `flip(-1)`, `pad` and an affine grid sample, so they are
written in torch directly, which also spares every rank torchvision's import (seconds on a
busy node). Padding is zero in normalised units, i.e. the channel mean.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal, get_args

import torch
import torch.nn.functional as F

from hpcbnn.errors import UsageError

Augmentation = Callable[[torch.Tensor, torch.Generator, slice, int], torch.Tensor]
"""aug(x, generator, rows, global_batch) -> augmented x: the one type of an augmentation."""
AugmentName = Literal["none", "flip", "crop", "cifar", "shift-rotate"]
AUGMENT_NAMES: tuple[AugmentName, ...] = get_args(AugmentName)
PADDING = 4
MAX_DEGREES = 10.0  # shift-rotate: rotation uniform in +-10 degrees
MAX_SHIFT = 0.0625  # shift-rotate: translation uniform in +-1/16 of the side (half a pixel of the 8x8 digits)


def _draw_flips(generator: torch.Generator, global_batch: int, rows: slice) -> torch.Tensor:
    return (torch.rand(global_batch, generator=generator, device=generator.device) < 0.5)[rows]


def _draw_offsets(generator: torch.Generator, global_batch: int, rows: slice, padding: int) -> torch.Tensor:
    return torch.randint(0, 2 * padding + 1, (global_batch, 2), generator=generator, device=generator.device)[rows]


def flip(x: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Mirror the images [N, C, H, W] whose bit in `flips` [N] is set."""
    return torch.where(flips.to(x.device)[:, None, None, None], x.flip(-1), x)


def crop(x: torch.Tensor, offsets: torch.Tensor, padding: int) -> torch.Tensor:
    """Pad by `padding` and cut each image back to H x W at its own (top, left) in `offsets` [N, 2]."""
    n, c, h, w = x.shape
    padded = F.pad(x, [padding] * 4)
    offsets = offsets.to(x.device)
    top = (offsets[:, 0, None] + torch.arange(h, device=x.device))[:, None, :, None]
    left = (offsets[:, 1, None] + torch.arange(w, device=x.device))[:, None, None, :]
    return padded[
        torch.arange(n, device=x.device)[:, None, None, None],
        torch.arange(c, device=x.device)[None, :, None, None],
        top,
        left,
    ]


def shift_rotate(x: torch.Tensor, angles: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Rotate each image [N, C, H, W] about its centre by `angles` [N] (radians) and move it by
    `shifts` [N, 2] (x, y, as fractions of the width and height), bilinearly; outside is zero.

    >>> x = torch.zeros(1, 1, 8, 8); x[0, 0, 2, 3] = 1
    >>> shift_rotate(x, torch.zeros(1), torch.tensor([[0.125, 0.0]]))[0, 0, 2, 4].item()  # one pixel right
    1.0
    """
    n, _, h, w = x.shape
    cos, sin = angles.cos(), angles.sin()
    theta = torch.stack(  # maps output to input coordinates in [-1, 1]; the aspect ratio kept
        [
            torch.stack([cos, -sin * h / w, -2 * shifts[:, 0]], -1),
            torch.stack([sin * w / h, cos, -2 * shifts[:, 1]], -1),
        ],
        1,
    ).to(x)
    grid = F.affine_grid(theta, [n, x.shape[1], h, w], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _check(name: str, x: torch.Tensor, rows: slice, global_batch: int) -> None:
    if x.dim() != 4:
        raise UsageError(
            f"augmentation {name!r} needs image inputs [C, H, W]; these inputs have "
            f"shape {list(x.shape[1:])}; use --augment none"
        )
    if not 0 <= rows.start < rows.stop <= global_batch or rows.stop - rows.start != len(x):
        raise ValueError(f"rows {rows} of a global batch of {global_batch} do not match {len(x)} local rows")


def _none(x: torch.Tensor, generator: torch.Generator, rows: slice, global_batch: int) -> torch.Tensor:
    return x


def _flip(x: torch.Tensor, generator: torch.Generator, rows: slice, global_batch: int) -> torch.Tensor:
    _check("flip", x, rows, global_batch)
    return flip(x, _draw_flips(generator, global_batch, rows))


def _crop(x: torch.Tensor, generator: torch.Generator, rows: slice, global_batch: int) -> torch.Tensor:
    _check("crop", x, rows, global_batch)
    return crop(x, _draw_offsets(generator, global_batch, rows, PADDING), PADDING)


def _cifar(x: torch.Tensor, generator: torch.Generator, rows: slice, global_batch: int) -> torch.Tensor:
    """The usual CIFAR set: random crop with 4 pixels of padding, then a horizontal flip."""
    _check("cifar", x, rows, global_batch)
    offsets = _draw_offsets(generator, global_batch, rows, PADDING)
    return flip(crop(x, offsets, PADDING), _draw_flips(generator, global_batch, rows))


def _shift_rotate(x: torch.Tensor, generator: torch.Generator, rows: slice, global_batch: int) -> torch.Tensor:
    """Small random rotations and shifts (digits, MNIST-style data: no mirror images)."""
    _check("shift-rotate", x, rows, global_batch)
    draws = torch.rand(global_batch, 3, generator=generator, device=generator.device)[rows] * 2 - 1
    return shift_rotate(x, draws[:, 0] * math.radians(MAX_DEGREES), draws[:, 1:] * MAX_SHIFT)


AUGMENTATIONS: dict[str, Augmentation] = {
    "none": _none,
    "flip": _flip,
    "crop": _crop,
    "cifar": _cifar,
    "shift-rotate": _shift_rotate,
}


def augmentation(name: str) -> Augmentation:
    """The augmentation called `name`: none, flip, crop (4-pixel padding), cifar (crop + flip) or
    shift-rotate (rotation within 10 degrees, shift within 1/16 of the side)."""
    if name not in AUGMENTATIONS:
        raise UsageError(f"unknown augmentation {name!r}: choose one of {', '.join(AUGMENTATIONS)}")
    return AUGMENTATIONS[name]
