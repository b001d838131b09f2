"""Weight sharing by scalar k-means, optionally after magnitude pruning (Deep Compression).

Han, Mao & Dally, "Deep Compression: Compressing Deep Neural Networks with Pruning, Trained
Quantization and Huffman Coding", ICLR 2016.

Each layer's weights are clustered into ``k = 2**bits`` values: centroids start evenly spaced
between the smallest and largest weight (the paper's linear initialisation) and a few Lloyd
iterations follow. The layer then holds the codebook ``c`` (a Parameter of ``k`` values) and
the index ``I`` (a buffer); it computes with ``W = c[I]`` (times the mask ``M`` when pruned), so
the gradient of centroid ``j`` is by default the mean of the gradients of its members,
``dL/dc_j = mean_{I(p) = j} dL/dW_p``. The paper sums them (``centroid_grad="sum"``); the
mean is the same direction with a step that does not grow with the cluster, see
``cnnpress.quantizers.mean_gather`` for what the sum did at usual fine-tuning rates.

With ``sparsity > 0`` the layer is first magnitude-pruned to that fraction of zeros and only the
kept weights are clustered; zeros stay exactly zero and are not stored (prune, then quantize:
the pipeline of the paper, without its final Huffman stage). Stored bits::

    k * f (codebook) + z * bits (indices) + position bits (sparse only) + bias * f

with ``z`` the kept weights (all of them when dense), positions as in
:mod:`cnnpress.methods.sparse`; ``z`` MACs per output position.
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
    keep_largest,
    layer_settings,
    position_bits,
    recorded_layouts,
    sync_layout,
)
from cnnpress.quantizers import mean_gather

__all__ = ["KMeans", "KMeansConfig", "KMeansLayer", "kmeans_1d"]

MAX_BITS = 16


def _assign(values: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid of each value (ties: the smaller centroid)."""
    ordered, order = torch.sort(centroids)
    return order[torch.bucketize(values, (ordered[1:] + ordered[:-1]) / 2)]


