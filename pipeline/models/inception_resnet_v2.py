"""Inception-ResNet-v2, as published with ImageNet weights (TF-slim's checkpoint, re-hosted by timm as
`inception_resnet_v2.tf_in1k`).

The published network is not exactly the paper's Figure 15, and it is the one built here because it is
the only Inception-ResNet-v2 with ImageNet weights:

- Stem: not Inception-v4's (Figure 3) but a plain sequence of convs and pools (conv2d_1a ... conv2d_4a,
  then 3x3 max-pool) followed by an Inception block `mixed_5b` (1x1 | 1x1 -> 5x5 | 1x1 -> 3x3 -> 3x3 |
  avg-pool -> 1x1), giving 35x35x320 instead of 35x35x384.
- Widths: the residual blocks carry 320 (35x35), 1088 (17x17) and 2080 (8x8) channels, where the
  paper's figures print 384 (Figure 16), 1154 (Figure 17) and 2048 (Figure 19) for the linear 1x1
  projections; the branches inside the blocks and both reductions have the paper's widths.
- Depth: 10 Inception-ResNet-A, 20 Inception-ResNet-B and 9 + 1 Inception-ResNet-C blocks (the paper:
  5, 10 and 5); the last 8x8 block has residual scale 1 and no ReLU, and a final 1x1 conv
  (`conv2d_7b`, 1536 channels) precedes the average pooling.
- Residual scales 0.17, 0.10 and 0.20 for the 35x35, 17x17 and 8x8 blocks (the paper only says
  "between 0.1 and 0.3"); `residual_scales=(a, b, c)` changes them.

Attribute names follow the checkpoint (classifier: `classif`), so it loads without remapping.
The residual blocks take their widths as arguments: Inception-ResNet-v1 builds the same blocks with
the paper's narrower widths.
"""

from __future__ import annotations

from collections.abc import Sequence

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

HEAD = "classif"
DEFAULT_RESIDUAL_SCALES = (0.17, 0.10, 0.20)


class Mixed5b(nn.Module):
    """End of the published stem: an Inception block turning 35x35x192 into 35x35x320."""

    def __init__(self, conv: ConvFactory = BasicConv2d):
        super().__init__()
        self.branch0 = conv(192, 96, 1)
        self.branch1 = nn.Sequential(conv(192, 48, 1), conv(48, 64, 5, padding=2))
        self.branch2 = nn.Sequential(conv(192, 64, 1), conv(64, 96, 3, padding=1), conv(96, 96, 3, padding=1))
        self.branch3 = nn.Sequential(average_pool_3x3(), conv(192, 64, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.branch0(x), self.branch1(x), self.branch2(x), self.branch3(x)), 1)


class Block35(nn.Module):
    """Inception-ResNet-A, 35x35 (Figures 10 and 16): 1x1 | 1x1 -> 3x3 | 1x1 -> 3x3 -> 3x3."""

    def __init__(
        self,
        channels: int,
        width0: int,
        widths1: tuple[int, int],
        widths2: tuple[int, int, int],
        scale: float,
        conv: ConvFactory = BasicConv2d,
    ):
        super().__init__()
        self.scale = float(scale)  # a python float: one constant Mul in the ONNX graph
        self.branch0 = conv(channels, width0, 1)
        self.branch1 = nn.Sequential(conv(channels, widths1[0], 1), conv(widths1[0], widths1[1], 3, padding=1))
        self.branch2 = nn.Sequential(
            conv(channels, widths2[0], 1),
            conv(widths2[0], widths2[1], 3, padding=1),
            conv(widths2[1], widths2[2], 3, padding=1),
        )
        # The residual projection is linear: a plain conv with bias, no batch-norm, no ReLU.
        self.conv2d = nn.Conv2d(width0 + widths1[1] + widths2[2], channels, 1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.cat((self.branch0(x), self.branch1(x), self.branch2(x)), 1)
        out = self.conv2d(out)
        return self.relu(out * self.scale + x)


class FactorizedResidualBlock(nn.Module):
    """Inception-ResNet-B and -C share one shape: 1x1 | 1x1 -> 1xk -> kx1, a linear 1x1 projection,
    scaled and added to the input. Only the factorised kernel k differs (7 at 17x17, 3 at 8x8)."""

    def __init__(
        self,
        channels: int,
        width0: int,
        widths1: tuple[int, int, int],
        scale: float,
        kernel: int,
        relu: bool = True,
        conv: ConvFactory = BasicConv2d,
    ):
        super().__init__()
        self.scale = float(scale)
        pad = kernel // 2
        self.branch0 = conv(channels, width0, 1)
        self.branch1 = nn.Sequential(
            conv(channels, widths1[0], 1),
            conv(widths1[0], widths1[1], (1, kernel), padding=(0, pad)),
            conv(widths1[1], widths1[2], (kernel, 1), padding=(pad, 0)),
        )
        self.conv2d = nn.Conv2d(width0 + widths1[2], channels, 1)
        self.relu = nn.ReLU(inplace=True) if relu else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.cat((self.branch0(x), self.branch1(x)), 1)
        out = self.conv2d(out)
        return self.relu(out * self.scale + x)


class Block17(FactorizedResidualBlock):
    """Inception-ResNet-B, 17x17 (Figures 11 and 17): 1x1 | 1x1 -> 1x7 -> 7x1."""

    def __init__(self, channels: int, width0: int, widths1: tuple[int, int, int], scale: float,
                 conv: ConvFactory = BasicConv2d):
        super().__init__(channels, width0, widths1, scale, kernel=7, conv=conv)


class Block8(FactorizedResidualBlock):
    """Inception-ResNet-C, 8x8 (Figures 13 and 19): 1x1 | 1x1 -> 1x3 -> 3x1; the last block of the
    published network has scale 1 and no ReLU."""

    def __init__(self, channels: int, width0: int, widths1: tuple[int, int, int], scale: float,
                 relu: bool = True, conv: ConvFactory = BasicConv2d):
        super().__init__(channels, width0, widths1, scale, kernel=3, relu=relu, conv=conv)


class ReductionB(nn.Module):
    """17x17 -> 8x8 grid reduction of the Inception-ResNets (Figures 12 and 18):
    1x1 -> 3x3/2 | 1x1 -> 3x3/2 | 1x1 -> 3x3 -> 3x3/2 | 3x3/2 max-pool."""

    def __init__(
        self,
        in_channels: int,
        widths0: tuple[int, int],
        widths1: tuple[int, int],
        widths2: tuple[int, int, int],
        conv: ConvFactory = BasicConv2d,
    ):
        super().__init__()
        self.branch0 = nn.Sequential(conv(in_channels, widths0[0], 1), conv(widths0[0], widths0[1], 3, stride=2))
        self.branch1 = nn.Sequential(conv(in_channels, widths1[0], 1), conv(widths1[0], widths1[1], 3, stride=2))
        self.branch2 = nn.Sequential(
            conv(in_channels, widths2[0], 1),
            conv(widths2[0], widths2[1], 3, padding=1),
            conv(widths2[1], widths2[2], 3, stride=2),
        )
        self.branch3 = nn.MaxPool2d(3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.branch0(x), self.branch1(x), self.branch2(x), self.branch3(x)), 1)


