"""Training settings: one frozen, validated dataclass."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from cnnpress.errors import ConfigError
from cnnpress.typecheck import check_fields

__all__ = ["TrainConfig"]


@dataclass(frozen=True)
class TrainConfig:
    """How to train.

    Attributes:
        epochs: Passes over the training split.
        batch_size: Samples per step.
        optimizer: ``"sgd"`` (momentum, Nesterov off) or ``"adam"``.
        lr: Peak learning rate.
        momentum: SGD momentum.
        weight_decay: L2 penalty (not applied to XNOR-Net's input thresholds).
        warmup_epochs: Linear warm-up before the cosine decay.
        label_smoothing: Cross-entropy label smoothing.
        bn_recalibrate: Batches used to re-estimate BatchNorm statistics before each
            evaluation (0 = off). Useful where selections flip and running statistics lag.
        slimming_l1: When > 0, ``slimming_l1 * sum |gamma|`` over every BatchNorm scale is
            added to the loss: network slimming's sparsity training (Liu et al., ICCV 2017),
            whose small scales ``filter_prune`` with ``criterion="bn", scope="global"`` then
            removes.
        seed: Seed of initialisation, data order and augmentation.
        eval_every: Evaluate on the test split every this many epochs (and at the end).
    """

    epochs: int = 30
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    bn_recalibrate: int = 0
    slimming_l1: float = 0.0
    seed: int = 0
    eval_every: int = 1

    def __post_init__(self) -> None:
        check_fields(type(self), dataclasses.asdict(self))  # lr: fast, epochs: true, ...
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise ConfigError(f"epochs must be a positive integer, got {self.epochs!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if self.optimizer not in ("sgd", "adam"):
            raise ConfigError(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be positive, got {self.lr!r}")
        for name in ("momentum", "weight_decay", "warmup_epochs", "label_smoothing", "slimming_l1"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative, got {getattr(self, name)!r}")
        if self.bn_recalibrate < 0 or self.eval_every < 1:
            raise ConfigError("bn_recalibrate must be >= 0 and eval_every >= 1")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        if not isinstance(values, dict):
            raise ConfigError(f"the training settings must be a mapping, got {values!r:.60}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(key) for key in values if key not in known)
        if unknown:
            raise ConfigError(
                f"unknown training setting(s) {', '.join(unknown)}; "
                f"valid: {', '.join(sorted(known))}"
            )
        return cls(**values)
