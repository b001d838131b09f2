"""CIFAR-style ResNets (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016).

Three stages of ``n`` basic blocks at widths 16, 32, 64 (times ``width``); depth = 6n + 2.
Shortcuts that change shape are option A of the paper: stride-2 subsampling and zero-padded
channels, so they hold no parameters (ResNet-20 has 0.27 M parameters).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cnnpress.models.registry import MODELS

__all__ = ["BasicBlock", "CifarResNet", "resnet20", "resnet32", "resnet56"]


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (option A) shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride = stride
        self.pad = planes - in_planes

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.pad:
            x = F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for small images; global average pooling makes it size-agnostic."""

    def __init__(
        self, blocks: int, in_channels: int = 3, num_classes: int = 10, width: int = 16
    ) -> None:
        super().__init__()
        widths = (width, 2 * width, 4 * width)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        layers = []
        in_planes = widths[0]
        for stage, planes in enumerate(widths):
            stage_blocks = []
            for b in range(blocks):
                stride = 2 if stage > 0 and b == 0 else 1
                stage_blocks.append(BasicBlock(in_planes, planes, stride))
                in_planes = planes
            layers.append(nn.Sequential(*stage_blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.fc = nn.Linear(widths[2], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


@MODELS.register("resnet20")
def resnet20(in_channels: int = 3, num_classes: int = 10, width: int = 16) -> CifarResNet:
    """ResNet-20: three blocks per stage."""
    return CifarResNet(3, in_channels, num_classes, width)


@MODELS.register("resnet32")
def resnet32(in_channels: int = 3, num_classes: int = 10, width: int = 16) -> CifarResNet:
    """ResNet-32: five blocks per stage."""
    return CifarResNet(5, in_channels, num_classes, width)


@MODELS.register("resnet56")
def resnet56(in_channels: int = 3, num_classes: int = 10, width: int = 16) -> CifarResNet:
    """ResNet-56: nine blocks per stage."""
    return CifarResNet(9, in_channels, num_classes, width)
