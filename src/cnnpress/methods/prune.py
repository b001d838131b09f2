"""Pruning: single weights by magnitude (``magnitude_prune``), whole filters (``filter_prune``).

``magnitude_prune`` (Han et al., "Learning both Weights and Connections for Efficient Neural
Networks", NeurIPS 2015): a layer keeps latent weights ``W`` and a 0/1 mask ``M`` (a buffer,
so checkpoints hold it) and computes with ``W * M``, so masked weights get a zero gradient. The
mask keeps the weights of largest ``|W * M|``, per layer (``scope="layer"``) or under one
threshold over all compressed layers (``scope="global"``). With ``prune_epochs = T > 0`` the
sparsity follows the cubic ramp of Zhu & Gupta ("To prune, or not to prune", 2017)::

    s_t = s_f * (1 - (1 - t / T)**3)    after epoch t = 1 .. T

from dense to the target ``s_f`` (``T`` shrinks to the run's epochs if these are fewer); with
``T = 0`` the layers are pruned to ``s_f`` at conversion. Pruned weights stay pruned.
Stored: the ``z`` kept values and their positions in the cheaper of a bitmap and relative
indices (:mod:`cnnpress.methods.sparse`), plus the bias; ``z`` MACs per output position.

Filter pruning (``filter_prune``) is in :mod:`cnnpress.methods.filter_prune`.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cnnpress.errors import ConfigError
from cnnpress.floats import float_encoding, stored_float_bits
from cnnpress.methods.base import (
    ANY_CONV,
    METHODS,
    CTarget,
    LayerCost,
    Method,
    MethodConfig,
    replace_module,
    select_layers,
    to_numpy,
)
from cnnpress.methods.sparse import (
    SparseLayer,
    c_sparse_weights,
    check_sparse_layout,
    is_fraction,
    keep_largest,
    layer_settings,
    position_bits,
    recorded_layouts,
    sync_layout,
)

__all__ = [
    "SCOPES",
    "MagnitudePrune",
    "MagnitudePruneConfig",
    "MaskedLayer",
    "cubic_sparsity",
]

SCOPES = ("layer", "global")


def cubic_sparsity(target: float, step: int, steps: int) -> float:
    """Zhu & Gupta's ramp: ``target * (1 - (1 - step/steps)**3)``, ``target`` from ``steps`` on."""
    if steps <= 0 or step >= steps:
        return target
    return target * (1.0 - (1.0 - max(0, step) / steps) ** 3)


class MaskedLayer(SparseLayer):
    """A conv or linear layer computing with ``weight * mask`` (latent weights, 0/1 mask).

    Args:
        source: The ``nn.Conv2d`` or ``nn.Linear`` it replaces (weights are copied).
        sparsity: Target fraction of zeros.
        scope: ``"layer"`` or ``"global"`` threshold.
        prune_epochs: Length of the cubic ramp (0: prune at conversion).
    """

    def __init__(
        self, source: nn.Conv2d | nn.Linear, sparsity: float, scope: str, prune_epochs: int
    ) -> None:
        super().__init__(source, sparse=True)
        self.weight = nn.Parameter(source.weight.detach().clone())
        self.sparsity, self.scope, self.prune_epochs = sparsity, scope, prune_epochs

    def dense_weight(self) -> torch.Tensor:
        return self.weight * self.mask

    def extra_repr(self) -> str:
        return (
            f"weight={tuple(self.weight_shape)}, kept={self.kept()}, target={self.sparsity}, "
            f"scope={self.scope}, record={self.record}"
        )


def _prune(layers: list[MaskedLayer], ramp: float) -> None:
    """Set every mask to ``ramp`` times its target sparsity, keeping the largest ``|W * M|``."""
    if not layers:
        return
    with torch.no_grad():
        scores = [(m.weight * m.mask).abs().flatten() for m in layers]
        if layers[0].scope == "global":
            total = sum(s.numel() for s in scores)
            keep = total - round(ramp * layers[0].sparsity * total)
            masks = keep_largest(torch.cat(scores), keep).split([s.numel() for s in scores])
        else:
            masks = [
                keep_largest(s, max(1, s.numel() - round(ramp * m.sparsity * s.numel())))
                for s, m in zip(scores, layers, strict=True)
            ]
        for m, mask in zip(layers, masks, strict=True):
            m.set_mask(mask)


@dataclass(frozen=True)
class MagnitudePruneConfig(MethodConfig):
    """Magnitude pruning settings.

    Attributes:
        sparsity: Target fraction of zero weights, in [0, 1) (per layer overridable when
            ``scope="layer"``).
        scope: ``"layer"`` (each layer reaches ``sparsity``) or ``"global"`` (one threshold).
        prune_epochs: Epochs of the cubic ramp; 0 prunes once at conversion.
        sparse_layout: ``{layer: [nonzeros, bits, entries]}``, filled by ``resolve``.
    """

    sparsity: float = 0.9
    scope: str = "layer"
    prune_epochs: int = 0
    sparse_layout: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not is_fraction(self.sparsity):
            raise ConfigError(f"sparsity must be a number in [0, 1), got {self.sparsity!r}")
        if self.scope not in SCOPES:
            raise ConfigError(f"scope must be 'layer' or 'global', got {self.scope!r}")
        if not isinstance(self.prune_epochs, int) or self.prune_epochs < 0:
            raise ConfigError(
                f"prune_epochs must be a non-negative integer, got {self.prune_epochs!r}"
            )
        check_sparse_layout(self.sparse_layout)


