"""Inception-ResNet-v1, as the paper draws it (Figures 10-15).

Stem of Figure 14 (299x299x3 -> 35x35x256), 5x Inception-ResNet-A (Figure 10), Reduction-A (Figure 7
with k=192, l=192, m=256, n=384; 35x35x256 -> 17x17x896), 10x Inception-ResNet-B (Figure 11),
Reduction-B (Figure 12; -> 8x8x1792), 5x Inception-ResNet-C (Figure 13), average pooling and the
classifier. Every residual block ends with a ReLU, as in the figures; the residual scales default to
Inception-ResNet-v2's published 0.17 / 0.10 / 0.20 (the paper only says "between 0.1 and 0.3").
No ImageNet weights were ever published for this network; the attribute names follow the
Inception-ResNet-v2 file (TF-slim's style) so that a checkpoint trained elsewhere in that style loads.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pipeline.models.inception_resnet_v2 import (
    DEFAULT_RESIDUAL_SCALES,
    Block8,
    Block17,
    Block35,
    InceptionResnet,
    ReductionB,
    check_residual_scales,
)
from pipeline.models.layers import INCEPTION_MIN_INPUT_SIZE, BasicConv2d, ConvFactory, ReductionA, check_input_size

HEAD = "classif"


class InceptionResnetV1(InceptionResnet):
    def __init__(
        self,
        num_classes: int = 1000,
        residual_scales: Sequence[float] = DEFAULT_RESIDUAL_SCALES,
        conv: ConvFactory = BasicConv2d,
    ):
        super().__init__()
        scale_a, scale_b, scale_c = check_residual_scales(residual_scales)
        self._add_stem_convs(conv)  # stem (Figure 14), then its last 3x3/2 conv to 35x35x256
        self.conv2d_4b = conv(192, 256, 3, stride=2)
        self.repeat = nn.Sequential(*[Block35(256, 32, (32, 32), (32, 32, 32), scale_a, conv) for _ in range(5)])
        self.mixed_6a = ReductionA(256, k=192, l=192, m=256, n=384, conv=conv)
        self.repeat_1 = nn.Sequential(*[Block17(896, 128, (128, 128, 128), scale_b, conv) for _ in range(10)])
        self.mixed_7a = ReductionB(896, (256, 384), (256, 256), (256, 256, 256), conv)
        self.repeat_2 = nn.Sequential(*[Block8(1792, 192, (192, 192, 192), scale_c, conv=conv) for _ in range(5)])
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.classif = nn.Linear(1792, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2d_4b(self._stem_convs(x))
        x = self.mixed_6a(self.repeat(x))
        x = self.mixed_7a(self.repeat_1(x))
        x = self.repeat_2(x)
        return self.classif(self.global_pool(x).flatten(1))


def build(
    num_classes: int = 1000,
    input_size: int = 299,
    residual_scales: Sequence[float] = DEFAULT_RESIDUAL_SCALES,
) -> InceptionResnetV1:
    check_input_size("inception_resnet_v1", input_size, INCEPTION_MIN_INPUT_SIZE)
    return InceptionResnetV1(num_classes, residual_scales)
