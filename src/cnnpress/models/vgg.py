"""VGG networks with BatchNorm for small images.

``vgg16`` is configuration D of Simonyan & Zisserman ("Very Deep Convolutional Networks for
Large-Scale Image Recognition", ICLR 2015) with BatchNorm and one linear classifier, as used on
CIFAR-10. ``vgg_small`` is the 6-conv VGG of the binary-network literature (Zhang et al.,
LQ-Nets, ECCV 2018). Max-pooling uses ceil mode so that 28x28 inputs survive five poolings.
"""

from __future__ import annotations

import torch
from torch import nn

from cnnpress.models.registry import MODELS

__all__ = ["VGG", "vgg16", "vgg_small"]

_CFG = {
    "vgg16": [
        64,
        64,
        "M",
        128,
        128,
        "M",
        256,
        256,
        256,
        "M",
        512,
        512,
        512,
        "M",
        512,
        512,
        512,
        "M",
    ],
    "vgg_small": [128, 128, "M", 256, 256, "M", 512, 512, "M"],
}


class VGG(nn.Module):
    """Conv-BN-ReLU stacks with max-pooling, global average pooling and a linear classifier."""

    def __init__(self, cfg: list, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU()]
                c = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.classifier(x)


@MODELS.register("vgg16")
def vgg16(in_channels: int = 3, num_classes: int = 10) -> VGG:
    """VGG-16 (configuration D) with BatchNorm."""
    return VGG(_CFG["vgg16"], in_channels, num_classes)


@MODELS.register("vgg_small")
def vgg_small(in_channels: int = 3, num_classes: int = 10) -> VGG:
    """VGG-Small: 128-128-M-256-256-M-512-512-M."""
    return VGG(_CFG["vgg_small"], in_channels, num_classes)