def kmeans_1d(values: torch.Tensor, k: int, iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scalar k-means with linear initialisation.

    Args:
        values: The numbers to cluster (any shape; flattened).
        k: Clusters.
        iterations: Lloyd iterations at most (stops early once assignments settle).

    Returns:
        ``(centroids, assignment)``: ``k`` centroids (an empty cluster keeps its last value)
        and each value's nearest centroid.
    """
    v = values.detach().reshape(-1).float()
    if v.numel() == 0:
        return torch.zeros(k, device=v.device), torch.zeros(0, dtype=torch.long, device=v.device)
    c = torch.linspace(float(v.min()), float(v.max()), k, device=v.device)
    assign = _assign(v, c)
    for _ in range(iterations):
        sums = torch.zeros(k, device=v.device).index_add_(0, assign, v)
        counts = torch.bincount(assign, minlength=k)
        c = torch.where(counts > 0, sums / counts.clamp(min=1), c)
        new = _assign(v, c)
        if torch.equal(new, assign):
            break
        assign = new
    return c, assign


class KMeansLayer(SparseLayer):
    """A conv or linear layer whose weights are ``codebook[index]`` (times a mask if sparse).

    Args:
        source: The ``nn.Conv2d`` or ``nn.Linear`` it replaces (bias copied; clustering by
            :meth:`cluster`).
        bits: Index width; the codebook has ``2**bits`` entries.
        sparse: Hold a mask (pruned weights are exactly zero and not stored).
        centroid_grad: ``"mean"`` or ``"sum"`` of the members' gradients per centroid.
    """

    def __init__(
        self, source: nn.Conv2d | nn.Linear, bits: int, sparse: bool, centroid_grad: str = "mean"
    ) -> None:
        super().__init__(source, sparse)
        self.bits, self.centroid_grad = bits, centroid_grad
        dev, dtype = source.weight.device, source.weight.dtype
        self.centroids = nn.Parameter(torch.zeros(2**bits, device=dev, dtype=dtype))
        self.register_buffer("index", torch.zeros(self.weight_shape, dtype=torch.long, device=dev))

    def dense_weight(self) -> torch.Tensor:
        if self.centroid_grad == "sum":  # autograd sums over the weights sharing a value
            w = self.centroids[self.index]
        else:
            w = mean_gather(self.centroids, self.index, self.mask)
        return w * self.mask if self.mask is not None else w

    def indices(self) -> torch.Tensor:
        """The stored indices: of the kept weights (C order) or of all."""
        return self.index[self.mask] if self.mask is not None else self.index.reshape(-1)

    def cluster(self, weight: torch.Tensor, iterations: int) -> None:
        """Set codebook and index by k-means over the kept entries of ``weight``."""
        w = weight.detach().to(self.centroids.device)
        kept = w[self.mask] if self.mask is not None else w.reshape(-1)
        centroids, assign = kmeans_1d(kept, 2**self.bits, iterations)
        with torch.no_grad():
            self.centroids.copy_(centroids)
            self.set_indices(assign)

    def set_indices(self, indices: torch.Tensor) -> None:
        """Put the stored indices (see :meth:`indices`) back in place, 0 where pruned."""
        flat = torch.zeros(self.numel(), dtype=torch.long, device=self.index.device)
        if self.mask is not None:
            flat[self.mask.reshape(-1)] = indices.to(flat.device).long()
        else:
            flat.copy_(indices.reshape(-1))
        self.index.copy_(flat.view(self.weight_shape))

    def extra_repr(self) -> str:
        return (
            f"weight={tuple(self.weight_shape)}, bits={self.bits}, record={self.record}, "
            f"centroid_grad={self.centroid_grad}"
        )


@dataclass(frozen=True)
class KMeansConfig(MethodConfig):
    """k-means weight sharing settings (``bits``, ``sparsity``, ``iterations`` per layer too).

    Attributes:
        bits: Index width; ``2**bits`` shared values per layer (1 to 16).
        sparsity: Fraction of weights pruned by magnitude before clustering, in [0, 1).
        iterations: Lloyd iterations at conversion.
        centroid_grad: A centroid's gradient: the ``"mean"`` of its members' (default) or
            their ``"sum"`` (the paper's rule; it needs a learning rate about the cluster size
            smaller).
        sparse_layout: ``{layer: [nonzeros, bits, entries]}`` of the pruned layers, filled by
            ``resolve``.
    """

    bits: int = 4
    sparsity: float = 0.0
    iterations: int = 10
    centroid_grad: str = "mean"
    sparse_layout: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise ConfigError(f"bits must be an integer from 1 to {MAX_BITS}, got {self.bits!r}")
        if not 1 <= self.bits <= MAX_BITS:
            raise ConfigError(f"bits must be an integer from 1 to {MAX_BITS}, got {self.bits!r}")
        ok = isinstance(self.sparsity, (int, float)) and not isinstance(self.sparsity, bool)
        if not ok or not 0 <= self.sparsity < 1:
            raise ConfigError(f"sparsity must be a number in [0, 1), got {self.sparsity!r}")
        if not isinstance(self.iterations, int) or self.iterations < 0:
            raise ConfigError(f"iterations must be a non-negative integer, got {self.iterations!r}")
        if self.centroid_grad not in ("mean", "sum"):
            raise ConfigError(f"centroid_grad must be 'mean' or 'sum', got {self.centroid_grad!r}")
        check_sparse_layout(self.sparse_layout)


@METHODS.register("kmeans")
class KMeans(Method):
    """k-means weight sharing (Han, Mao & Dally, ICLR 2016), with optional pruning first."""

    name = "kmeans"
    Config = KMeansConfig
    layer_types = (KMeansLayer,)
    represents = ANY_CONV  # the layers keep the conv's own geometry
    trained_state = ("sparse_layout",)  # the masks, restored from a checkpoint's tensors
    c_kinds = ("kmeans",)

    def resolve(self, model: nn.Module, config: KMeansConfig) -> KMeansConfig:
        """Record each pruned layer's sparse layout as conversion will make it (on a copy)."""
        layout = recorded_layouts(self.convert(copy.deepcopy(model), config))
        return dataclasses.replace(config, sparse_layout=layout)

    def convert(self, model: nn.Module, config: KMeansConfig) -> nn.Module:
        sparse_names = set()
        for name, module, overrides in select_layers(
            model, config, represents=self.represents, method=self.name
        ):
            s = layer_settings(KMeansConfig, config, overrides, {"bits", "sparsity", "iterations"})
            new = KMeansLayer(module, s.bits, s.sparsity > 0, config.centroid_grad)
            weight = module.weight.detach()
            if new.mask is not None:
                sparse_names.add(name)
                n = weight.numel()
                new.set_mask(keep_largest(weight.abs(), max(1, n - round(s.sparsity * n))))
                if name in config.sparse_layout:
                    new.apply_record(config.sparse_layout[name])
            new.cluster(weight, s.iterations)
            replace_module(model, name, new)
        unknown = sorted(set(config.sparse_layout) - sparse_names)
        if unknown:
            raise ConfigError(f"sparse_layout names layers that are not pruned: {unknown}")
        return model

    def sync(self, model: nn.Module) -> None:
        """Re-record the sparse layouts from the current masks (see ``sparse.sync_layout``)."""
        sync_layout(model)

    def on_epoch_end(self, model: nn.Module, epoch: int, epochs: int) -> None:
        """Masks do not change while training; re-record them (a resumed run's are loaded)."""
        sync_layout(model)

    def cost(
        self, layer: nn.Module, input_shape: tuple[int, ...], float_bits: int = 32
    ) -> LayerCost:
        """Codebook + indices + positions + bias bits; ``z`` MACs per output position."""
        kept = layer.record[0] if layer.mask is not None else layer.numel()
        bias = layer.bias.numel() if layer.bias is not None else 0
        bits = stored_float_bits(tuple(layer.centroids.shape), float_bits) + kept * layer.bits
        bits += stored_float_bits((bias,), float_bits)
        if layer.mask is not None:
            bits += position_bits(layer.record)
        return LayerCost(bits, layer.fp32_bits(), macs=kept * layer.pixels(input_shape))

    def pack(self, layer: nn.Module, float_bits: int = 32) -> dict[str, tuple[str, Any]]:
        """Codebook (float), indices at ``bits`` each, positions when sparse, bias."""
        enc = float_encoding(float_bits)
        arrays = {
            "codebook": (enc, to_numpy(layer.centroids)),
            "indices": (f"u{layer.bits}", to_numpy(layer.indices())),
        }
        if layer.mask is not None:
            arrays["positions"] = layer.positions()
        if layer.bias is not None:
            arrays["bias"] = (enc, to_numpy(layer.bias))
        return arrays

    def unpack(self, layer: nn.Module, arrays: dict[str, Any]) -> None:
        """Codebook, mask and indices from the stored arrays."""
        indices = torch.as_tensor(arrays["indices"].reshape(-1).astype("int64"))
        if layer.mask is not None:
            layer.load_positions(arrays["positions"], indices.numel())
        elif indices.numel() != layer.numel():
            raise ValueError(f"{indices.numel()} stored indices for {layer.numel()} weights")
        with torch.no_grad():
            layer.centroids.copy_(torch.as_tensor(arrays["codebook"].astype("float32")))
            layer.set_indices(indices)
            if layer.bias is not None:
                layer.bias.copy_(torch.as_tensor(arrays["bias"].astype("float32")))

    def c_weights(self, layer: nn.Module, target: CTarget) -> dict[str, Any]:
        """Codebook and indices (and positions, when pruned first) for the C k-means kernel."""
        return c_sparse_weights(
            layer,
            target,
            kind=target.weight_kinds["kmeans"],
            wt=target.array("codebook"),
            code=target.array("indices"),
            code_bits=layer.bits,
        )
