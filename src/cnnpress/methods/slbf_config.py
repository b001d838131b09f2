"""SLBF's settings and the checks on them, below the layers and the budget planner that use them.

:class:`SLBFConfig` is what ``cnnpress.compress(model, "slbf", ...)`` takes; a size budget
(``target_size`` / ``target_ratio``) is turned into per-layer settings by ``cnnpress.budget``
before the method converts the model.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from cnnpress.errors import ConfigError
from cnnpress.methods.base import MethodConfig
from cnnpress.methods.slbf_init import check_init

__all__ = [
    "MAX_FILTERS",
    "SLBFConfig",
    "check_budget",
    "check_slices",
    "index_bits",
    "parse_size",
]

MAX_FILTERS = 2**16
_UNITS = {"": 1, "b": 1, "kb": 10**3, "kib": 2**10, "mb": 10**6, "mib": 2**20}
_UNITS |= {"gb": 10**9, "gib": 2**30}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")


def parse_size(value: Any) -> int:
    """Bytes from an int or a string such as "12KB" (1000 bytes a KB) or "12KiB" (1024)."""
    if isinstance(value, bool):
        value = None
    if isinstance(value, int) and value > 0:
        return value
    match = _SIZE.match(value) if isinstance(value, str) else None
    if match and match.group(2).lower() in _UNITS:
        size = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
        if size > 0:
            return size
    raise ConfigError(
        f"target_size must be a positive number of bytes or a size such as '12KB' (1000 bytes) "
        f"or '12KiB' (1024 bytes), got {value!r}"
    )


def check_budget(config: Any) -> None:
    """Validate the budget fields of an :class:`SLBFConfig` (one line per problem)."""
    if config.target_size is not None:
        parse_size(config.target_size)
    ratio = config.target_ratio
    if ratio is not None and (
        isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not ratio > 0
    ):
        raise ConfigError(f"target_ratio must be a positive number, got {ratio!r}")
    if config.target_size is not None and ratio is not None:
        raise ConfigError("give target_size or target_ratio, not both")
    reserve = config.header_reserve
    if isinstance(reserve, bool) or not isinstance(reserve, int) or reserve < 0:
        raise ConfigError(f"header_reserve must be a whole number of bytes >= 0, got {reserve!r}")
    share = config.budget_bank_share
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not share > 0:
        raise ConfigError(f"budget_bank_share must be a positive number, got {share!r}")
    cap = config.budget_max_filters
    if isinstance(cap, bool) or not isinstance(cap, int) or not 2 <= cap <= 2**16:
        raise ConfigError(f"budget_max_filters must be an integer from 2 to 65536, got {cap!r}")


def index_bits(num_filters: int) -> int:
    """Bits of one selection index into a bank of ``num_filters`` filters: ceil(log2 m)."""
    return max(1, math.ceil(math.log2(num_filters)))


def check_slices(in_channels: int, slice_channels: int, num_filters: int, where: str = "") -> None:
    """Refuse a slice width that does not divide ``in_channels`` or a bank size out of range."""
    at = f"layer {where}: " if where else ""
    if not isinstance(slice_channels, int) or slice_channels < 1:
        raise ConfigError(f"{at}slice_channels must be a positive integer, got {slice_channels!r}")
    if in_channels % slice_channels:
        divisors = [v for v in range(1, in_channels + 1) if in_channels % v == 0]
        raise ConfigError(
            f"{at}slice_channels {slice_channels} does not divide the {in_channels} input "
            f"channels; choose one of {divisors} "
            f"(per layer: layers: {{NAME: {{slice_channels: D}}}})"
        )
    if not isinstance(num_filters, int) or not 2 <= num_filters <= MAX_FILTERS:
        raise ConfigError(
            f"{at}num_filters must be an integer from 2 to {MAX_FILTERS}, got {num_filters!r}"
        )


@dataclass(frozen=True)
class SLBFConfig(MethodConfig):
    """SLBF settings (per layer overridable through ``layers``).

    Attributes:
        slice_channels: Slice width ``d`` (must divide each compressed layer's input channels).
        num_filters: Bank size ``m`` per layer (2 to 2**16).
        scale: Per-filter scales: ``None`` means on exactly where no BatchNorm follows.
        revive_unused: Re-seed a bank filter nobody selects from the worst-fitting slice at
            each training step (off only for the ablation).
        latent_gain: Divide the latent filters' straight-through gradient by each filter's
            mean ``|w_i|`` (off only for the ablation: the plain straight-through gradient).
        init: "random" (fresh bank and selections), "weights" (cluster the replaced layer's
            weights, ``cnnpress.methods.slbf_init``) or "auto" (= "weights": it is cheap).
        target_size: A file size budget: bytes (int) or a string such as "12KB" (KB = 1000
            bytes, KiB = 1024; ``cnnpress.budget``). Per-layer ``slice_channels`` and
            ``num_filters`` are then chosen to fit and written into ``layers``.
        target_ratio: A budget as fp32 parameter bytes over file bytes (instead of a size).
        float_bits, fold_batchnorm, entropy: How the file is saved (``MethodConfig``); the
            size budget sizes exactly that file.
        header_reserve: Bytes the budget keeps for the dataset spec and provenance that
            ``save`` adds to the header (a typical pair takes about 470).
        budget_max_filters: Largest bank size the budget tries (powers of two from 2).
        budget_bank_share: Largest bank the budget gives a layer of n filters, as a share of
            n (default 0.5: every budgeted layer does at most half the dense layer's work).
    """

    slice_channels: int = 8
    num_filters: int = 16
    scale: bool | None = None
    revive_unused: bool = True
    latent_gain: bool = True
    init: str = "auto"
    target_size: int | str | None = None
    target_ratio: float | None = None
    header_reserve: int = 1000
    budget_max_filters: int = 256
    budget_bank_share: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.slice_channels, int) or self.slice_channels < 1:
            raise ConfigError(
                f"slice_channels must be a positive integer, got {self.slice_channels!r}"
            )
        if not isinstance(self.num_filters, int) or not 2 <= self.num_filters <= MAX_FILTERS:
            raise ConfigError(
                f"num_filters must be an integer from 2 to {MAX_FILTERS}, got {self.num_filters!r}"
            )
        check_init(self.init)
        check_budget(self)
