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

``filter_prune``: see :class:`FilterPrune`.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from cnnpress.errors import ConfigError
from cnnpress.methods.base import (
    METHODS,
    LayerCost,
    Method,
    MethodConfig,
    replace_module,
    select_layers,
)
from cnnpress.methods.sparse import (
    SparseLayer,
    check_sparse_layout,
    keep_largest,
    layer_settings,
    position_bits,
    recorded_layouts,
    sync_layout,
)

__all__ = [
    "FilterPrune",
    "FilterPruneConfig",
    "MagnitudePrune",
    "MagnitudePruneConfig",
    "MaskedLayer",
    "cubic_sparsity",
    "prunable_channels",
]

SCOPES = ("layer", "global")
CRITERIA = ("l1", "l2", "bn")


def _fraction(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1


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
        if not _fraction(self.sparsity):
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

    def resolve(self, model: nn.Module, config: MagnitudePruneConfig) -> MagnitudePruneConfig:
        """Record each layer's sparse layout as conversion will make it (on a copy)."""
        layout = recorded_layouts(self.convert(copy.deepcopy(model), config))
        return dataclasses.replace(config, sparse_layout=layout)

    def convert(self, model: nn.Module, config: MagnitudePruneConfig) -> nn.Module:
        layers: list[tuple[str, MaskedLayer]] = []
        for name, module, overrides in select_layers(model, config):
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
        bits = (kept + bias) * float_bits + position_bits(layer.record)
        return LayerCost(bits, layer.fp32_bits(), macs=kept * layer.pixels(input_shape))

    def pack(self, layer: nn.Module, float_bits: int = 32) -> dict[str, tuple[str, Any]]:
        """Kept values (C order), their positions, the bias."""
        enc = "f2" if float_bits == 16 else "f4"
        positions = layer.positions()
        arrays = {
            "values": (enc, layer.weight.detach()[layer.mask].cpu().numpy()),
            "positions": positions,
        }
        if layer.bias is not None:
            arrays["bias"] = (enc, layer.bias.detach().cpu().numpy())
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


# -- filter pruning ---------------------------------------------------------------------------

_PASS = frozenset(  # channel-wise ops a pruned channel may pass through
    "relu relu_ relu6 hardtanh hardtanh_ leaky_relu elu silu gelu hardswish sigmoid tanh "  # noqa: SIM905
    "max_pool2d _max_pool2d avg_pool2d adaptive_avg_pool2d adaptive_max_pool2d "
    "_adaptive_max_pool2d dropout dropout2d contiguous clone".split()
)
_FLATTEN = frozenset({"flatten", "view", "reshape"})
_TRACED = (nn.Conv2d, nn.Linear, nn.BatchNorm2d)


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    return []


@dataclass
class _Op:
    name: str
    module: nn.Module | None
    inputs: list[torch.Tensor]
    output: Any


class _Recorder(TorchFunctionMode):
    """Records top-level torch calls; the traced modules' own internals are hidden."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[_Op] = []
        self.depth = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        if self.depth == 0:
            name = getattr(func, "__name__", str(func))
            self.ops.append(_Op(name, None, _tensors(args) + _tensors(kwargs or {}), out))
        return out


@dataclass
class _Group:
    channels: int
    bns: list[str]
    consumers: list[tuple[str, int]]  # (module, input features per channel)


def _trace(model: nn.Module) -> tuple[list[_Op], Any]:
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first is None:
        raise ConfigError(
            f"filter_prune needs a model with convolutions, not {type(model).__name__}"
        )
    rec, hooks = _Recorder(), []
    for name, module in model.named_modules():
        if isinstance(module, _TRACED):

            def enter(_m: nn.Module, _a: Any) -> None:
                rec.depth += 1

            def leave(m: nn.Module, a: Any, out: Any, name: str = name) -> None:
                rec.depth -= 1
                if rec.depth == 0:
                    rec.ops.append(_Op(name, m, _tensors(a), out))

            hooks += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    x = torch.zeros(1, first.in_channels, 16, 16, device=first.weight.device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), rec:
            out = model(x)
    except Exception as err:  # noqa: BLE001 - any failure means we cannot see the graph
        raise ConfigError(
            f"filter_prune could not run {type(model).__name__} on a 16x16 input to find which "
            f"channels depend on each other ({type(err).__name__}: {err})"
        ) from None
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return rec.ops, out


def _follow(conv: _Op, users: dict[int, list[_Op]], final: set[int]) -> _Group | None:
    """What consumes a conv's output channels, if only BN, pointwise ops, convs, flatten+FC."""
    group = _Group(conv.module.out_channels, [], [])
    todo, seen = [conv.output], set()
    while todo:
        t = todo.pop()
        if id(t) in seen:
            continue
        seen.add(id(t))
        if id(t) in final or not users.get(id(t)):
            return None
        for op in users[id(t)]:
            m, out = op.module, op.output
            if m is not None:
                if op.inputs[0] is not t:
                    return None
                if isinstance(m, nn.BatchNorm2d) and m.num_features == group.channels:
                    group.bns.append(op.name)
                    todo.append(out)
                elif isinstance(m, nn.Conv2d) and m.groups == 1 and m.in_channels == group.channels:
                    group.consumers.append((op.name, 1))
                else:
                    return None
            elif not isinstance(out, torch.Tensor):
                if _tensors(out):
                    return None  # a split, a max with indices...
            elif op.inputs[0] is not t:
                return None
            elif op.name in _PASS and out.dim() == 4 and out.shape[1] == group.channels:
                todo.append(out)
            elif (
                op.name in _FLATTEN
                and t.dim() == 4
                and tuple(out.shape) == (t.shape[0], t[0].numel())
                and id(out) not in final
                and users.get(id(out))
            ):
                for lin in users[id(out)]:
                    if not isinstance(lin.module, nn.Linear) or lin.inputs[0] is not out:
                        return None
                    group.consumers.append((lin.name, out.shape[1] // group.channels))
            else:
                return None
    return group


def prunable_channels(model: nn.Module) -> dict[str, _Group]:
    """Convs whose output channels can be removed consistently, traced on one forward pass.

    A conv (``groups == 1``) qualifies when its output reaches, through BatchNorm and
    channel-wise ops (ReLU, pooling, dropout), only convs (their input channels) or a flatten
    feeding Linear layers (their input features), is called once, and is not the model's
    output. A residual addition, concatenation or slicing disqualifies it.

    Returns:
        ``{conv name: group}``: its channel count, its BatchNorm and its readers with the
        input features each channel feeds them (1 for a conv, H*W after a flatten).
    """
    ops, out = _trace(model)
    users: dict[int, list[_Op]] = {}
    calls: dict[str, int] = {}
    for op in ops:
        if op.module is not None:
            calls[op.name] = calls.get(op.name, 0) + 1
        for t in {id(t): t for t in op.inputs}.values():
            users.setdefault(id(t), []).append(op)
    final = {id(t) for t in _tensors(out)}
    groups = {}
    for op in ops:
        if isinstance(op.module, nn.Conv2d) and op.module.groups == 1:
            group = _follow(op, users, final)
            names = [op.name, *group.bns, *(c for c, _ in group.consumers)] if group else []
            if group and all(calls.get(n) == 1 for n in names):
                groups[op.name] = group
    return groups


@dataclass(frozen=True)
class FilterPruneConfig(MethodConfig):
    """Filter pruning settings.

    Attributes:
        ratio: Fraction of each pruned conv's output channels to remove, in [0, 1) (at least
            one channel stays); per layer overridable.
        criterion: ``"l1"``/``"l2"`` norm of each filter (Li et al.) or ``"bn"``, ``|gamma|``
            of the BatchNorm that follows (network slimming); per layer overridable.
        slimming_l1: When > 0, the training loss gets ``slimming_l1 * sum |gamma|`` over all
            BatchNorm layers (network slimming's sparsity training).
        channels: ``{conv: channels kept}``, filled by ``resolve``.
    """

    ratio: float = 0.5
    criterion: str = "l1"
    slimming_l1: float = 0.0
    channels: dict[str, int] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not _fraction(self.ratio):
            raise ConfigError(f"ratio must be a number in [0, 1), got {self.ratio!r}")
        if self.criterion not in CRITERIA:
            raise ConfigError(
                f"criterion must be one of {', '.join(CRITERIA)}, got {self.criterion!r}"
            )
        if isinstance(self.slimming_l1, bool) or not (
            isinstance(self.slimming_l1, (int, float)) and self.slimming_l1 >= 0
        ):
            raise ConfigError(f"slimming_l1 must be a number >= 0, got {self.slimming_l1!r}")
        if not isinstance(self.channels, dict) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 1
            for v in self.channels.values()
        ):
            raise ConfigError("channels must map conv names to counts >= 1")


def _criteria(
    model: nn.Module, config: FilterPruneConfig
) -> tuple[dict[str, FilterPruneConfig], set[str]]:
    """Per selected conv its settings, and the names given per-layer settings."""
    settings, explicit = {}, set()
    for name, _, overrides in select_layers(model, config, kinds=(nn.Conv2d,)):
        settings[name] = layer_settings(
            FilterPruneConfig, config, overrides, {"ratio", "criterion"}
        )
        if overrides:
            explicit.add(name)
    return settings, explicit


def _scores(model: nn.Module, name: str, group: _Group, criterion: str) -> torch.Tensor:
    if criterion == "bn":
        bn = model.get_submodule(group.bns[0]) if group.bns else None
        if bn is None or bn.weight is None:
            raise ConfigError(
                f"layer {name}: criterion 'bn' needs an affine BatchNorm after the conv; "
                "use 'l1' or 'l2'"
            )
        return bn.weight.detach().abs()
    w = model.get_submodule(name).weight.detach()
    return w.abs().sum((1, 2, 3)) if criterion == "l1" else w.pow(2).sum((1, 2, 3)).sqrt()


def _shrink(
    module: nn.Module, out_idx: torch.Tensor | None, in_idx: torch.Tensor | None
) -> nn.Module:
    """A plain copy of ``module`` restricted to the given output/input channels."""
    if isinstance(module, nn.BatchNorm2d):
        new = nn.BatchNorm2d(
            len(out_idx), module.eps, module.momentum, module.affine, module.track_running_stats
        )
        state = module.state_dict()
        new.to(out_idx.device)
        with torch.no_grad():
            for key, value in state.items():
                keep = value if key == "num_batches_tracked" else value[out_idx]
                getattr(new, key).copy_(keep)
        return new
    w = module.weight.detach()
    if out_idx is not None:
        w = w[out_idx]
    if in_idx is not None:
        w = w[:, in_idx]
    bias = module.bias.detach() if module.bias is not None else None
    if bias is not None and out_idx is not None:
        bias = bias[out_idx]
    if isinstance(module, nn.Conv2d):
        new = nn.Conv2d(
            w.shape[1],
            w.shape[0],
            module.kernel_size,
            module.stride,
            module.padding,
            module.dilation,
            1,
            bias is not None,
            module.padding_mode,
        )
    else:
        new = nn.Linear(w.shape[1], w.shape[0], bias is not None)
    new.to(device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if bias is not None:
            new.bias.copy_(bias)
    return new


@METHODS.register("filter_prune")
class FilterPrune(Method):
    """Filter pruning (Li et al., ICLR 2017) and network slimming (Liu et al., ICCV 2017).

    A pruned conv keeps the ``keep = max(1, n - round(ratio * n))`` filters of largest score,
    ``||F_i||_1`` or ``||F_i||_2`` (Li et al.) or ``|gamma_i|`` of its BatchNorm (Liu et al.,
    who train with ``lambda * sum |gamma|`` added to the loss to make the scores sparse). The
    conv, its BatchNorm and the matching input channels of the layers that read it are rebuilt
    as smaller plain layers, so the result is a really smaller ordinary model. Only channels
    whose every reader is known are pruned (:func:`prunable_channels`): in a ResNet the
    block-internal ones, in a VGG every conv's. ``resolve`` fixes the kept counts
    (``channels``) and ``convert`` picks which channels by the criterion on the current
    weights, so a model rebuilt from its config has the same shapes.
    """

    name = "filter_prune"
    Config = FilterPruneConfig
    layer_types = ()

    def resolve(self, model: nn.Module, config: FilterPruneConfig) -> FilterPruneConfig:
        """Fix the kept channel count of every pruned conv in ``channels``."""
        return self._resolve(model, config, prunable_channels(model))

    def _resolve(
        self, model: nn.Module, config: FilterPruneConfig, groups: dict[str, _Group]
    ) -> FilterPruneConfig:
        settings, explicit = _criteria(model, config)
        if config.channels:
            kept = dict(config.channels)
        else:
            bad = sorted(explicit - set(groups))
            if bad:
                raise ConfigError(
                    f"the output channels of {', '.join(bad)} cannot be removed consistently "
                    "(they feed a residual addition, the output or another non-prunable op)"
                )
            kept = {}
            for name, s in settings.items():
                if name in groups:
                    n = groups[name].channels
                    kept[name] = max(1, n - round(s.ratio * n))
        if not kept:
            raise ConfigError(
                f"filter_prune finds no conv in {type(model).__name__} whose output channels "
                "can be removed consistently (only convs read by BatchNorm, pointwise ops and "
                "other convs or a flatten+Linear qualify)"
            )
        for name, keep in kept.items():
            if name not in groups or not keep <= groups[name].channels:
                raise ConfigError(
                    f"channels[{name!r}] = {keep}: not a prunable conv of this model with at "
                    "least that many channels"
                )
        return dataclasses.replace(config, channels=kept)

    def convert(self, model: nn.Module, config: FilterPruneConfig) -> nn.Module:
        groups = prunable_channels(model)
        config = self._resolve(model, config, groups)
        settings, _ = _criteria(model, config)
        out_sel: dict[str, torch.Tensor] = {}
        in_sel: dict[str, torch.Tensor] = {}
        for name, keep in config.channels.items():
            group = groups[name]
            criterion = settings[name].criterion if name in settings else config.criterion
            score = _scores(model, name, group, criterion)
            idx = torch.argsort(score, descending=True, stable=True)[:keep].sort().values
            for target in [name, *group.bns]:
                out_sel[target] = idx
            for consumer, block in group.consumers:
                if consumer in in_sel:
                    raise ConfigError(f"layer {consumer} reads two pruned convs; cannot prune")
                offsets = torch.arange(block, device=idx.device)
                in_sel[consumer] = (idx.view(-1, 1) * block + offsets).flatten()
        for target in sorted(set(out_sel) | set(in_sel)):
            module = model.get_submodule(target)
            replace_module(model, target, _shrink(module, out_sel.get(target), in_sel.get(target)))
        return model

    def regulariser(self, model: nn.Module) -> torch.Tensor | None:
        """``slimming_l1 * sum |gamma|`` over BatchNorm layers, or ``None`` when off."""
        info = getattr(model, "cnnpress_method", None) or {}
        weight = (info.get("config") or {}).get("slimming_l1", 0.0)
        if info.get("name") != self.name or not weight:
            return None
        gammas = [
            m.weight.abs().sum()
            for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None
        ]
        return weight * torch.stack(gammas).sum() if gammas else None
