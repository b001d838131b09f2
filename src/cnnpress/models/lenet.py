"""LeNet-5 (LeCun et al., "Gradient-Based Learning Applied to Document Recognition", 1998).

The classic 6-16 conv / 120-84 dense layout with ReLU and max-pooling; the first conv pads
28x28 inputs to the 32x32 of the paper, so 28x28 and 32x32 images both work.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cnnpress.models.registry import MODELS

__all__ = ["LeNet5", "lenet5"]


class LeNet5(nn.Module):
    """conv5(6) - pool - conv5(16) - pool - fc120 - fc84 - fc(num_classes)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.adaptive_avg_pool2d(x, 5)  # 5x5 from 28x28 or 32x32 inputs (then the identity)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


@MODELS.register("lenet5")
def lenet5(in_channels: int = 1, num_classes: int = 10) -> LeNet5:
    """LeNet-5."""
    return LeNet5(in_channels, num_classes)
