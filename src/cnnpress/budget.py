"""Compress to a size budget: per-layer SLBF settings chosen so that the real file fits.

``cnnpress.compress(model, "slbf", target_size="12KB")`` (or ``target_ratio=100``) picks, for
every layer SLBF compresses, a slice width ``d`` from {1, 2, 4, 8, 16, 32} (the divisors of the
layer's input channels among them; else its largest divisor up to 32) and a bank size ``m``
(powers of two from 2 to ``budget_max_filters``, fewer than the layer's ``n*s`` slices, since
with one filter per slice SLBF is BWN plus index bits, and at most ``budget_bank_share * n``,
since a layer's binary work is ``m*c*k*k`` MACs per pixel against the dense ``n*c*k*k``: at
the default 0.5 every budgeted layer does at most half the dense work), guided by each
layer's sensitivity: the relative error, with the best scale per filter, of the SLBF
approximation that ``slbf_init.cluster`` finds for the layer's current weights at that
``(d, m)``.

Search (greedy for the multiple-choice knapsack): every layer starts at its smallest setting;
then, while bytes are left, take the upgrade (any larger setting of one layer) with the largest
drop of ``err^2`` per byte that still fits. The objective is the sum over layers of ``err^2``
(each layer's noise-to-signal power, which adds up roughly along the network; a log-SNR
objective, -sum log(1 - err^2), was tried on a trained ResNet-20 and was no better).

The size is exact: a candidate model is built and written by ``cnnpress.format.save`` (header,
payload, checksum), plus ``header_reserve`` bytes (default 1000) for the dataset spec and the
provenance that the final ``save`` adds to the header and that are unknown here (Fashion-MNIST's
spec and a provenance with command, commit, machine and accuracy take about 470). A file saved
with ``float16=True`` needs ``float_bits=16`` in the config. Upgrades that overshoot the exact
size (the header grows by a few bytes with the settings it records) are undone, latest first.

Sizes: an int is bytes; strings take B, KB/kB (1000 bytes), KiB (1024), MB (10^6), MiB (2^20),
GB, GiB, case-insensitively ("12kb" = 12000 bytes). A ratio is fp32 parameter bytes (4 x every
parameter and inference buffer of the model as given) over file bytes, as ``cnnpress.summary``
reports it. The chosen settings go into ``layers`` as exact layer names (merged into an entry of
the same name when the user gave one) and the targets are cleared, so the recorded config
rebuilds the same shapes. A layer whose ``layers`` entry sets ``slice_channels`` or
``num_filters`` keeps that value; the top-level ``slice_channels``/``num_filters`` are unused.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cnnpress.cost import inference_numel
from cnnpress.errors import ConfigError
from cnnpress.format import save
from cnnpress.format.layout import nbytes
from cnnpress.methods.base import select_layers
from cnnpress.methods.slbf import SLBF
from cnnpress.methods.slbf_config import check_budget, check_slices, index_bits, parse_size
from cnnpress.methods.slbf_init import cluster, scaled_error, slices_of
from cnnpress.models import arch_of

__all__ = [
    "SLICE_CHOICES",
    "Candidate",
    "Plan",
    "budget_bytes",
    "candidates",
    "check_budget",
    "file_size",
    "fp32_bytes",
    "parse_size",
    "plan",
    "resolve_budget",
    "smallest",
]

SLICE_CHOICES = (1, 2, 4, 8, 16, 32)
#: The planner clusters each candidate bank from at most this many slices (whole filters drawn
#: at random; every ResNet-20 layer has fewer, so only wide layers are sampled). Clustering
#: all 262,144 slices of a 512x512 VGG-16 layer per candidate made planning take minutes.
PLAN_SLICES = 16384


def fp32_bytes(model: nn.Module) -> int:
    """4 bytes per parameter and inference buffer (not ``num_batches_tracked``) of ``model``."""
    return 4 * sum(inference_numel(m) for m in model.modules())


def budget_bytes(model: nn.Module, config: Any) -> int | None:
    """The byte budget ``config`` asks for (``None`` without a target)."""
    if config.target_size is not None:
        return parse_size(config.target_size)
    if config.target_ratio is not None:
        return math.floor(fp32_bytes(model) / config.target_ratio)
    return None


@dataclass(frozen=True)
class Candidate:
    """One setting of one layer: its variable bytes (bank + indices) and its error."""

    slice_channels: int
    num_filters: int
    bytes: int
    error: float


@dataclass
class Plan:
    """The chosen settings: per layer a :class:`Candidate`, and the exact file bytes.

    ``file_bytes`` and ``minimum_bytes`` include ``header_reserve``; ``error`` is the sum of
    the chosen layers' squared errors (the search objective).
    """

    budget: int
    file_bytes: int
    minimum_bytes: int
    layers: dict[str, Candidate]
    error: float

    def overrides(self) -> dict[str, dict[str, int]]:
        """``{layer: {slice_channels, num_filters}}`` for the config's ``layers``."""
        return {
            name: {"slice_channels": c.slice_channels, "num_filters": c.num_filters}
            for name, c in self.layers.items()
        }


