"""Bits, MACs and binary operations per layer, and the summary table.

Standard layers: FLOPs from ``torch.utils.flop_counter`` (one MAC = two FLOPs), storage as
float32 parameters plus the buffers inference needs. Compressed layers: the method's own
``cost`` (the same numbers that its packed form holds).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from cnnpress.errors import ConfigError
from cnnpress.floats import stored_float_bits
from cnnpress.format.layout import folds
from cnnpress.methods import method_for
from cnnpress.methods.base import LayerCost
from cnnpress.models import from_arch

__all__ = [
    "MAX_INPUT_PIXELS",
    "Summary",
    "SummaryRow",
    "check_input_shape",
    "inference_numel",
    "summary",
]

_SKIP_BUFFERS = ("num_batches_tracked",)


@dataclass
class SummaryRow:
    """One layer: what it stores and what it computes for one input."""

    name: str
    kind: str
    weights: int
    stored_bits: int
    fp32_bits: int
    macs: int
    binary_macs: int
    adds: int
    compressed: bool
    file_bytes: int | None = None
    flash_bytes: int | None = None  # of the C program (export --c): weights and descriptors
    ram_bytes: int | None = None  # of the C program: activations alive as it runs, scratch

    @property
    def ratio(self) -> float:
        """fp32 bits over stored bits."""
        return self.fp32_bits / self.stored_bits if self.stored_bits else float("inf")

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "ratio": self.ratio}


@dataclass
class Summary:
    """Per-layer rows and their totals (``totals`` are the sums of ``rows``)."""

    rows: list[SummaryRow]
    totals: dict[str, Any]
    input_shape: tuple[int, ...]
    file: dict[str, Any] | None = None
    device: dict[str, Any] | None = None
    #: ``{"bits", "observer"}`` of a model with quantized activations (one scale and zero
    #: point per tensor, the same width for every layer); ``None`` for float activations.
    activations: dict[str, Any] | None = None

    def attach_device(self, memory: dict[str, Any]) -> None:
        """Add the C program's flash and RAM (``cnnpress.runtime.c_memory``): ``flash_bytes``
        per row (its weights and its operations' descriptors) and ``self.device``, the totals
        (flash: weights, descriptors; RAM: arena, scratch); ``{"error": why}`` where the
        model has no C program."""
        per_layer = {r["layer"]: r for r in memory.get("layers", [])}
        for r in self.rows:
            row = per_layer.get(r.name, {})
            if "error" not in memory:
                r.flash_bytes = row.get("const_bytes", 0) + row.get("descriptor_bytes", 0)
                r.ram_bytes = row.get("live_bytes", 0)
        self.device = {k: v for k, v in memory.items() if k not in ("layers", "files")}

    def attach_file(self, info: dict[str, Any]) -> None:
        """Add the real file's byte counts (from ``cnnpress.format.read_info``).

        Sets ``file_bytes`` per row (its arrays, each rounded to whole bytes) and
        ``self.file``: header, payload and file bytes and the ratio of fp32 parameter bytes
        to file bytes (the compression ratio cnnpress reports).
        """
        per_module: dict[str, int] = {}
        for a in info["arrays"]:
            per_module[a["module"]] = per_module.get(a["module"], 0) + a["bytes"]
        for r in self.rows:
            r.file_bytes = per_module.get(r.name, 0)
        fp32_bytes = self.totals["reference_fp32_bits"] / 8
        self.file = {
            "header_bytes": info["header_bytes"],
            "checksum_bytes": info["checksum_bytes"],
            "payload_bytes": info["payload_bytes"],
            "file_bytes": info["file_bytes"],
            "fp32_bytes": fp32_bytes,
            "ratio": fp32_bytes / info["file_bytes"],
            "payload_ratio": fp32_bytes / info["payload_bytes"],
            "header_share": info["header_bytes"] / info["file_bytes"],
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "input_shape": list(self.input_shape),
            "rows": [r.to_dict() for r in self.rows],
            "totals": self.totals,
            "file": self.file,
            "device": self.device,
            "activations": self.activations,
        }

    def table(self) -> Table:
        """A rich table of the rows and totals (and the file's bytes when attached)."""
        t = Table(
            title=f"cnnpress summary, input {tuple(self.input_shape)}\n{self.activations_line()}"
        )
        cols = (
            [
                "layer",
                "kind",
                "weights",
                "stored bits",
                "fp32 bits",
                "ratio",
                "MACs",
                "binary MACs",
                "adds",
            ]
            + (["file bytes"] if self.file else [])
            + (["flash bytes", "RAM bytes"] if self._flash else [])
        )
        for col in cols:
            t.add_column(col, justify="left" if col in ("layer", "kind") else "right")

        def add(name: str, kind: str, weights: str, r: dict[str, Any], fb: str, **kw: Any) -> None:
            cells = [
                name,
                kind,
                weights,
                f"{r['stored_bits']:,}",
                f"{r['fp32_bits']:,}",
                f"{r['ratio']:.1f}x",
                f"{r['macs']:,}",
                f"{r['binary_macs']:,}",
                f"{r['adds']:,}",
            ]
            device = [kw.pop("flash", ""), kw.pop("ram", "")]
            t.add_row(*cells, *([fb] if self.file else []), *(device if self._flash else []), **kw)

        for r in self.rows:
            ram = f"{r.ram_bytes:,}" if r.ram_bytes else ""
            add(
                r.name,
                r.kind,
                f"{r.weights:,}",
                r.to_dict(),
                f"{r.file_bytes or 0:,}",
                flash=f"{r.flash_bytes or 0:,}",
                ram=ram,
            )
        tot = self.totals
        t.add_section()
        fb = f"{self.file['payload_bytes']:,}" if self.file else ""
        flash = f"{self.device['flash_bytes']:,}" if self._flash else ""
        ram = f"{self.device['ram_bytes']:,}" if self._flash else ""
        add("total", "", f"{tot['weights']:,}", tot, fb, style="bold", flash=flash, ram=ram)
        if tot["compressed_layers"]:
            t.add_row(
                "compressed layers",
                str(tot["compressed_layers"]),
                "",
                f"{tot['compressed_stored_bits']:,}",
                f"{tot['compressed_fp32_bits']:,}",
                f"{tot['compressed_ratio']:.1f}x",
            )
        if self.file:
            f = self.file
            t.caption = (
                f"file {f['file_bytes']:,} bytes = header {f['header_bytes']:,} + "
                f"payload {f['payload_bytes']:,} + checksum {f['checksum_bytes']}; "
                f"fp32 parameters {f['fp32_bytes']:,.0f} bytes; compression ratio "
                f"{f['ratio']:.1f}x (payload only {f['payload_ratio']:.1f}x)"
            )
        if self.device:
            t.caption = ((t.caption or "") + "\n" + self._device_line()).strip()
        return t

    def activations_line(self) -> str:
        """What the activations are: ``activations: int8 per tensor (mse observer)``, the same
        width for every layer, or ``activations: float32``."""
        a = self.activations
        if not a:
            return "activations: float32"
        return f"activations: int{a['bits']} per tensor ({a['observer']} observer)"

    @property
    def _flash(self) -> bool:
        return bool(self.device) and "error" not in self.device

    def _device_line(self) -> str:
        d = self.device or {}
        if "error" in d:
            return f"C program (export --c): none ({d['error']})"
        requant = d.get("requant_bytes", 0)
        table = f" + requantization {requant:,}" if requant else ""
        return (
            f"C program (export --c, {d.get('activations', 'float32')} activations): flash "
            f"{d['flash_bytes']:,} bytes = weights {d['const_bytes']:,} + {d['ops']} operation "
            f"descriptors {d['descriptor_bytes']:,}{table} (+ code); RAM {d['ram_bytes']:,} "
            f"bytes: one arena of activation maps and kernel scratch (at most "
            f"{d['scratch_bytes']:,} for one operation)"
        )

    def __str__(self) -> str:
        console = Console(width=160, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
        console.print(self.table())
        return console.export_text()


def inference_numel(module: nn.Module) -> int:
    """Parameters plus the buffers inference needs, of this module alone (not its children)."""
    n = sum(p.numel() for p in module.parameters(recurse=False))
    n += sum(
        b.numel() for name, b in module.named_buffers(recurse=False) if name not in _SKIP_BUFFERS
    )
    return n


def _stored_float_bits(module: nn.Module, float_bits: int, fold_batchnorm: bool) -> int:
    """Bits of a module kept in floats: its parameters and inference buffers (a folded
    BatchNorm: a scale and a shift per channel) at ``float_bits`` (:mod:`cnnpress.floats`)."""
    if folds(module, fold_batchnorm):
        return 2 * stored_float_bits((module.num_features,), float_bits)
    tensors = list(module.parameters(recurse=False))
    tensors += [b for n, b in module.named_buffers(recurse=False) if n not in _SKIP_BUFFERS]
    return sum(
        stored_float_bits(tuple(t.shape), float_bits) for t in tensors if torch.is_floating_point(t)
    )


def _weight_count(module: nn.Module) -> int:
    if hasattr(module, "fp32_bits"):
        return module.fp32_bits() // 32
    return inference_numel(module)


#: The largest H x W a summary runs the model on (a forward pass of one image).
MAX_INPUT_PIXELS = 2048 * 2048


def check_input_shape(model: nn.Module, input_shape: tuple[int, ...]) -> None:
    """Refuse an input shape that is not (C, H, W) of positive integers, whose C is not the
    model's input channels, or whose H x W exceeds :data:`MAX_INPUT_PIXELS` (one line)."""
    shape = tuple(input_shape) if isinstance(input_shape, (tuple, list)) else ()
    ints = all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in shape)
    if len(shape) != 3 or not ints:
        raise ConfigError(
            f"the input shape must be C,H,W (three positive integers), got {input_shape!r:.60}"
        )
    channels = (getattr(model, "cnnpress_arch", None) or {}).get("in_channels")
    c, h, w = shape
    if channels is not None and c != channels:
        raise ConfigError(
            f"the model takes {channels}-channel inputs, the input shape {c}x{h}x{w} has {c}"
        )
    if h * w > MAX_INPUT_PIXELS:
        raise ConfigError(
            f"the input shape {c}x{h}x{w} is too large (at most {MAX_INPUT_PIXELS:,} pixels)"
        )


def summary(
    model: nn.Module,
    input_shape: tuple[int, ...],
    float_bits: int = 32,
    fold_batchnorm: bool = False,
) -> Summary:
    """Per-layer storage and operations of ``model`` for one input of ``input_shape`` (C, H, W).

    Args:
        model: Any model; layers of registered methods are costed by their method. A model
            with quantized activations (``cnnpress.quantize``, or a file that records them) is
            costed as its float model, and ``Summary.activations`` says their width.
        input_shape: Shape of one input without the batch dimension.
        float_bits: Width at which floating-point tensors are stored (32, 16, or 8 for int8
            with scales: :mod:`cnnpress.floats`); the fp32 reference stays at 32 bits.
        fold_batchnorm: BatchNorm stored as 2 values per channel (scale and shift), as
            ``cnnpress.save(..., fold_batchnorm=True)`` writes it.

    Returns:
        A :class:`Summary`; ``totals`` are sums over ``rows`` plus the ratios.

    Raises:
        ConfigError: ``input_shape`` is not three positive integers, not of the channels the
            model takes, larger than :data:`MAX_INPUT_PIXELS`, or a shape the model cannot run.
    """
    model, width = _float_model(model)
    check_input_shape(model, input_shape)
    leaves: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        method = method_for(module)
        is_leaf = next(module.children(), None) is None
        if method is not None or (is_leaf and inference_numel(module) > 0):
            leaves[name] = module
    shapes, flops = _trace(model, leaves, input_shape)
    prefix = type(model).__name__
    rows = []
    for name, module in leaves.items():
        method = method_for(module)
        if method is not None:
            cost: LayerCost = method.cost(module, shapes.get(name, input_shape), float_bits)
        else:
            numel = inference_numel(module)
            stored = _stored_float_bits(module, float_bits, fold_batchnorm)
            macs = sum(flops.get(f"{prefix}.{name}", {}).values()) // 2
            cost = LayerCost(stored_bits=stored, fp32_bits=32 * numel, macs=macs)
        rows.append(
            SummaryRow(
                name,
                type(module).__name__,
                _weight_count(module),
                cost.stored_bits,
                cost.fp32_bits,
                cost.macs,
                cost.binary_macs,
                cost.adds,
                method is not None,
            )
        )
    totals = _totals(rows, _reference_fp32_bits(model))
    return Summary(rows, totals, tuple(input_shape), activations=width)


def _float_model(model: nn.Module) -> tuple[nn.Module, dict[str, Any] | None]:
    """The model whose layers are costed, and the activations' ``{"bits", "observer"}``: a
    model with quantized activations (whose forward is the integer program, which calls no
    layer) is costed as its float model."""
    activations = getattr(model, "cnnpress_activations", None)
    if not activations:
        return model, None
    return model.float_model, {"bits": activations["bits"], "observer": activations["observer"]}


def _trace(
    model: nn.Module, leaves: dict[str, nn.Module], input_shape: tuple[int, ...]
) -> tuple[dict[str, tuple[int, ...]], dict[str, Any]]:
    """One forward pass of a zero input: each leaf's input shape and the FLOPs per module.

    Raises:
        ConfigError: The model cannot run on ``input_shape``.
    """
    shapes: dict[str, tuple[int, ...]] = {}

    def record(name: str):  # noqa: ANN202
        def hook(_module: nn.Module, args: tuple) -> None:
            shapes.setdefault(name, tuple(args[0].shape[1:]))

        return hook

    hooks = [m.register_forward_pre_hook(record(name)) for name, m in leaves.items()]
    counter = FlopCounterMode(display=False)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), counter:
            model(torch.zeros(1, *input_shape, device=_device(model)))
    except RuntimeError as err:  # a spatial size the architecture cannot take
        shape = "x".join(map(str, input_shape))
        problem = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"the model cannot run on a {shape} input ({problem})") from None
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return shapes, counter.get_flop_counts()


