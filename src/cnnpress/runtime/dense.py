"""Plain PyTorch copies of compressed models: every compressed layer becomes a dense one.

The rule that finds compressed layers is duck-typed, so that methods added later work without
changes here. A module is *compressed* when it is not already a plain ``nn.Conv2d`` or
``nn.Linear`` and it has a callable ``dense_weight()`` or, failing that, ``stacked_weight()``
(SLBF's :class:`~cnnpress.methods.slbf.SLBFConv2d` and :class:`~cnnpress.methods.slbf.SLBFLinear`
have the latter). That method returns the float weight the layer computes with:

* a *conv* layer (one with ``stride`` and ``padding`` attributes) returns
  ``(out_channels, in_channels / groups, kh, kw)`` and becomes an ``nn.Conv2d`` with the same
  ``stride``, ``padding``, ``dilation`` (default 1), ``groups`` (default 1) and
  ``padding_mode`` (default ``"zeros"``);
* any other layer returns ``(out_features, in_features)``, or that shape followed by 1x1 (as
  SLBF's linear layer does), and becomes an ``nn.Linear``.

A ``bias`` attribute (a tensor or ``None``) is copied. Submodules of a compressed layer go with
it: the dense layer replaces the whole subtree.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

__all__ = ["dense_layer", "is_compressed", "to_dense"]

#: Attributes that record how a model was built and compressed; kept on the dense copy.
KEPT_ATTRIBUTES = ("cnnpress_arch", "cnnpress_method")


def _weight_fn(module: nn.Module) -> Callable[[], torch.Tensor] | None:
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        return None
    for name in ("dense_weight", "stacked_weight"):
        fn = getattr(module, name, None)
        if callable(fn):
            return fn
    return None


def is_compressed(module: nn.Module) -> bool:
    """Whether :func:`to_dense` replaces ``module`` (the rule is in the module doc)."""
    return _weight_fn(module) is not None


def _is_conv(module: nn.Module) -> bool:
    return hasattr(module, "stride") and hasattr(module, "padding")


def dense_layer(module: nn.Module) -> nn.Conv2d | nn.Linear:
    """The plain ``nn.Conv2d`` or ``nn.Linear`` that computes what the compressed ``module`` does.

    Args:
        module: A compressed layer (:func:`is_compressed` is true for it).

    Returns:
        A new layer in eval mode on the weight's device and dtype, holding detached copies of the
        reconstructed weight and of the bias.

    Raises:
        TypeError: ``module`` is not a compressed layer.
        ValueError: Its weight does not have a shape the rule in the module doc allows.
    """
    fn = _weight_fn(module)
    if fn is None:
        raise TypeError(f"{type(module).__name__} has no dense_weight() or stacked_weight()")
    with torch.no_grad():
        weight = fn().detach().clone()
        bias = getattr(module, "bias", None)
        bias = bias.detach().clone() if isinstance(bias, torch.Tensor) else None
    kind = dict(device=weight.device, dtype=weight.dtype)
    name = type(module).__name__
    if _is_conv(module):
        if weight.dim() != 4:
            raise ValueError(f"{name}: a conv weight must have 4 dims, got {tuple(weight.shape)}")
        groups = int(getattr(module, "groups", 1))
        out_channels, in_per_group, kh, kw = weight.shape
        new: nn.Conv2d | nn.Linear = nn.Conv2d(
            in_per_group * groups,
            out_channels,
            (kh, kw),
            stride=module.stride,
            padding=module.padding,
            dilation=getattr(module, "dilation", 1),
            groups=groups,
            bias=bias is not None,
            padding_mode=getattr(module, "padding_mode", "zeros"),
            **kind,
        )
    else:
        if weight.dim() < 2 or any(v != 1 for v in weight.shape[2:]):
            raise ValueError(
                f"{name}: a linear weight must be (out, in) or (out, in, 1, ...), "
                f"got {tuple(weight.shape)}"
            )
        weight = weight.flatten(1)
        new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, **kind)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    return new.eval()


def replace_layers(model: nn.Module, make: Callable[[nn.Module], nn.Module | None]) -> nn.Module:
    """Replace, in place, every submodule for which ``make`` returns a module.

    Modules are visited parents first; the subtree of a replaced module is not visited.

    Args:
        model: The model to change (its root may be replaced too).
        make: Returns the replacement of a module, or ``None`` to keep it.

    Returns:
        ``model``, or the replacement of its root.
    """
    root = make(model)
    if root is not None:
        return root
    done: list[str] = []
    for name, module in list(model.named_modules()):
        if not name or any(name.startswith(prefix + ".") for prefix in done):
            continue
        new = make(module)
        if new is None:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
        done.append(name)
    return model


def keep_attributes(source: nn.Module, target: nn.Module) -> None:
    """Copy ``cnnpress_arch`` and ``cnnpress_method``, where present, to ``target``."""
    for attr in KEPT_ATTRIBUTES:
        if hasattr(source, attr):
            setattr(target, attr, copy.deepcopy(getattr(source, attr)))


def to_dense(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` in eval mode with every compressed layer made dense.

    ``SLBFConv2d`` becomes ``nn.Conv2d`` (same stride, padding and dilation; weight = the
    stacked binary filters times their scales; bias copied) and ``SLBFLinear`` becomes
    ``nn.Linear``. Layers of other methods are found by the rule in the module doc. The
    ``cnnpress_arch`` and ``cnnpress_method`` attributes are kept; ``model`` is not changed.

    Args:
        model: Any model, compressed or not.

    Returns:
        The dense copy; its outputs equal those of ``model`` in eval mode (up to float rounding).
    """
    dense = replace_layers(
        copy.deepcopy(model), lambda m: dense_layer(m) if is_compressed(m) else None
    )
    keep_attributes(model, dense)
    return dense.eval()