def _dims(module: nn.Module) -> tuple[int, int, int]:
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return module.out_channels, module.in_channels, kh * kw
    return module.out_features, module.in_features, 1


def candidates(
    module: nn.Module,
    overrides: dict[str, Any],
    max_filters: int,
    name: str = "",
    bank_share: float = 1.0,
    sample: int | None = PLAN_SLICES,
) -> list[Candidate]:
    """The Pareto front (fewer bytes, lower error) of a layer's settings, by bytes.

    ``overrides`` are the layer's ``layers`` settings: a ``slice_channels`` or ``num_filters``
    there is kept as the only choice. Each bank is clustered from the slices of at most
    ``sample`` slices' worth of filters (``None``: all); the error is that of every filter.
    """
    n, c, kk = _dims(module)
    if "slice_channels" in overrides or "num_filters" in overrides:
        check_slices(c, overrides.get("slice_channels", c), overrides.get("num_filters", 2), name)
    if "slice_channels" in overrides:
        widths = [overrides["slice_channels"]]
    else:
        widths = [d for d in SLICE_CHOICES if c % d == 0]
        widths = widths or [max(d for d in range(1, SLICE_CHOICES[-1] + 1) if c % d == 0)]
    weight = module.weight.detach()
    found = []
    for d in widths:
        s = c // d
        if "num_filters" in overrides:
            sizes = [overrides["num_filters"]]
        else:
            below_slices = 2 ** max(1, math.ceil(math.log2(n * s)) - 1)  # m < n*s
            top = max(2, min(max_filters, below_slices, int(bank_share * n)))
            sizes = [2**b for b in range(1, int(math.log2(top)) + 1)]
        x = slices_of(weight, d)
        fit = _some_filters(x, sample)
        for m in sizes:
            bank = cluster(fit, m)[0]
            idx = (x.reshape(n * s, -1) @ bank.T).argmax(1)
            error = scaled_error(x.reshape(n, -1), bank[idx].reshape(n, -1))[1]
            size = nbytes("u1", (m, d * kk)) + nbytes(f"u{index_bits(m)}", (n, s))
            found.append(Candidate(d, m, size, error))
    front: list[Candidate] = []
    for cand in sorted(found, key=lambda x: (x.bytes, x.error)):
        if not front or cand.error < front[-1].error:
            front.append(cand)
    return front


def _fronts(model: nn.Module, config: Any, sample: int | None) -> dict[str, list[Candidate]]:
    """Every budgeted layer's :func:`candidates`, by name."""
    return {
        name: candidates(
            module, overrides, config.budget_max_filters, name, config.budget_bank_share, sample
        )
        for name, module, overrides in select_layers(model, config)
    }


def _some_filters(x: torch.Tensor, sample: int | None) -> torch.Tensor:
    """``x`` (n, s, D), or the slices of a fixed random subset of its filters holding about
    ``sample`` slices (the same subset on every call)."""
    n, s, _ = x.shape
    if sample is None or n * s <= sample:
        return x
    keep = max(1, sample // s)
    pick = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:keep]
    return x[pick.sort().values]


def _with_layers(config: Any, chosen: dict[str, dict[str, int]]) -> Any:
    """``config`` with the chosen settings in ``layers`` and the targets cleared."""
    layers = dict(config.layers)
    for name, values in chosen.items():
        old = layers.get(name)
        layers[name] = {**old, **values} if isinstance(old, dict) else dict(values)
    return dataclasses.replace(config, layers=layers, target_size=None, target_ratio=None)


def file_size(model: nn.Module, config: Any) -> int:
    """Exact bytes of the ``.cnnp`` file of ``compress(model, "slbf", config)``.

    Saved with no dataset and no provenance, as the config says (``float_bits``,
    ``fold_batchnorm``, ``entropy``); the global RNG is left as it was.
    """

    arch = arch_of(model)  # a user's network is traced (an error if it cannot be)
    with torch.random.fork_rng(devices=[]):
        candidate = SLBF().convert(copy.deepcopy(model), dataclasses.replace(config, init="random"))
    candidate.cnnpress_method = {"name": "slbf", "config": config.to_dict()}
    candidate.cnnpress_arch = arch
    candidate.cnnpress_dataset = candidate.cnnpress_provenance = None
    with tempfile.TemporaryDirectory() as tmp:
        return save(candidate, Path(tmp) / "size.cnnp")


