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

from cnnpress.methods.base import METHODS, LayerCost

__all__ = ["Summary", "SummaryRow", "inference_numel", "summary"]

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

    def to_dict(self) -> dict[str, Any]:
        return {
            "input_shape": list(self.input_shape),
            "rows": [r.to_dict() for r in self.rows],
            "totals": self.totals,
        }

    def table(self) -> Table:
        """A rich table of the rows and totals."""
        t = Table(title=f"cnnpress summary, input {tuple(self.input_shape)}")
        for col in (
            "layer",
            "kind",
            "weights",
            "stored bits",
            "fp32 bits",
            "ratio",
            "MACs",
            "binary MACs",
            "adds",
        ):
            t.add_column(col, justify="left" if col in ("layer", "kind") else "right")
        for r in self.rows:
            t.add_row(
                r.name,
                r.kind,
                f"{r.weights:,}",
                f"{r.stored_bits:,}",
                f"{r.fp32_bits:,}",
                f"{r.ratio:.1f}x",
                f"{r.macs:,}",
                f"{r.binary_macs:,}",
                f"{r.adds:,}",
            )
        tot = self.totals
        t.add_section()
        t.add_row(
            "total",
            "",
            f"{tot['weights']:,}",
            f"{tot['stored_bits']:,}",
            f"{tot['fp32_bits']:,}",
            f"{tot['ratio']:.1f}x",
            f"{tot['macs']:,}",
            f"{tot['binary_macs']:,}",
            f"{tot['adds']:,}",
            style="bold",
        )
        if tot["compressed_layers"]:
            t.add_row(
                "compressed layers",
                f"{tot['compressed_layers']}",
                "",
                f"{tot['compressed_stored_bits']:,}",
                f"{tot['compressed_fp32_bits']:,}",
                f"{tot['compressed_ratio']:.1f}x",
                "",
                "",
                "",
            )
        return t

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


def _method_for(module: nn.Module) -> Any | None:
    for name in METHODS.names():
        cls = METHODS.get(name)
        if cls.layer_types and isinstance(module, cls.layer_types):
            return cls()
    return None


def _weight_count(module: nn.Module) -> int:
    if hasattr(module, "fp32_bits"):
        return module.fp32_bits() // 32
    return inference_numel(module)


def summary(model: nn.Module, input_shape: tuple[int, ...]) -> Summary:
    """Per-layer storage and operations of ``model`` for one input of ``input_shape`` (C, H, W).

    Args:
        model: Any model; layers of registered methods are costed by their method.
        input_shape: Shape of one input without the batch dimension.

    Returns:
        A :class:`Summary`; ``totals`` are sums over ``rows`` plus the ratios.
    """
    leaves: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        method = _method_for(module)
        is_leaf = next(module.children(), None) is None
        if method is not None or (is_leaf and inference_numel(module) > 0):
            leaves[name] = module
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
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    flops = counter.get_flop_counts()
    prefix = type(model).__name__
    rows = []
    for name, module in leaves.items():
        method = _method_for(module)
        if method is not None:
            cost: LayerCost = method.cost(module, shapes.get(name, input_shape))
        else:
            bits = 32 * inference_numel(module)
            macs = sum(flops.get(f"{prefix}.{name}", {}).values()) // 2
            cost = LayerCost(stored_bits=bits, fp32_bits=bits, macs=macs)
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
    return Summary(rows, _totals(rows), tuple(input_shape))


def _totals(rows: list[SummaryRow]) -> dict[str, Any]:
    tot: dict[str, Any] = {
        key: sum(getattr(r, key) for r in rows)
        for key in ("weights", "stored_bits", "fp32_bits", "macs", "binary_macs", "adds")
    }
    tot["ratio"] = tot["fp32_bits"] / tot["stored_bits"] if tot["stored_bits"] else 0.0
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
