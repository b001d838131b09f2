"""ONNX export of compressed models, with the SLBF layers either dense or split-transform-merge.

Two graph forms (``mode``):

* ``"dense"``: every compressed layer becomes a plain Conv / Gemm with the reconstructed float
  weights (:func:`cnnpress.runtime.dense.to_dense`). Any ONNX runtime runs it at full speed, but
  the file stores float weights.
* ``"stm"``: the file stays compressed. Every ``SLBFConv2d`` is exported as SLBF's
  split-transform-merge over its bank stored once, bit-packed into ``uint8`` and unpacked in
  the graph; a grouped Conv (``s`` groups) of the input with the bank tiled ``s`` times; a
  Gather of the ``n*s`` selected maps (the selections stored in the smallest integer type,
  ``uint8`` up to 256 filters); a Reshape to ``(N, n, s, H, W)``; a ReduceSum over the slices;
  then Mul by the scales and Add of the bias where the layer has them. Every other float is
  stored at the width the ``.cnnp`` keeps it (float16, or int8 with a scale per row, widened
  by the graph), BatchNorm as a per-channel scale and shift (:mod:`cnnpress.runtime.stored`).
  Linear SLBF layers (and the other methods' compressed layers) are dense.

The TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``) is used: it needs
neither ``onnxscript`` nor ``torch.export``, is fast, and maps ``index_select`` / ``sum`` to one
Gather / ReduceSum each. The batch axis is dynamic; channels and image size are fixed by
``input_shape``. The ``onnx`` package is needed to stamp the metadata and check the graph.
"""

from __future__ import annotations

import copy
import io
import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cnnpress.atomic import atomic_write_bytes
from cnnpress.errors import CnnpressError
from cnnpress.runtime.dense import dense_layer, is_compressed, replace_layers
from cnnpress.runtime.stored import form_name, packed_form, stored_form, stored_tensors

__all__ = ["DEFAULT_OPSET", "MAX_OPSET", "MIN_OPSET", "MODES", "export_onnx"]

MODES = ("dense", "stm")
#: Opset used when none is given: old enough for most runtimes, new enough for every op here.
DEFAULT_OPSET = 17
#: ReduceSum takes its axes as an input from opset 13 on.
MIN_OPSET = 13
#: The newest opset of torch's TorchScript-based exporter.
MAX_OPSET = 20
INPUT_NAME, OUTPUT_NAME, BATCH_AXIS = "input", "output", "batch"


def _check_input_shape(input_shape: Any) -> tuple[int, int, int]:
    ok = (
        isinstance(input_shape, (tuple, list))
        and len(input_shape) == 3
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in input_shape)
    )
    if not ok:
        raise CnnpressError(
            "input_shape must be (channels, height, width), three positive integers; "
            f"got {input_shape!r}"
        )
    return tuple(input_shape)  # type: ignore[return-value]


def _check_opset(opset: Any) -> int:
    if opset is None:
        return DEFAULT_OPSET
    if not isinstance(opset, int) or isinstance(opset, bool) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise CnnpressError(
            f"opset must be an integer from {MIN_OPSET} to {MAX_OPSET} (or None for "
            f"{DEFAULT_OPSET}); got {opset!r}"
        )
    return opset


def _float_dtype(model: nn.Module) -> torch.dtype:
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


def _run_once(model: nn.Module, x: torch.Tensor, watch: bool) -> dict[int, tuple[int, int]]:
    """Run ``model`` on ``x``; with ``watch``, return the input and output size
    ``(h_in, w_in, h_out, w_out)`` of each layer that has a compact form (an SLBF conv) by id."""
    sizes: dict[int, tuple[int, int]] = {}

    def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        x = inputs[0]
        sizes[id(module)] = (
            int(x.shape[-2]),
            int(x.shape[-1]),
            int(output.shape[-2]),
            int(output.shape[-1]),
        )

    handles = (
        [m.register_forward_hook(hook) for m in model.modules() if form_name(m) is not None]
        if watch
        else []
    )
    try:
        with torch.no_grad():
            model(x)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        shape = tuple(x.shape[1:])
        raise CnnpressError(f"input_shape {shape} does not fit the model: {first}") from err
    finally:
        for handle in handles:
            handle.remove()
    return sizes