def _reference_fp32_bits(model: nn.Module) -> int | None:
    """fp32 bits of the uncompressed architecture (methods may change shapes, e.g. pruning)."""
    arch = getattr(model, "cnnpress_arch", None)
    if arch is None:
        return None
    original = from_arch(arch)
    return 32 * sum(inference_numel(m) for m in original.modules())


def _totals(rows: list[SummaryRow], reference_fp32_bits: int | None) -> dict[str, Any]:
    tot: dict[str, Any] = {
        key: sum(getattr(r, key) for r in rows)
        for key in ("weights", "stored_bits", "fp32_bits", "macs", "binary_macs", "adds")
    }
    # the ratio is against the original model in fp32 (the rows' fp32 bits describe the layers
    # as they are, which differs only where a method changed shapes)
    tot["reference_fp32_bits"] = reference_fp32_bits or tot["fp32_bits"]
    tot["ratio"] = tot["reference_fp32_bits"] / tot["stored_bits"] if tot["stored_bits"] else 0.0
    comp = [r for r in rows if r.compressed]
    tot["compressed_layers"] = len(comp)
    tot["compressed_stored_bits"] = sum(r.stored_bits for r in comp)
    tot["compressed_fp32_bits"] = sum(r.fp32_bits for r in comp)
    tot["compressed_ratio"] = (
        tot["compressed_fp32_bits"] / tot["compressed_stored_bits"] if comp else 1.0
    )
    return tot


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")
