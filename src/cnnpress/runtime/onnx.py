"""ONNX export of compressed models, with the SLBF layers either dense or split-transform-merge.

Two graph forms (``mode``):

* ``"dense"``: every compressed layer becomes a plain Conv / Gemm with the reconstructed float
  weights (:func:`cnnpress.runtime.dense.to_dense`). Any ONNX runtime runs it at full speed, but
  the file stores float weights.
* ``"stm"``: every ``SLBFConv2d`` is exported as SLBF's split-transform-merge: a grouped Conv
  (``s`` groups) of the input with the binary bank repeated ``s`` times, weight shape
  ``(s*m, d, kh, kw)``; a Gather of the ``n*s`` selected maps (flat indices ``j*m + p(i, j)``);
  a Reshape to ``(N, n, s, H, W)``; a ReduceSum over the slices; then Mul by the scales and Add
  of the bias where the layer has them. Linear SLBF layers (and other compressed layers) stay
  dense.

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
import torch.nn.functional as F
from torch import nn

from cnnpress.atomic import atomic_write_bytes
from cnnpress.errors import CnnpressError
from cnnpress.methods.slbf import SLBFConv2d
from cnnpress.runtime.dense import dense_layer, is_compressed, replace_layers

__all__ = ["DEFAULT_OPSET", "MAX_OPSET", "MIN_OPSET", "MODES", "export_onnx"]

MODES = ("dense", "stm")
#: Opset used when none is given: old enough for most runtimes, new enough for every op here.
DEFAULT_OPSET = 17
#: ReduceSum takes its axes as an input from opset 13 on.
MIN_OPSET = 13
#: The newest opset of torch's TorchScript-based exporter.
MAX_OPSET = 20
INPUT_NAME, OUTPUT_NAME, BATCH_AXIS = "input", "output", "batch"


class _STMConv(nn.Module):
    """Deploy-time split-transform-merge form of an ``SLBFConv2d`` (buffers only, no parameters).

    Args:
        layer: The SLBF conv layer to copy (its current bank, selections, scale and bias).
        out_size: Output height and width when known: the Reshape then has a constant shape;
            without it the shape is read from the tensor at run time.
    """

    def __init__(self, layer: SLBFConv2d, out_size: tuple[int, int] | None = None) -> None:
        super().__init__()
        s, m, n = layer.num_slices, layer.num_filters, layer.out_channels
        self.num_slices, self.out_channels = s, n
        self.stride, self.padding, self.dilation = layer.stride, layer.padding, layer.dilation
        self.out_size = out_size
        with torch.no_grad():
            bank = layer.bank()  # m, d, kh, kw in {-1, +1}
            offsets = torch.arange(s, device=bank.device).mul(m).view(1, s)
            index = (layer.indices() + offsets).flatten()  # i-major: [i*s + j] = j*m + p(i, j)
            scale = None if layer.scale is None else layer.scale.detach().clone().view(1, n, 1, 1)
            bias = None if layer.bias is None else layer.bias.detach().clone().view(1, n, 1, 1)
        self.register_buffer("bank", bank.repeat(s, 1, 1, 1).contiguous())
        self.register_buffer("index", index.long().contiguous())
        self.register_buffer("scale", scale)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.conv2d(
            x, self.bank, None, self.stride, self.padding, self.dilation, self.num_slices
        )  # N, s*m, H, W: z[:, j*m + t] = x_j * B[t]
        y = torch.index_select(z, 1, self.index)  # N, n*s, H, W
        h, w = self.out_size if self.out_size is not None else (z.shape[2], z.shape[3])
        y = y.reshape(-1, self.out_channels, self.num_slices, h, w).sum(dim=2)
        if self.scale is not None:
            y = y * self.scale
        if self.bias is not None:
            y = y + self.bias
        return y

    def extra_repr(self) -> str:
        s, sm = self.num_slices, self.bank.shape[0]
        return f"slices={s}, bank={sm // s}, out_channels={self.out_channels}"


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
    """Run ``model`` on ``x``; with ``watch``, return the output size of each SLBF conv by id."""
    sizes: dict[int, tuple[int, int]] = {}

    def hook(module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        sizes[id(module)] = (int(output.shape[-2]), int(output.shape[-1]))

    handles = (
        [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, SLBFConv2d)]
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
    if mode == "stm":
        work = replace_layers(
            work,
            lambda m: _STMConv(m, sizes.get(id(m))) if isinstance(m, SLBFConv2d) else None,
        )
    work = replace_layers(work, lambda m: dense_layer(m) if is_compressed(m) else None)
    return work.eval()


def _metadata(model: nn.Module, mode: str, input_shape: tuple[int, int, int]) -> dict[str, str]:
    props = {"cnnpress_export_mode": mode, "cnnpress_input_shape": json.dumps(list(input_shape))}
    for attr in ("cnnpress_arch", "cnnpress_method"):
        value = getattr(model, attr, None)
        if value is not None:
            props[attr] = json.dumps(value, sort_keys=True)
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
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter warns that it is deprecated, and about traces and folding.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx")
        torch.onnx.export(
            deploy,
            (x,),
            buffer,
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: BATCH_AXIS}, OUTPUT_NAME: {0: BATCH_AXIS}},
            opset_version=opset_version,
            do_constant_folding=True,
        )
    proto = onnx.load_from_string(buffer.getvalue())
    for key, value in _metadata(model, mode, shape).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    atomic_write_bytes(path, proto.SerializeToString())
    return path
