"""Inception-v4 (Szegedy et al. 2016, Figure 9), in the layout of timm's `inception_v4.tf_in1k`.

The published checkpoint matches the paper. It keeps every layer in one flat `features` sequence
(stem: features.0-5, 4x Inception-A: 6-9, Reduction-A: 10, 7x Inception-B: 11-17, Reduction-B: 18,
3x Inception-C: 19-21) and names the classifier `last_linear`; the attribute names below are chosen
so that the checkpoint loads without remapping.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.models.layers import (
    INCEPTION_MIN_INPUT_SIZE,
    BasicConv2d,
    ConvFactory,
    ReductionA,
    average_pool_3x3,
    check_input_size,
)

HEAD = "last_linear"


class StemMixed3a(nn.Module):
    """Stem, first filter concat (Figure 3): 3x3 max-pool | 3x3 conv 96, both stride 2."""

    def __init__(self, conv: ConvFactory = BasicConv2d):
        super().__init__()
        self.maxpool = nn.MaxPool2d(3, stride=2)
        self.conv = conv(64, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.maxpool(x), self.conv(x)), 1)


class StemMixed4a(nn.Module):
    """Stem, second filter concat (Figure 3): 1x1 -> 3x3 | 1x1 -> 7x1 -> 1x7 -> 3x3."""

    def __init__(self, conv: ConvFactory = BasicConv2d):
        super().__init__()
        self.branch0 = nn.Sequential(conv(160, 64, 1), conv(64, 96, 3))
        self.branch1 = nn.Sequential(
            conv(160, 64, 1),
            conv(64, 64, (1, 7), padding=(0, 3)),
            conv(64, 64, (7, 1), padding=(3, 0)),
            conv(64, 96, 3),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.branch0(x), self.branch1(x)), 1)


class StemMixed5a(nn.Module):
    """Stem, last filter concat (Figure 3): 3x3 conv 192 | 3x3 max-pool, both stride 2."""

    def __init__(self, conv: ConvFactory = BasicConv2d):
        super().__init__()
        self.conv = conv(192, 192, 3, stride=2)
        self.maxpool = nn.MaxPool2d(3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.conv(x), self.maxpool(x)), 1)


def stem(conv: ConvFactory = BasicConv2d) -> list[nn.Module]:
    """The stem of Figure 3 as the six layers the checkpoint keeps flat (299x299x3 -> 35x35x384)."""
    return [
        conv(3, 32, 3, stride=2),
        conv(32, 32, 3),
        conv(32, 64, 3, padding=1),
        StemMixed3a(conv),
        StemMixed4a(conv),
        StemMixed5a(conv),
    ]


class InceptionA(nn.Module):
    """35x35 block (Figure 4)."""

    def __init__(self, conv: ConvFactory = BasicConv2d):
        super().__init__()
        self.branch0 = conv(384, 96, 1)
        self.branch1 = nn.Sequential(conv(384, 64, 1), conv(64, 96, 3, padding=1))
        self.branch2 = nn.Sequential(conv(384, 64, 1), conv(64, 96, 3, padding=1), conv(96, 96, 3, padding=1))
        self.branch3 = nn.Sequential(average_pool_3x3(), conv(384, 96, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.branch0(x), self.branch1(x), self.branch2(x), self.branch3(x)), 1)


class InceptionB(nn.Module):
    """17x17 block (Figure 5)."""

    def __init__(self, conv: ConvFactory = BasicConv2d):
        super().__init__()
        self.branch0 = conv(1024, 384, 1)
        self.branch1 = nn.Sequential(
            conv(1024, 192, 1),
            conv(192, 224, (1, 7), padding=(0, 3)),
            conv(224, 256, (7, 1), padding=(3, 0)),
        )
        self.branch2 = nn.Sequential(
            conv(1024, 192, 1),
            conv(192, 192, (7, 1), padding=(3, 0)),
            conv(192, 224, (1, 7), padding=(0, 3)),
            conv(224, 224, (7, 1), padding=(3, 0)),
            conv(224, 256, (1, 7), padding=(0, 3)),
        )
        self.branch3 = nn.Sequential(average_pool_3x3(), conv(1024, 128, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.branch0(x), self.branch1(x), self.branch2(x), self.branch3(x)), 1)


class ReductionB(nn.Module):
    """17x17 -> 8x8 grid reduction (Figure 8)."""

    def __init__(self, conv: ConvFactory = BasicConv2d):
        super().__init__()
        self.branch0 = nn.Sequential(conv(1024, 192, 1), conv(192, 192, 3, stride=2))
        self.branch1 = nn.Sequential(
            conv(1024, 256, 1),
            conv(256, 256, (1, 7), padding=(0, 3)),
            conv(256, 320, (7, 1), padding=(3, 0)),
            conv(320, 320, 3, stride=2),
        )
        self.branch2 = nn.MaxPool2d(3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.branch0(x), self.branch1(x), self.branch2(x)), 1)


class InceptionC(nn.Module):
    """8x8 block (Figure 6). Its split branches keep the checkpoint's names (branch1_1a, ...)."""

    def __init__(self, conv: ConvFactory = BasicConv2d):
        super().__init__()
        self.branch0 = conv(1536, 256, 1)
        self.branch1_0 = conv(1536, 384, 1)
        self.branch1_1a = conv(384, 256, (1, 3), padding=(0, 1))
        self.branch1_1b = conv(384, 256, (3, 1), padding=(1, 0))
        self.branch2_0 = conv(1536, 384, 1)
        self.branch2_1 = conv(384, 448, (3, 1), padding=(1, 0))
        self.branch2_2 = conv(448, 512, (1, 3), padding=(0, 1))
        self.branch2_3a = conv(512, 256, (1, 3), padding=(0, 1))
        self.branch2_3b = conv(512, 256, (3, 1), padding=(1, 0))
        self.branch3 = nn.Sequential(average_pool_3x3(), conv(1536, 256, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.branch1_0(x)
        x2 = self.branch2_2(self.branch2_1(self.branch2_0(x)))
        return torch.cat(
            (
                self.branch0(x),
                self.branch1_1a(x1),
                self.branch1_1b(x1),
                self.branch2_3a(x2),
                self.branch2_3b(x2),
                self.branch3(x),
            ),
            1,
        )


class InceptionV4(nn.Module):
    def __init__(self, num_classes: int = 1000, conv: ConvFactory = BasicConv2d):
        super().__init__()
        self.features = nn.Sequential(
            *stem(conv),
            *[InceptionA(conv) for _ in range(4)],
            ReductionA(384, k=192, l=224, m=256, n=384, conv=conv),
            *[InceptionB(conv) for _ in range(7)],
            ReductionB(conv),
            *[InceptionC(conv) for _ in range(3)],
        )
        self.global_pool = nn.AdaptiveAvgPool2d(1)  # any input size >= 75 gives 1536 features
        self.last_linear = nn.Linear(1536, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.global_pool(self.features(x)).flatten(1)
        return self.last_linear(x)


def build(num_classes: int = 1000, input_size: int = 299) -> InceptionV4:
    check_input_size("inception_v4", input_size, INCEPTION_MIN_INPUT_SIZE)
    return InceptionV4(num_classes)
