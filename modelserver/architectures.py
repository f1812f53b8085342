"""Model architectures for the base (model owner's) and the stolen (attacker's) models.

    simple   the paper's Sec. IV-A network: 64 3x3 conv, 64 3x3 conv, 2x2 max pool,
             128 3x3 conv, 128 3x3 conv, 2x2 max pool, 256 dense, 256 dense, K outputs
    allconv  a small all-convolutional net in the spirit of Springenberg et al. (strided
             convolutions instead of pooling, 1x1 convs to K maps, global average pooling,
             batch normalisation)
    mlp      two hidden layers of 256
    logreg   multiclass logistic regression (one linear layer)

Every model returns LOGITS; callers apply softmax. Convolutions use padding=1, so the image
models work for 28x28 (MNIST) and 8x8 (digits) inputs alike.
"""

from __future__ import annotations

import math

import torch
from torch import nn

ARCHITECTURE_NAMES = ("simple", "allconv", "mlp", "logreg")


def _conv(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.ReLU()]


class Simple(nn.Module):
    """The paper's "Simple" convolutional network (Sec. IV-A)."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int):
        super().__init__()
        c, h, w = input_shape
        self.features = nn.Sequential(
            *_conv(c, 64), *_conv(64, 64), nn.MaxPool2d(2),
            *_conv(64, 128), *_conv(128, 128), nn.MaxPool2d(2),
        )  # fmt: skip
        flat = 128 * (h // 4) * (w // 4)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(flat, 256), nn.ReLU(),
            nn.Linear(256, 256), nn.ReLU(),
            nn.Linear(256, num_classes),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class AllConv(nn.Module):
    """A small all-convolutional network: no pooling or dense layers; downsampling by
    stride-2 convolutions, class scores by 1x1 convolutions and global average pooling.
    Batch normalisation after each 3x3 convolution (it trains in a few hundred steps, which
    the attacker's budgets here need). 28x28 inputs are downsampled twice (the first conv
    already strided, for CPU speed), 8x8 inputs once."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int):
        super().__init__()
        c, h, w = input_shape
        strides = (2, 1, 2, 1) if min(h, w) >= 16 else (1, 2, 1, 1)
        widths = (c, 32, 32, 64, 64)
        layers: list[nn.Module] = []
        for cin, cout, stride in zip(widths[:-1], widths[1:], strides, strict=True):
            layers += [nn.Conv2d(cin, cout, 3, stride=stride, padding=1),
                       nn.BatchNorm2d(cout), nn.ReLU()]
        layers += [nn.Conv2d(64, 64, 1), nn.ReLU(), nn.Conv2d(64, num_classes, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).mean(dim=(2, 3))


class MLP(nn.Module):
    """A multilayer perceptron with two hidden layers of 256 units."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(math.prod(input_shape), 256), nn.ReLU(),
            nn.Linear(256, 256), nn.ReLU(),
            nn.Linear(256, num_classes),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class LogReg(nn.Module):
    """Multiclass logistic regression: logits = W x + b."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int):
        super().__init__()
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(math.prod(input_shape), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.flatten(x))


_ARCHITECTURES = {"simple": Simple, "allconv": AllConv, "mlp": MLP, "logreg": LogReg}


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Build an untrained architecture `name` ("simple", "allconv", "mlp", "logreg") for
    inputs of `input_shape` (one sample, e.g. (1, 28, 28) or (4,)) and `num_classes`
    outputs. The module returns logits. Raises ValueError for an unknown name or an input
    shape the architecture cannot take (convolutional nets need (C, H, W))."""
    if name not in _ARCHITECTURES:
        raise ValueError(
            f"unknown architecture {name!r}; choose one of {', '.join(ARCHITECTURE_NAMES)}"
        )
    input_shape = tuple(int(s) for s in input_shape)
    if name in ("simple", "allconv") and len(input_shape) != 3:
        raise ValueError(f"architecture {name!r} needs an image input (C, H, W), "
                         f"got input_shape {input_shape}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    return _ARCHITECTURES[name](input_shape, num_classes)