def plan(model: nn.Module, config: Any, sample: int | None = PLAN_SLICES) -> Plan:
    """Choose per-layer ``(d, m)`` for the budget of ``config`` (see the module docstring).

    Args:
        sample: Slices each candidate bank is clustered from (:func:`candidates`).

    Raises:
        ConfigError: No target in ``config``, or even the smallest settings do not fit.
    """
    budget = budget_bytes(model, config)
    if budget is None:
        raise ConfigError("no budget: give target_size or target_ratio")
    fronts = _fronts(model, config, sample)
    search = _Search(model, config, fronts)
    minimum = search.exact()
    if minimum > budget:
        raise _unmet(config, budget, minimum)
    # The estimates count raw index bits; entropy coding and the header make the real file
    # differ, so measure it, undo what overshoots, and spend what the estimate left over.
    size, left = minimum, budget - minimum - 32  # room for the header growing with settings
    for _ in range(4):
        if not search.grow(left):
            break
        size = search.exact()
        while size > budget and search.history:
            search.undo()
            size = search.exact()
        left = budget - size - 32
        if left <= 0:
            break
    chosen = search.chosen()
    return Plan(budget, size, minimum, chosen, sum(c.error**2 for c in chosen.values()))


class _Search:
    """The greedy search over the layers' fronts: one choice per layer, upgraded by the best
    error gain per byte, with the history of upgrades to undo."""

    def __init__(self, model: nn.Module, config: Any, fronts: dict[str, list[Candidate]]):
        self.model, self.config, self.fronts = model, config, fronts
        self.choice = dict.fromkeys(fronts, 0)
        self.history: list[tuple[str, int]] = []

    def chosen(self) -> dict[str, Candidate]:
        return {n: f[self.choice[n]] for n, f in self.fronts.items()}

    def settings(self) -> dict[str, dict[str, int]]:
        """The current choice as ``{layer: {slice_channels, num_filters}}``."""
        return {
            n: {"slice_channels": c.slice_channels, "num_filters": c.num_filters}
            for n, c in self.chosen().items()
        }

    def exact(self) -> int:
        """The file bytes of the current choice, measured (plus ``header_reserve``)."""
        config = _with_layers(self.config, self.settings())
        return file_size(self.model, config) + self.config.header_reserve

    def _best(self, left: int) -> tuple[float, str, int] | None:
        best: tuple[float, str, int] | None = None
        for name, front in self.fronts.items():
            now = front[self.choice[name]]
            for j in range(self.choice[name] + 1, len(front)):
                extra = front[j].bytes - now.bytes
                if extra > left:
                    break
                gain = (now.error**2 - front[j].error ** 2) / max(extra, 1)
                if best is None or gain > best[0]:
                    best = (gain, name, j)
        return best

    def grow(self, left: int) -> bool:
        """Greedy upgrades within ``left`` estimated bytes; whether any was taken."""
        took = False
        while (best := self._best(left)) is not None:
            _, name, j = best
            left -= self.fronts[name][j].bytes - self.fronts[name][self.choice[name]].bytes
            self.history.append((name, self.choice[name]))
            self.choice[name] = j
            took = True
        return took

    def undo(self) -> None:
        name, previous = self.history.pop()
        self.choice[name] = previous


def smallest(model: nn.Module, config: Any, sample: int | None = PLAN_SLICES) -> Any:
    """``config`` with every budgeted layer at its smallest setting (where :func:`plan`
    starts: the smallest file the budget can give) and the targets cleared."""
    fronts = _fronts(model, config, sample)
    return _with_layers(config, _Search(model, config, fronts).settings())


def _unmet(config: Any, budget: int, minimum: int) -> ConfigError:
    """The error for a budget below the smallest file, with what would make it smaller."""
    off = (
        ("float_bits=8", config.float_bits != 8),
        ("fold_batchnorm", not config.fold_batchnorm),
        ("entropy", not config.entropy),
    )
    smaller = [flag for flag, is_off in off if is_off]
    hint = "compress more layers (include_linear, include_first)"
    if smaller:
        hint = f"save smaller ({', '.join(smaller)}) or {hint}"
    return ConfigError(
        f"the budget of {budget:,} bytes cannot be met: the smallest settings give a file of "
        f"{minimum:,} bytes (with header_reserve {config.header_reserve}); raise the target "
        f"or {hint}"
    )


def resolve_budget(model: nn.Module, config: Any) -> Any:
    """``config`` with a budget turned into per-layer settings; unchanged without one (and for
    the methods whose configs have no budget fields)."""
    targets = (getattr(config, "target_size", None), getattr(config, "target_ratio", None))
    if targets == (None, None):
        return config
    return _with_layers(config, plan(model, config).overrides())