def _deploy_model(model: nn.Module, mode: str, x: torch.Tensor) -> nn.Module:
    """A CPU copy in eval mode with the compressed layers in their export form."""
    work = copy.deepcopy(model).to("cpu").eval()
    sizes = _run_once(work, x, watch=mode == "stm")
    bits = stored_float_bits(model)
    if mode == "stm":
        work = replace_layers(work, lambda m: packed_form(m, bits, sizes))
    work = replace_layers(work, lambda m: dense_layer(m) if is_compressed(m) else None)
    if mode == "stm":  # the other floats at the width the file keeps them
        work = replace_layers(work, lambda m: stored_form(m, bits, sizes))
    return work.eval()


def stored_float_bits(model: nn.Module) -> int:
    """The width the model's file keeps its unpacked floats at (32 when unknown)."""
    storage = getattr(model, "cnnpress_storage", None) or {}
    config = (getattr(model, "cnnpress_method", None) or {}).get("config") or {}
    return int(storage.get("float_bits") or config.get("float_bits") or 32)


class _Fed(nn.Module):
    """``net`` with its stored tensors fed in as graph inputs: constant folding then leaves
    them as they are (it would widen them into float constants); they become initializers
    again after the export (:func:`_stored_to_initializers`)."""

    def __init__(self, net: nn.Module, stored: list[tuple[nn.Module, str]]) -> None:
        super().__init__()
        self.net, self.stored = net, stored

    def forward(self, x: torch.Tensor, *values: torch.Tensor) -> torch.Tensor:
        for (module, name), value in zip(self.stored, values, strict=True):
            setattr(module, name, value)
        return self.net(x)


def _stored_names(stored: list[tuple[nn.Module, str]]) -> list[str]:
    return [f"s{i}" for i in range(len(stored))]


def _exported(fed: _Fed, x: torch.Tensor, opset: int) -> bytes:
    stored = fed.stored
    values = [getattr(module, name).clone() for module, name in stored]
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter warns that it is deprecated, and about traces and folding.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx")
        torch.onnx.export(
            fed,
            (x, *values),
            buffer,
            dynamo=False,
            input_names=[INPUT_NAME, *_stored_names(stored)],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: BATCH_AXIS}, OUTPUT_NAME: {0: BATCH_AXIS}},
            opset_version=opset,
            do_constant_folding=True,
        )
    for (module, name), value in zip(stored, values, strict=True):
        setattr(module, name, value)
    return buffer.getvalue()


def _stored_to_initializers(proto: Any, stored: list[tuple[nn.Module, str]]) -> None:
    """The stored tensors, fed in as inputs for the export, as initializers (their values)."""
    from onnx import numpy_helper

    names = _stored_names(stored)
    keep = [i for i in proto.graph.input if i.name not in names]
    del proto.graph.input[:]
    proto.graph.input.extend(keep)
    for name, (module, attr) in zip(names, stored, strict=True):
        proto.graph.initializer.append(
            numpy_helper.from_array(getattr(module, attr).detach().cpu().numpy(), name)
        )


def _constants_to_initializers(graph: Any) -> None:
    """Every Constant node as an initializer, one per distinct value, and no Identity nodes
    (the exporter leaves one Constant node per use of ``2.0`` or of a shape)."""
    from onnx import numpy_helper

    alias: dict[str, str] = {}
    first: dict[tuple, str] = {}
    kept = []
    for node in graph.node:
        node.input[:] = [alias.get(n, n) for n in node.input]
        if node.op_type == "Identity" and node.output[0] != OUTPUT_NAME:
            alias[node.output[0]] = node.input[0]
            continue
        attrs = [a.name for a in node.attribute]
        if node.op_type == "Constant" and attrs == ["value"]:
            value = numpy_helper.to_array(node.attribute[0].t)
            key = (value.dtype.str, value.shape, value.tobytes())
            if key not in first:
                first[key] = node.output[0]
                graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
            alias[node.output[0]] = first[key]
            continue
        kept.append(node)
    for out in graph.output:
        out.name = alias.get(out.name, out.name)
    del graph.node[:]
    graph.node.extend(kept)


def _is_default(op: str, attr: Any) -> bool:
    """Whether ``attr`` of an ``op`` node says what its absence says (ONNX operator specs:
    a Conv's kernel_shape is inferred from its weight)."""
    if op == "Reshape":
        return attr.name == "allowzero" and attr.i == 0
    if op == "Gather":
        return attr.name == "axis" and attr.i == 0
    if op == "Conv":
        ones = len(attr.ints) > 0 and all(v == 1 for v in attr.ints)
        zeros = len(attr.ints) > 0 and all(v == 0 for v in attr.ints)
        return (
            attr.name == "kernel_shape"
            or (attr.name in ("dilations", "strides") and ones)
            or (attr.name == "pads" and zeros)
            or (attr.name == "group" and attr.i == 1)
        )
    return False


