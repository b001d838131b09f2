"""Knowledge distillation (Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural
Network", 2015): train any model, compressed or not, towards a teacher's softened outputs.

    loss = (1 - alpha) * CE(z_s, y) + alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T))

The T^2 factor keeps the soft-target gradients on the scale of the hard-target ones.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from cnnpress.errors import ConfigError
from cnnpress.typecheck import check_value

__all__ = ["kd_loss", "make_kd_loss"]


def kd_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 4.0,
    alpha: float = 0.9,
) -> torch.Tensor:
    """Hinton's distillation loss (see the module docstring)."""
    hard = F.cross_entropy(student, targets)
    soft = F.kl_div(
        F.log_softmax(student / temperature, dim=1),
        F.log_softmax(teacher / temperature, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    return (1.0 - alpha) * hard + alpha * temperature**2 * soft


def make_kd_loss(
    teacher: nn.Module, temperature: float = 4.0, alpha: float = 0.9
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """A ``loss_fn(logits, targets, inputs)`` for the training loop; the teacher stays frozen."""
    check_value("--kd-temperature", temperature, float)
    check_value("--kd-alpha", alpha, float)
    if not temperature > 0:
        raise ConfigError(f"--kd-temperature must be positive, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"--kd-alpha must lie in [0, 1], got {alpha}")
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)

    def loss(out: torch.Tensor, targets: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            t = teacher(inputs)
        return kd_loss(out, t, targets, temperature, alpha)

    return loss
