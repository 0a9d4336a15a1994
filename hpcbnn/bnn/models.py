"""The networks of the paper's tasks, built deterministic (bayesianize makes them Bayesian).

No builder downloads weights: a pretrained network is loaded by the caller from a file.
torchvision is imported inside the image builders: it pulls in torch._dynamo, seconds of
start-up on every rank that an MLP run does not need.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any, Literal, get_args

from torch import nn

from hpcbnn.errors import UsageError

ModelName = Literal["mlp", "resnet", "vit", "swin"]
MODELS: tuple[ModelName, ...] = get_args(ModelName)


def mlp(in_features: int, hidden: Sequence[int], out_features: int) -> nn.Sequential:
    """Flatten -> [Linear -> ReLU] per hidden width -> Linear."""
    layers: list[nn.Module] = [nn.Flatten()]
    widths = [in_features, *hidden]
    for a, b in itertools.pairwise(widths):
        layers += [nn.Linear(a, b), nn.ReLU()]
    layers.append(nn.Linear(widths[-1], out_features))
    return nn.Sequential(*layers)


def resnet_cifar(num_classes: int, in_channels: int = 3) -> nn.Module:
    """ResNet-18 for 32x32 images: a 3x3 stride-1 stem and no max-pool."""
    import torchvision

    model = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def small_vit(
    num_classes: int,
    image_size: int = 32,
    patch_size: int = 4,
    in_channels: int = 3,
    num_layers: int = 6,
    num_heads: int = 3,
    hidden_dim: int = 192,
    mlp_dim: int = 768,
) -> nn.Module:
    """The paper's ViT for 32x32 images (patch 4, dim 192, depth 6, 3 heads), torchvision's implementation."""
    from torchvision.models.vision_transformer import VisionTransformer

    if image_size % patch_size:
        raise UsageError(f"image size {image_size} is not divisible by the ViT patch size {patch_size}")
    model = VisionTransformer(
        image_size=image_size,
        patch_size=patch_size,
        num_layers=num_layers,
        num_heads=num_heads,
        hidden_dim=hidden_dim,
        mlp_dim=mlp_dim,
        num_classes=num_classes,
    )
    if in_channels != 3:
        model.conv_proj = nn.Conv2d(in_channels, hidden_dim, kernel_size=patch_size, stride=patch_size)
    return model


def swin_t(num_classes: int, in_channels: int = 3, stochastic_depth_prob: float = 0.0) -> nn.Module:
    """torchvision's Swin-T configuration (inputs of 32x32 and up; windows pad where needed).

    Stochastic depth is off by default: its drop masks come from torch's global RNG, not
    from the sampling context, so they would differ between partitions of a step.
    """
    from torchvision.models.swin_transformer import SwinTransformer

    model = SwinTransformer(
        patch_size=[4, 4],
        embed_dim=96,
        depths=[2, 2, 6, 2],
        num_heads=[3, 6, 12, 24],
        window_size=[7, 7],
        stochastic_depth_prob=stochastic_depth_prob,
        num_classes=num_classes,
    )
    if in_channels != 3:
        stem = model.features[0][0]
        model.features[0][0] = nn.Conv2d(in_channels, stem.out_channels, stem.kernel_size, stem.stride)
    return model


def build_model(
    name: str, input_shape: Sequence[int], num_outputs: int, hidden: Sequence[int] = (1024, 1024), **kw: Any
) -> nn.Module:
    """A network for inputs of `input_shape` (without the batch) and `num_outputs` outputs.

    `hidden` sets the MLP's widths; other keywords go to the image model's builder.
    """
    shape = tuple(input_shape)
    if name == "mlp":
        return mlp(math.prod(shape), hidden, num_outputs)
    if name not in MODELS:
        raise UsageError(f"unknown model {name!r}: choose one of {', '.join(MODELS)}")
    if len(shape) != 3:
        raise UsageError(
            f"--model {name} needs images of shape (channels, height, width), the data has {shape}; use --model mlp"
        )
    channels, height, width = shape
    if name == "resnet":
        return resnet_cifar(num_outputs, channels, **kw)
    if name == "swin":
        return swin_t(num_outputs, channels, **kw)
    if height != width:
        raise UsageError(f"--model vit needs square images, the data has {height}x{width}")
    return small_vit(num_outputs, image_size=height, in_channels=channels, **kw)