def _compact(graph: Any) -> None:
    """Short names for every value, node and initializer (the exporter's names, such as
    ``/layer1/layer1.0/conv1/Constant_21_output_0``, took most of a small model's file)."""
    short: dict[str, str] = {}

    def rename(name: str) -> str:
        if name in ("", INPUT_NAME, OUTPUT_NAME):
            return name
        return short.setdefault(name, format(len(short), "x"))

    for node in graph.node:
        node.name, node.doc_string = "", ""
        for attr in [a for a in node.attribute if _is_default(node.op_type, a)]:
            node.attribute.remove(attr)  # the default value, written out by the exporter
        node.input[:] = [rename(n) for n in node.input]
        node.output[:] = [rename(n) for n in node.output]
    for init in graph.initializer:
        init.name = rename(init.name)
    del graph.value_info[:]


def _metadata(model: nn.Module, mode: str, input_shape: tuple[int, int, int]) -> dict[str, str]:
    props = {"cnnpress_export_mode": mode, "cnnpress_input_shape": json.dumps(list(input_shape))}
    arch = getattr(model, "cnnpress_arch", None)
    if arch is not None:  # a user's network is in the ONNX graph itself: not repeated here
        arch = {"graph": "in the ONNX graph"} if "graph" in arch else arch
        props["cnnpress_arch"] = json.dumps(arch, sort_keys=True, separators=(",", ":"))
    method = getattr(model, "cnnpress_method", None)
    if method is not None:  # the per-layer settings are in the graph's shapes
        config = {k: v for k, v in (method.get("config") or {}).items() if k != "layers"}
        method = {**method, "config": config}
        props["cnnpress_method"] = json.dumps(method, sort_keys=True, separators=(",", ":"))
    return props


def export_onnx(
    model: nn.Module,
    path: str | Path,
    input_shape: tuple[int, int, int],
    mode: str = "dense",
    opset: int | None = None,
) -> Path:
    """Write ``model`` as an ONNX file with a dynamic batch axis.

    The graph has one input ``"input"`` of shape ``(batch, *input_shape)`` and one output
    ``"output"``; ``batch`` is dynamic. The model's ``metadata_props`` hold
    ``cnnpress_arch`` and ``cnnpress_method`` (JSON, when the model has those attributes),
    ``cnnpress_export_mode`` and ``cnnpress_input_shape``. The file is written atomically
    (a temporary file in the same folder, then a rename); missing folders are created.

    Args:
        model: A model, compressed or not; it is copied, not changed, and exported in eval mode.
        path: Where to write the ``.onnx`` file.
        input_shape: ``(channels, height, width)`` of one input image.
        mode: ``"dense"`` (compressed layers as plain Conv / Gemm with reconstructed weights) or
            ``"stm"`` (SLBF convs as grouped Conv with the binary bank, Gather, ReduceSum).
        opset: ONNX opset, from :data:`MIN_OPSET` to :data:`MAX_OPSET`; ``None`` means
            :data:`DEFAULT_OPSET`.

    Returns:
        The path written.

    Raises:
        CnnpressError: A bad ``mode``, ``input_shape`` (also one the model cannot run on),
            ``opset`` or ``path``, or the ``onnx`` package is missing.
    """
    if mode not in MODES:
        raise CnnpressError(f"unknown ONNX export mode {mode!r}; choose one of {list(MODES)}")
    shape = _check_input_shape(input_shape)
    opset_version = _check_opset(opset)
    if not isinstance(model, nn.Module):
        raise CnnpressError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    path = Path(path)
    if path.is_dir():
        raise CnnpressError(f"{path} is a folder; give the path of the .onnx file to write")
    try:
        import onnx
    except ImportError as err:
        raise CnnpressError("ONNX export needs the 'onnx' package: pip install onnx") from err

    # Batch 2, not 1, so that nothing in the trace specialises on a batch of one.
    x = torch.randn(2, *shape, dtype=_float_dtype(model))
    deploy = _deploy_model(model, mode, x)
    stored = stored_tensors(deploy) if mode == "stm" else []
    proto = onnx.load_from_string(_exported(_Fed(deploy, stored), x, opset_version))
    if stored:
        _stored_to_initializers(proto, stored)
    _constants_to_initializers(proto.graph)
    _compact(proto.graph)
    for key, value in _metadata(model, mode, shape).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    atomic_write_bytes(path, proto.SerializeToString())
    return path
