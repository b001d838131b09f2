"""The method contract: what every compression method provides.

A method is a registered class with a frozen config dataclass. ``convert`` replaces the layers
it compresses (default rule: every ``Conv2d`` but the first; ``Linear`` layers on request;
per-layer overrides by module name or glob). The training behaviour lives in the new layers.
``cost`` reports stored bits and operations from the same numbers that a packed file holds.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
from torch import nn

from cnnpress.errors import ConfigError
from cnnpress.floats import check_float_bits
from cnnpress.geometry import Represents
from cnnpress.registry import Registry
from cnnpress.typecheck import check_fields

__all__ = [
    "ANY_CONV",
    "METHODS",
    "MODEL_SETTINGS",
    "PLAIN_CONV",
    "CTarget",
    "LayerCost",
    "Method",
    "MethodConfig",
    "config_from_dict",
    "following_batchnorm",
    "replace_module",
    "select_layers",
    "slimming_penalty",
    "to_numpy",
]

METHODS: Registry = Registry("method")

#: What a layer that computes a plain zero-padded conv represents (the default).
PLAIN_CONV = Represents()
#: What a layer that keeps every setting of the conv it replaces represents.
ANY_CONV = Represents(groups=True, dilation=True, padding_mode=True, uneven_padding=True)
#: Candidate layers named at most in the "nothing to compress" message.
_SHOWN = 8


@dataclass(frozen=True)
class LayerCost:
    """Storage and work of one layer at one input size.

    Attributes:
        stored_bits: Bits the layer needs at inference, as packed in a file.
        fp32_bits: Bits of the same layer kept in float32 (what it replaces).
        macs: Full-precision multiply-accumulates.
        binary_macs: Multiply-accumulates with a +-1 weight (an add or a subtract).
        adds: Plain additions (for example SLBF's merge of slice responses).
    """

    stored_bits: int
    fp32_bits: int
    macs: int = 0
    binary_macs: int = 0
    adds: int = 0


@dataclass(frozen=True)
class MethodConfig:
    """Settings shared by every method.

    Attributes:
        include_first: Also compress the first convolution (default rule keeps it fp32).
        include_linear: Also compress Linear layers (the classifier).
        layers: Per-layer overrides, ``{name-or-glob: {setting: value}}``, applied in order.
            A value of ``None`` or ``{"skip": True}`` keeps the layer in fp32;
            ``{"include": True}`` compresses a layer the default rule leaves alone.
        float_bits: Float width of the saved file for the floats that are not bit-packed
            (BatchNorm, scales, biases, centroids, uncompressed layers): 32, 16 (float16) or
            8 (int8 with a float32 scale per row, :mod:`cnnpress.floats`).
        fold_batchnorm: Store each BatchNorm folded into a scale and a shift (the file is then
            for inference, not further training).
        entropy: Huffman-code the packed integer streams (SLBF selections, cluster indices)
            where that is smaller. ``float_bits``, ``fold_batchnorm`` and ``entropy`` are how
            ``cnnpress.save`` writes the model unless its own arguments say otherwise.
    """

    include_first: bool = False
    include_linear: bool = False
    layers: dict[str, Any] = dataclasses.field(default_factory=dict)
    float_bits: int = 32
    fold_batchnorm: bool = False
    entropy: bool = False

    def __post_init__(self) -> None:
        check_float_bits(self.float_bits)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able settings."""
        return dataclasses.asdict(self)


#: ``MethodConfig`` fields about the whole model (which layers, how the file is saved), as
#: opposed to the per-layer settings a method builds its layers from.
MODEL_SETTINGS = (
    "include_first",
    "include_linear",
    "layers",
    "float_bits",
    "fold_batchnorm",
    "entropy",
)


def config_from_dict(cls: type, values: dict[str, Any]) -> Any:
    """Build config ``cls`` from a dict, refusing unknown keys and values of the wrong type
    (``num_filters: many``, ``include_first: 1``) with one clear line each."""
    if not isinstance(values, dict):
        raise ConfigError(f"the settings of {cls.__name__} must be a mapping, got {values!r:.60}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(str(key) for key in values if key not in known)
    if unknown:
        raise ConfigError(
            f"unknown setting(s) {', '.join(unknown)} for {cls.__name__}; "
            f"valid settings: {', '.join(sorted(known))}"
        )
    try:
        config = cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError, ArithmeticError) as err:
        check_fields(cls, values)  # a value of the wrong type: say which, and what it needs
        raise ConfigError(f"bad settings for {cls.__name__}: {err}") from None
    check_fields(cls, values)  # the checks of ``cls`` let this value pass; its type does not
    return config


def select_layers(
    model: nn.Module,
    config: MethodConfig,
    kinds: tuple[type, ...] = (nn.Conv2d, nn.Linear),
    represents: Represents = PLAIN_CONV,
    method: str = "this method",
) -> list[tuple[str, nn.Module, dict[str, Any]]]:
    """The layers a method compresses, with their per-layer setting overrides.

    Default rule: every ``nn.Conv2d`` with ``groups == 1`` that the method's layer can
    represent (``represents``; the default is a plain conv: zero padding, even padding)
    except the first one met in module order, and ``nn.Linear`` layers only when
    ``config.include_linear``. A ``layers`` setting can include any other layer the method
    represents (``{"include": True}``; a grouped conv, say, for a method that keeps groups).

    Returns:
        ``(name, module, overrides)`` for each selected layer, in module order.

    Raises:
        ConfigError: A ``layers`` pattern matches no layer; a layer that ``layers`` includes
            is a conv the method cannot represent (named, with what it lacks); or no layer is
            selected at all (the message names the model's candidate layers, why each was
            left out and how to include one).
    """
    chosen = []
    first_conv_seen = False
    patterns = dict(config.layers)
    matched: set[str] = set()
    left_out: list[str] = []  # "name (kind: why)" of each candidate not chosen
    for name, module in model.named_modules():
        if not isinstance(module, kinds):
            continue
        if isinstance(module, nn.Conv2d):
            missing = represents.missing(module)
            if not (first_conv_seen or config.include_first):
                why = "the first conv, include_first"
            elif module.groups != 1:
                why = f"groups={module.groups}"
            else:
                why = f"cannot represent {missing}" if missing else ""
            first_conv_seen = True
        else:
            why = "" if config.include_linear else "include_linear"
        include, overrides = not why, {}
        for pattern, value in patterns.items():
            if not fnmatch.fnmatchcase(name, pattern):
                continue
            matched.add(pattern)
            if value is None:
                include, why = False, f"left out by layers[{pattern!r}]"
                continue
            if not isinstance(value, dict):
                raise ConfigError(f"layers[{pattern!r}] must be a mapping of settings or null")
            value = dict(value)
            if value.pop("skip", False):
                include, why = False, f"left out by layers[{pattern!r}]"
            if value.pop("include", False):
                include = True
            overrides.update(value)
        if include:
            represents.check(module, name, method)
            chosen.append((name, module, overrides))
        else:
            left_out.append(f"{name} ({type(module).__name__}: {why})")
    unused = sorted(set(patterns) - matched)
    if unused:
        raise ConfigError(f"layer pattern(s) {', '.join(unused)} match no layer of the model")
    if not chosen:
        raise ConfigError(_nothing_to_compress(model, kinds, method, left_out))
    return chosen


def _nothing_to_compress(
    model: nn.Module, kinds: tuple[type, ...], method: str, left_out: list[str]
) -> str:
    """One line: no layer was selected, what the default rule takes, and how to include one."""
    where = f"{method} finds nothing to compress in {type(model).__name__}"
    if not left_out:
        kind = " or ".join(k.__name__ for k in kinds)
        return f"{where}: it has no {kind} layer"
    rule = "every Conv2d (groups 1, one it can represent) but the first"
    if nn.Linear in kinds:
        rule += ", and Linear layers only with include_linear"
    shown = left_out[:_SHOWN]
    if len(left_out) > _SHOWN:
        shown.append(f"{len(left_out) - _SHOWN} more")
    how = "layers: {NAME: {include: true}}" + (
        ", include_first: true or include_linear: true"
        if nn.Linear in kinds
        else " or include_first: true"
    )
    return (
        f"{where}: the default rule takes {rule}; candidate layers: {', '.join(shown)}; "
        f"include one with {how}"
    )


def following_batchnorm(model: nn.Module) -> dict[str, nn.Module]:
    """For each conv/linear layer whose next leaf module is a BatchNorm of its width: that BN."""
    found: dict[str, nn.Module] = {}
    previous: tuple[str, nn.Module] | None = None
    for name, module in model.named_modules():
        if next(module.children(), None) is not None:
            continue
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)) and previous is not None:
            prev_name, prev = previous
            width = getattr(prev, "out_channels", getattr(prev, "out_features", None))
            if width == module.num_features:
                found[prev_name] = module
        previous = (name, module) if isinstance(module, (nn.Conv2d, nn.Linear)) else None
    return found


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A tensor's values as :meth:`Method.pack` gives them: detached, on the CPU, floats as
    float32 whatever the layer's dtype (numpy has no bfloat16; the file stores each float at
    its own ``float_bits``)."""
    values = tensor.detach().cpu()
    return (values.float() if values.is_floating_point() else values).numpy()


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule called ``name`` is."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


class CTarget(Protocol):
    """What the C export tells :meth:`Method.c_weights` about one layer it lowers.

    The C runtime (:mod:`cnnpress.runtime`) implements it; a method reads it and names no part
    of the runtime.

    Attributes:
        geometry: The layer's conv descriptor so far: ``c, h, w, n, oh, ow, kh, kw, sh, sw,
            ph, pw, dh, dw, groups`` (a linear layer is a 1x1 conv over a 1x1 input).
        weight_kinds: The C conv kernel's weight kinds by name (``"dense"``, ``"slbf"``,
            ``"binary"``, ``"sparse"``, ``"kmeans"``; the C interface's ``WEIGHT``).
        defines: The C runtime's constants by name (``CNNP_TILE``, ...).
        huff: Which of the layer's streams the file Huffman-codes: 1 ``indices``,
            2 ``positions`` (or both, 3).
    """

    geometry: Mapping[str, int]
    weight_kinds: Mapping[str, int]
    defines: Mapping[str, int]
    huff: int

    def array(self, name: str) -> Any | None:
        """The layer's array ``name`` of the file, as a descriptor refers to it (``None``
        where the file has no such array)."""

    def huff_ints(self, alphabet: int) -> int:
        """Scratch (32-bit words) of one Huffman decoder's tables over ``alphabet`` symbols."""