@METHODS.register("magnitude_prune")
class MagnitudePrune(Method):
    """Magnitude pruning (Han et al., NeurIPS 2015) with Zhu & Gupta's cubic schedule."""

    name = "magnitude_prune"
    Config = MagnitudePruneConfig
    layer_types = (MaskedLayer,)
    represents = ANY_CONV  # the layers keep the conv's own geometry
    trained_state = ("sparse_layout",)  # the masks, restored from a checkpoint's tensors
    c_kinds = ("sparse",)

    def resolve(self, model: nn.Module, config: MagnitudePruneConfig) -> MagnitudePruneConfig:
        """Record each layer's sparse layout as conversion will make it (on a copy)."""
        layout = recorded_layouts(self.convert(copy.deepcopy(model), config))
        return dataclasses.replace(config, sparse_layout=layout)

    def convert(self, model: nn.Module, config: MagnitudePruneConfig) -> nn.Module:
        layers: list[tuple[str, MaskedLayer]] = []
        for name, module, overrides in select_layers(
            model, config, represents=self.represents, method=self.name
        ):
            if overrides and config.scope == "global":
                raise ConfigError(
                    f"layer {name}: per-layer sparsity needs scope 'layer' (global scope uses "
                    "one threshold)"
                )
            settings = layer_settings(MagnitudePruneConfig, config, overrides, {"sparsity"})
            new = MaskedLayer(module, settings.sparsity, config.scope, config.prune_epochs)
            replace_module(model, name, new)
            layers.append((name, new))
        unknown = sorted(set(config.sparse_layout) - {n for n, _ in layers})
        if unknown:
            raise ConfigError(f"sparse_layout names layers that are not pruned: {unknown}")
        _prune([m for _, m in layers], 0.0 if config.prune_epochs else 1.0)
        for name, layer in layers:
            if name in config.sparse_layout:
                layer.apply_record(config.sparse_layout[name])
        return model

    def sync(self, model: nn.Module) -> None:
        """Re-record the sparse layouts from the current masks (see ``sparse.sync_layout``)."""
        sync_layout(model)

    def on_epoch_end(self, model: nn.Module, epoch: int, epochs: int) -> None:
        """Raise the sparsity along the cubic ramp, then re-record the layouts."""
        layers = [m for m in model.modules() if isinstance(m, MaskedLayer)]
        if layers:
            steps = min(layers[0].prune_epochs, epochs)
            if steps > 0 and epoch + 1 <= steps:
                _prune(layers, cubic_sparsity(1.0, epoch + 1, steps))
        sync_layout(model)

    def cost(
        self, layer: nn.Module, input_shape: tuple[int, ...], float_bits: int = 32
    ) -> LayerCost:
        """``z * f`` value bits + position bits + bias; ``z`` MACs per output position."""
        kept = layer.record[0]
        bias = layer.bias.numel() if layer.bias is not None else 0
        bits = stored_float_bits((kept,), float_bits) + stored_float_bits((bias,), float_bits)
        bits += position_bits(layer.record)
        return LayerCost(bits, layer.fp32_bits(), macs=kept * layer.pixels(input_shape))

    def pack(self, layer: nn.Module, float_bits: int = 32) -> dict[str, tuple[str, Any]]:
        """Kept values (C order), their positions, the bias."""
        enc = float_encoding(float_bits)
        positions = layer.positions()
        arrays = {
            "values": (enc, to_numpy(layer.weight[layer.mask])),
            "positions": positions,
        }
        if layer.bias is not None:
            arrays["bias"] = (enc, to_numpy(layer.bias))
        return arrays

    def unpack(self, layer: nn.Module, arrays: dict[str, Any]) -> None:
        """Mask from the positions, kept values in place, zeros elsewhere."""
        values = torch.as_tensor(arrays["values"].reshape(-1).astype("float32"))
        mask = layer.load_positions(arrays["positions"], values.numel())
        with torch.no_grad():
            weight = torch.zeros(layer.weight_shape, dtype=layer.weight.dtype)
            weight[mask.cpu()] = values.to(weight.dtype)
            layer.weight.copy_(weight)
            if layer.bias is not None:
                layer.bias.copy_(torch.as_tensor(arrays["bias"].astype("float32")))

    def c_weights(self, layer: nn.Module, target: CTarget) -> dict[str, Any]:
        """Kept values and their positions for the C sparse conv kernel."""
        kind = target.weight_kinds["sparse"]
        return c_sparse_weights(layer, target, kind=kind, wt=target.array("values"))