def check_residual_scales(residual_scales: Sequence[float]) -> tuple[float, float, float]:
    scales = tuple(float(s) for s in residual_scales)
    if len(scales) != 3:
        from pipeline.errors import PipelineError

        raise PipelineError(
            f"residual_scales needs three values (35x35, 17x17 and 8x8 blocks), got {list(residual_scales)}"
        )
    return scales


class InceptionResnet(nn.Module):
    """What both Inception-ResNets share: the first six stem layers (3x3/2, 3x3, 3x3, max-pool, 1x1,
    3x3 -> 35x35x192 on 299 input) of the paper's Figure 14, which the published Inception-ResNet-v2
    stem also starts with, under the checkpoint's names."""

    def _add_stem_convs(self, conv: ConvFactory) -> None:
        self.conv2d_1a = conv(3, 32, 3, stride=2)
        self.conv2d_2a = conv(32, 32, 3)
        self.conv2d_2b = conv(32, 64, 3, padding=1)
        self.maxpool_3a = nn.MaxPool2d(3, stride=2)
        self.conv2d_3b = conv(64, 80, 1)
        self.conv2d_4a = conv(80, 192, 3)

    def _stem_convs(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2d_2b(self.conv2d_2a(self.conv2d_1a(x)))
        return self.conv2d_4a(self.conv2d_3b(self.maxpool_3a(x)))


class InceptionResnetV2(InceptionResnet):
    def __init__(
        self,
        num_classes: int = 1000,
        residual_scales: Sequence[float] = DEFAULT_RESIDUAL_SCALES,
        conv: ConvFactory = BasicConv2d,
    ):
        super().__init__()
        scale_a, scale_b, scale_c = check_residual_scales(residual_scales)
        self._add_stem_convs(conv)
        self.maxpool_5a = nn.MaxPool2d(3, stride=2)
        self.mixed_5b = Mixed5b(conv)
        self.repeat = nn.Sequential(*[Block35(320, 32, (32, 32), (32, 48, 64), scale_a, conv) for _ in range(10)])
        self.mixed_6a = ReductionA(320, k=256, l=256, m=384, n=384, conv=conv)
        self.repeat_1 = nn.Sequential(*[Block17(1088, 192, (128, 160, 192), scale_b, conv) for _ in range(20)])
        self.mixed_7a = ReductionB(1088, (256, 384), (256, 288), (256, 288, 320), conv)
        self.repeat_2 = nn.Sequential(*[Block8(2080, 192, (192, 224, 256), scale_c, conv=conv) for _ in range(9)])
        self.block8 = Block8(2080, 192, (192, 224, 256), 1.0, relu=False, conv=conv)
        self.conv2d_7b = conv(2080, 1536, 1)
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.classif = nn.Linear(1536, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mixed_5b(self.maxpool_5a(self._stem_convs(x)))
        x = self.mixed_6a(self.repeat(x))
        x = self.mixed_7a(self.repeat_1(x))
        x = self.conv2d_7b(self.block8(self.repeat_2(x)))
        return self.classif(self.global_pool(x).flatten(1))


def build(
    num_classes: int = 1000,
    input_size: int = 299,
    residual_scales: Sequence[float] = DEFAULT_RESIDUAL_SCALES,
) -> InceptionResnetV2:
    check_input_size("inception_resnet_v2", input_size, INCEPTION_MIN_INPUT_SIZE)
    return InceptionResnetV2(num_classes, residual_scales)
