"""Lightweight backbones for small images.

``mobilenetv2``: Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks",
CVPR 2018 — inverted residual blocks (1x1 expand, 3x3 depthwise, 1x1 linear projection).
``shufflenetv2``: Ma et al., "ShuffleNet V2: Practical Guidelines for Efficient CNN
Architecture Design", ECCV 2018 — channel split, depthwise conv and channel shuffle.
Both in their common CIFAR form: a stride-1 stem and the first strided stages made stride 1
so that 28x28 and 32x32 inputs keep enough resolution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cnnpress.models.registry import MODELS

__all__ = ["MobileNetV2", "ShuffleNetV2", "mobilenetv2", "shufflenetv2"]


def _conv_bn(c_in: int, c_out: int, k: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
    ]


class InvertedResidual(nn.Module):
    """Expand (1x1), depthwise (3x3), project (1x1, linear); identity shortcut if shapes match."""

    def __init__(self, c_in: int, c_out: int, expansion: int, stride: int) -> None:
        super().__init__()
        hidden = c_in * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers += [*_conv_bn(c_in, hidden, 1), nn.ReLU6()]
        layers += [*_conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU6()]
        layers += _conv_bn(hidden, c_out, 1)
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return x + out if self.residual else out


class MobileNetV2(nn.Module):
    """MobileNetV2 (width multiplier ``width``) for 28x28/32x32 images."""

    # expansion, channels, blocks, stride (CIFAR form: the paper's first two strides are 1)
    CFG = (
        (1, 16, 1, 1),
        (6, 24, 2, 1),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    )

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: float = 1.0) -> None:
        super().__init__()

        def w(c: int) -> int:
            return max(8, int(round(c * width / 8)) * 8)

        c = w(32)
        layers: list[nn.Module] = [*_conv_bn(in_channels, c, 3), nn.ReLU6()]
        for expansion, channels, blocks, stride in self.CFG:
            for b in range(blocks):
                layers.append(InvertedResidual(c, w(channels), expansion, stride if b == 0 else 1))
                c = w(channels)
        last = max(1280, w(1280))
        layers += [*_conv_bn(c, last, 1), nn.ReLU6()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(last, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)
        return self.classifier(x)


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave the channels of ``groups`` groups."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2 unit: stride 1 splits the channels in half; stride 2 uses both branches."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        mid = c_out // 2
        branch_in = c_in if stride == 2 else c_in // 2
        self.branch = nn.Sequential(
            *_conv_bn(branch_in, mid, 1),
            nn.ReLU(),
            *_conv_bn(mid, mid, 3, stride, groups=mid),
            *_conv_bn(mid, mid, 1),
            nn.ReLU(),
        )
        self.shortcut = (
            nn.Sequential(
                *_conv_bn(c_in, c_in, 3, stride, groups=c_in), *_conv_bn(c_in, mid, 1), nn.ReLU()
            )
            if stride == 2
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shortcut is None:
            keep, x = x.chunk(2, dim=1)
            out = torch.cat([keep, self.branch(x)], dim=1)
        else:
            out = torch.cat([self.shortcut(x), self.branch(x)], dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    """ShuffleNetV2; ``width`` picks the paper's 0.5x / 1x / 1.5x / 2x channel table."""

    TABLE = {
        0.5: (48, 96, 192, 1024),
        1.0: (116, 232, 464, 1024),
        1.5: (176, 352, 704, 1024),
        2.0: (244, 488, 976, 2048),
    }

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: float = 1.0) -> None:
        super().__init__()
        if width not in self.TABLE:
            raise ValueError(f"shufflenetv2 width must be one of {sorted(self.TABLE)}")
        *stages, last = self.TABLE[width]
        c = 24
        layers: list[nn.Module] = [*_conv_bn(in_channels, c, 3), nn.ReLU()]
        for channels, blocks in zip(stages, (4, 8, 4), strict=True):
            for b in range(blocks):
                layers.append(ShuffleUnit(c, channels, 2 if b == 0 else 1))
                c = channels
        layers += [*_conv_bn(c, last, 1), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(last, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)
        return self.classifier(x)


@MODELS.register("mobilenetv2")
def mobilenetv2(in_channels: int = 3, num_classes: int = 10, width: float = 1.0) -> MobileNetV2:
    """MobileNetV2, CIFAR form."""
    return MobileNetV2(in_channels, num_classes, width)


@MODELS.register("shufflenetv2")
def shufflenetv2(in_channels: int = 3, num_classes: int = 10, width: float = 1.0) -> ShuffleNetV2:
    """ShuffleNetV2, CIFAR form (stride-1 stem, no max-pooling)."""
    return ShuffleNetV2(in_channels, num_classes, width)
