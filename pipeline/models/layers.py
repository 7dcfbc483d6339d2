"""Layers shared by the networks: the Inception conv-bn-relu unit, Reduction-A, the input-size check.

Every convolution of the published Inception checkpoints is a bias-free conv followed by
batch-norm (eps 1e-3, TensorFlow's value) and ReLU; the checkpoints store it as `<path>.conv.weight`
and `<path>.bn.*`, hence the attribute names.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from pipeline.errors import PipelineError

# The stem and both reductions shrink the grid with unpadded 3x3 convs and pools; below 75 pixels
# the last grid would be empty (75 -> 37 -> 35 -> 17 -> 15 -> 7 -> 3 -> 1).
INCEPTION_MIN_INPUT_SIZE = 75


class BasicConv2d(nn.Module):
    """Conv (no bias) + BatchNorm + ReLU: the only conv layer type of the Inception networks."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=1e-3)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


ConvFactory = Callable[..., nn.Module]


class ReductionA(nn.Module):
    """35x35 -> 17x17 grid reduction (paper Figure 7), widths k, l, m, n from the paper's Table 1."""

    def __init__(self, in_channels: int, k: int, l: int, m: int, n: int, conv: ConvFactory = BasicConv2d):
        super().__init__()
        self.branch0 = conv(in_channels, n, 3, stride=2)
        self.branch1 = nn.Sequential(
            conv(in_channels, k, 1),
            conv(k, l, 3, padding=1),
            conv(l, m, 3, stride=2),
        )
        self.branch2 = nn.MaxPool2d(3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.branch0(x), self.branch1(x), self.branch2(x)), 1)


def average_pool_3x3() -> nn.AvgPool2d:
    """The pooling branch of the Inception blocks (TF 'same' average: padding not counted)."""
    return nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)


def check_input_size(model: str, input_size: int, minimum: int) -> None:
    if input_size < minimum:
        raise PipelineError(
            f"{model} needs an input size of at least {minimum} pixels (got {input_size}): "
            f"its grid reductions leave nothing below that"
        )
