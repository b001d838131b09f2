"""Conv geometry: output sizes, and which of a conv's settings a compressed layer reproduces.

At the bottom of the package (it imports only torch and :mod:`cnnpress.errors`), so that the
methods, the cost table and the runtimes share one copy of the output-size formula::

    H_out = (H + 2p - d(k - 1) - 1) // s + 1

and one check of what a method's layer can represent (:class:`Represents`): a layer that
drops a conv's groups or its padding mode computes a different function with the same output
shape, so a method refuses such a conv by name instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from cnnpress.errors import ConfigError

__all__ = ["Represents", "numeric_padding", "out_hw", "out_size", "pair"]


def pair(value: Any) -> tuple[int, int]:
    """``(v, v)`` from an int, the pair itself from a pair."""
    if isinstance(value, (tuple, list)):
        first, second = value
        return int(first), int(second)
    return int(value), int(value)


def out_size(size: int, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1) -> int:
    """Output length of a conv along one axis: ``(size + 2p - d(k-1) - 1) // s + 1``."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def out_hw(layer: Any, height: int, width: int) -> tuple[int, int]:
    """Output height and width of a conv-like ``layer`` (``kernel_size``, ``stride``,
    ``padding``, ``dilation``; padding may be ``"same"`` or ``"valid"``) for an input of
    ``height`` x ``width``."""
    padding = layer.padding
    if padding == "same":
        return height, width
    (kh, kw), (sh, sw) = pair(layer.kernel_size), pair(layer.stride)
    (ph, pw) = (0, 0) if padding == "valid" else pair(padding)
    (dh, dw) = pair(getattr(layer, "dilation", 1))
    return out_size(height, kh, sh, ph, dh), out_size(width, kw, sw, pw, dw)


def numeric_padding(conv: nn.Conv2d) -> tuple[int, int] | None:
    """The conv's padding as ``(ph, pw)``: ``"valid"`` is 0, ``"same"`` is ``d(k-1)/2`` where
    that is whole; ``None`` where PyTorch pads unevenly (``"same"`` with an even ``d(k-1)``)."""
    if not isinstance(conv.padding, str):
        return pair(conv.padding)
    if conv.padding == "valid":
        return 0, 0
    total = [d * (k - 1) for d, k in zip(pair(conv.dilation), pair(conv.kernel_size), strict=True)]
    if any(t % 2 for t in total):
        return None
    return total[0] // 2, total[1] // 2


@dataclass(frozen=True)
class Represents:
    """What of a ``Conv2d``'s geometry a method's layer reproduces.

    Every compressed conv keeps the channels, kernel size, stride and padding amounts; these
    flags say what else it keeps. A conv with something the layer lacks is left out by the
    default rule and refused by name when a ``layers`` setting includes it.

    Attributes:
        groups: Grouped convs (``groups > 1``, depthwise ones included).
        dilation: Dilated convs.
        padding_mode: Padding other than zeros (``"reflect"``, ``"replicate"``, ``"circular"``).
        uneven_padding: ``padding="same"`` where PyTorch pads one side more (an even
            ``d(k-1)``); numeric, ``"valid"`` and even ``"same"`` padding are always kept.
    """

    groups: bool = False
    dilation: bool = True
    padding_mode: bool = False
    uneven_padding: bool = False

    def missing(self, conv: nn.Module) -> str | None:
        """What of ``conv`` the layer cannot represent (a phrase), or ``None`` when nothing."""
        if not isinstance(conv, nn.Conv2d):
            return None
        if conv.groups != 1 and not self.groups:
            return f"grouped convs (groups={conv.groups})"
        if any(d != 1 for d in pair(conv.dilation)) and not self.dilation:
            return f"dilated convs (dilation={pair(conv.dilation)})"
        if conv.padding_mode != "zeros" and not self.padding_mode:
            return f"padding_mode={conv.padding_mode!r} (its layer pads with zeros)"
        if numeric_padding(conv) is None and not self.uneven_padding:
            return "padding='same' with an even kernel extent (PyTorch pads it unevenly)"
        return None

    def check(self, conv: nn.Module, name: str = "", method: str = "this method") -> None:
        """Raise one ``ConfigError`` naming the layer when ``conv`` is not representable."""
        what = self.missing(conv)
        if what is not None:
            at, key = (f"layer {name}: ", name) if name else ("", "NAME")
            raise ConfigError(
                f"{at}{method} cannot represent {what}; leave it out (layers: {{{key}: null}})"
            )