class Method:
    """Base class of compression methods. Subclasses set ``name``, ``Config``, ``layer_types``.

    Subclasses implement :meth:`convert` and :meth:`cost`; training hooks are optional.
    ``convert`` selects its layers with ``select_layers(..., represents=self.represents,
    method=self.name)``.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type] = MethodConfig
    layer_types: ClassVar[tuple[type, ...]] = ()
    #: What of a conv's geometry the method's layers keep (:class:`cnnpress.geometry.Represents`).
    represents: ClassVar[Represents] = PLAIN_CONV
    #: Config fields that record what training changes (a pruning mask's layout). A checkpoint
    #: restores them with its tensors (then :meth:`sync`), so a freshly built model's may differ.
    trained_state: ClassVar[tuple[str, ...]] = ()
    #: The C conv kernel's weight kinds (:attr:`CTarget.weight_kinds`) the method's layers
    #: lower to; empty (default): the C export has no kernel for its layers.
    c_kinds: ClassVar[tuple[str, ...]] = ()
    #: Parameter names (the last part of a parameter's name) that take no weight decay.
    no_decay: ClassVar[tuple[str, ...]] = ()
    #: Whether a run that compresses trained weights (``--init``) distils from them unless
    #: told otherwise (``--no-kd``).
    distil_from_init: ClassVar[bool] = False

    def resolve(self, model: nn.Module, config: Any) -> Any:
        """Fill data-dependent decisions into the config before :meth:`convert`.

        ``compress`` records the returned config, and a file rebuilds the model from it, so a
        decision that changes shapes (for example how many channels filter pruning keeps) must
        be made here and written into the config. Default: the config unchanged.
        """
        return config

    def convert(self, model: nn.Module, config: Any) -> nn.Module:
        """Replace the layers this method compresses, in place; returns the model.

        Must give the same shapes for the same config, whatever the weights are.
        """
        raise NotImplementedError

    def cost(
        self, layer: nn.Module, input_shape: tuple[int, ...], float_bits: int = 32
    ) -> LayerCost:
        """Stored bits and operations of one compressed layer for one input (C, H, W).

        ``float_bits`` is the width its floating-point parts (scales, biases) are stored at.
        """
        raise NotImplementedError

    def pack(self, layer: nn.Module, float_bits: int = 32) -> dict[str, tuple[str, Any]]:
        """The exact stored form: ``{name: (encoding, numpy array)}`` (:func:`to_numpy`: from
        any device and float dtype).

        Encodings: ``"f4"`` float32, ``"f2"`` float16, ``"q8"`` int8 with scales
        (:func:`cnnpress.floats.float_encoding` of ``float_bits`` for floats), ``"uB"``
        unsigned integers of B bits.
        """
        raise NotImplementedError

    def unpack(self, layer: nn.Module, arrays: dict[str, Any]) -> None:
        """Load what :meth:`pack` wrote into a freshly converted layer of the same config."""
        raise NotImplementedError

    def on_epoch_end(self, model: nn.Module, epoch: int, epochs: int) -> None:
        """Called after each training epoch (schedules). Default: nothing."""

    def snapshot(self, model: nn.Module) -> Any | None:
        """The state of the layers' discrete parts before an epoch, or ``None`` (default)."""
        return None

    def learning_stats(self, model: nn.Module, before: Any) -> dict[str, Any] | None:
        """What an epoch changed in the discrete parts since ``before`` (a :meth:`snapshot`):
        for example bits flipped and selections changed, in total and per layer. Recorded in
        each epoch's ``metrics.jsonl`` line under ``"learning"``. Default: ``None``."""
        return None

    def sync(self, model: nn.Module) -> None:
        """Bring ``model.cnnpress_method``'s config in line with the layers' current state.

        Called before a file or checkpoint records the config (for example a pruning mask
        that changed during training changes the stored layout). Default: nothing.
        """

    def regulariser(self, model: nn.Module) -> Any | None:
        """A term added to the training loss each step (a scalar tensor), or ``None``."""
        return None

    def report(self, model: nn.Module) -> dict[str, Any]:
        """What a run's ``result.json`` records of the trained layers beyond sizes (for
        example SLBF's bank usage per layer). Default: nothing."""
        return {}

    # -- deployment: the exports (cnnpress.runtime) lower each layer through these -----------
    def c_weights(self, layer: nn.Module, target: CTarget) -> dict[str, Any] | str | None:
        """The weight fields of the C conv descriptor of ``layer`` (one of
        :attr:`layer_types`; the method has :attr:`c_kinds`).

        Returns:
            ``{"kind": target.weight_kinds[...], ...}``: the fields that differ from a dense
            layer's (``wt``, ``code``, ``code_bits``, ``pos``, ``pos_bits``, ``pos_count``,
            ``kept``, ``sel``, ``d``, ``m``, ``scale``, ``scale_n``, arrays as
            ``target.array(name)`` gives them) and ``scratch``, the 32-bit words of scratch
            its kernel needs; or a short reason why this layer has no C kernel (the export
            refuses it in one line with that reason); ``None`` (default): no C kernel.
        """
        return None

    def onnx_form(self, layer: nn.Module) -> str | None:
        """The compact form that keeps ``layer`` packed in an ONNX file of mode ``"stm"``: a
        name in :data:`cnnpress.runtime.stored.FORMS`, whose module reads ``layer``'s own
        parts. ``None`` (default): the layer is exported as a plain Conv / Gemm."""
        return None

    def use_plain_path(self, layer: nn.Module) -> None:
        """Make ``layer`` compute in eval mode with PyTorch's plain operations (the values the
        exports are checked against), not a fast path of its own. Default: nothing."""


def slimming_penalty(model: nn.Module, weight: float) -> torch.Tensor | None:
    """``weight * sum |gamma|`` over every affine BatchNorm of ``model`` (``None`` if none)."""
    gammas = [
        m.weight.abs().sum()
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None
    ]
    return weight * torch.stack(gammas).sum() if gammas else None
