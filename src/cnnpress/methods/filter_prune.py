"""Filter pruning (``filter_prune``): whole output channels removed, the model really smaller.

Li et al. ("Pruning Filters for Efficient ConvNets", ICLR 2017) score filters by their L1/L2
norm; network slimming (Liu et al., "Learning Efficient Convolutional Networks through Network
Slimming", ICCV 2017) by ``|gamma|`` of the BatchNorm that follows, after training with an L1
penalty on those scales, and removes every channel under one global threshold. Which channels
may go is found by tracing the model once (:func:`prunable_channels`): a channel is pruned only
where every reader of it is known (BatchNorm, channel-wise ops, convs, a flatten + Linear), so
ResNet residual additions stay consistent. See :class:`FilterPrune`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from cnnpress.errors import ConfigError
from cnnpress.geometry import Represents
from cnnpress.methods.base import (
    METHODS,
    Method,
    MethodConfig,
    replace_module,
    select_layers,
    slimming_penalty,
)
from cnnpress.methods.prune import SCOPES
from cnnpress.methods.sparse import is_fraction, layer_settings

__all__ = [
    "CRITERIA",
    "FilterPrune",
    "FilterPruneConfig",
    "prunable_channels",
    "slimming_penalty",
]

CRITERIA = ("l1", "l2", "bn")

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
    w = first.weight
    x = torch.zeros(1, first.in_channels, 16, 16, device=w.device, dtype=w.dtype)
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
        ratio: Fraction of output channels to remove, in [0, 1): of each pruned conv's
            (``scope="layer"``, per layer overridable) or of all prunable convs' together
            (``scope="global"``); at least one channel per conv stays.
        criterion: ``"l1"``/``"l2"`` norm of each filter (Li et al.) or ``"bn"``, ``|gamma|``
            of the BatchNorm that follows (network slimming); per layer overridable with
            ``scope="layer"``.
        scope: ``"layer"`` or ``"global"``: one threshold on the scores of every prunable
            channel, as network slimming prunes (for ``l1``/``l2`` the norms are divided by
            the filter's size, ``k*k*c`` or its square root, so that layers compare).
        slimming_l1: When > 0, the pruned model trains with ``slimming_l1 * sum |gamma|``
            over all BatchNorm layers added to the loss (for a further pruning pass). The
            sparsity training before the first pruning is the training option of the same
            name (``cnnpress train --slimming-l1``).
        channels: ``{conv: channels kept}``, filled by ``resolve``.
    """

    ratio: float = 0.5
    criterion: str = "l1"
    scope: str = "layer"
    slimming_l1: float = 0.0
    channels: dict[str, int] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not is_fraction(self.ratio):
            raise ConfigError(f"ratio must be a number in [0, 1), got {self.ratio!r}")
        if self.criterion not in CRITERIA:
            raise ConfigError(
                f"criterion must be one of {', '.join(CRITERIA)}, got {self.criterion!r}"
            )
        if self.scope not in SCOPES:
            raise ConfigError(f"scope must be 'layer' or 'global', got {self.scope!r}")
        if isinstance(self.slimming_l1, bool) or not (
            isinstance(self.slimming_l1, (int, float)) and self.slimming_l1 >= 0
        ):
            raise ConfigError(f"slimming_l1 must be a number >= 0, got {self.slimming_l1!r}")
        if not isinstance(self.channels, dict) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 1
            for v in self.channels.values()
        ):
            raise ConfigError(
                f"channels must map conv names to counts >= 1, got {self.channels!r:.60}"
            )


def _criteria(
    model: nn.Module, config: FilterPruneConfig
) -> tuple[dict[str, FilterPruneConfig], set[str]]:
    """Per selected conv its settings, and the names given per-layer settings."""
    settings, explicit = {}, set()
    for name, _, overrides in select_layers(
        model, config, kinds=(nn.Conv2d,), represents=FilterPrune.represents, method="filter_prune"
    ):
        if overrides and config.scope == "global":
            raise ConfigError(
                f"layer {name}: per-layer ratio or criterion needs scope 'layer' (global scope "
                "uses one threshold)"
            )
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


def _global_keep(
    model: nn.Module, names: list[str], groups: dict[str, _Group], config: FilterPruneConfig
) -> dict[str, int]:
    """Kept channels per conv under one threshold over all their scores (network slimming).

    The ``round(ratio * total)`` lowest-scoring channels of all ``names`` go, except that every
    conv keeps at least its best channel.
    """
    scores = []
    for name in names:
        score = _scores(model, name, groups[name], config.criterion).float()
        if config.criterion != "bn":
            size = model.get_submodule(name).weight[0].numel()
            score = score / (size if config.criterion == "l1" else size**0.5)
        scores.append(score)
    flat = torch.cat(scores)
    keep = flat.numel() - round(config.ratio * flat.numel())
    order = torch.argsort(flat, descending=True, stable=True)
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[order[:keep]] = True
    counts = [int(c.sum()) for c in chosen.split([len(sc) for sc in scores])]
    return {name: max(1, count) for name, count in zip(names, counts, strict=True)}


def _shrink(
    module: nn.Module, out_idx: torch.Tensor | None, in_idx: torch.Tensor | None
) -> nn.Module:
    """A plain copy of ``module`` restricted to the given output/input channels."""
    if isinstance(module, nn.BatchNorm2d):
        new = nn.BatchNorm2d(
            len(out_idx), module.eps, module.momentum, module.affine, module.track_running_stats
        )
        state = module.state_dict()
        floats = [v for v in state.values() if v.is_floating_point()]
        new.to(out_idx.device, floats[0].dtype if floats else None)
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
    who train with ``lambda * sum |gamma|`` added to the loss to make the scores sparse and
    then remove every channel under one global threshold: ``scope="global"``). The
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
    #: the pruned convs are rebuilt as plain ``nn.Conv2d`` with every setting but groups
    represents = Represents(padding_mode=True, uneven_padding=True)

    def resolve(self, model: nn.Module, config: FilterPruneConfig) -> FilterPruneConfig:
        """Fix the kept channel count of every pruned conv in ``channels``."""
        _criteria(model, config)  # nothing selected: say so before tracing the model
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
            names = [name for name in settings if name in groups]
            if config.scope == "global":
                kept = _global_keep(model, names, groups, config)
            else:
                kept = {}
                for name in names:
                    n = groups[name].channels
                    kept[name] = max(1, n - round(settings[name].ratio * n))
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
        _criteria(model, config)  # nothing selected: say so before tracing the model
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
        """The method's ``slimming_l1`` penalty on the pruned model, or ``None`` when off."""
        info = getattr(model, "cnnpress_method", None) or {}
        weight = (info.get("config") or {}).get("slimming_l1", 0.0)
        if info.get("name") != self.name or not weight:
            return None
        return slimming_penalty(model, weight)
