"""The library entry points re-exported by ``cnnpress``."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cnnpress.budget import resolve_budget
from cnnpress.errors import CnnpressError
from cnnpress.format import load as load_file
from cnnpress.format import save as save_file
from cnnpress.methods.apply import apply, make_config, rebuild
from cnnpress.pretrained import model_file
from cnnpress.runtime.c_export import storage_settings
from cnnpress.runtime.quant import QAT_LR, QuantizedModel, calibrate
from cnnpress.runtime.quant import finetune as tune
from cnnpress.train.checkpoint import build_model, load_state, read_meta, read_tensors

__all__ = ["compress", "load", "load_model", "quantize", "rebuild", "save"]


def compress(model: nn.Module, method: str, **settings: Any) -> nn.Module:
    """A new model with the layers that ``method`` compresses replaced; ``model`` is untouched.

    Args:
        model: A model (ideally from ``cnnpress.models.create``, so its file can rebuild it).
        method: A name from ``cnnpress.methods.names()``.
        **settings: The method's config fields (for SLBF ``slice_channels``, ``num_filters``,
            ``scale``, ``include_first``, ``include_linear``, ``layers``, or a size budget
            ``target_size`` / ``target_ratio`` that ``cnnpress.budget`` turns into those).

    Returns:
        The compressed copy, with ``cnnpress_method`` recording the method and its settings.
    """
    config = resolve_budget(model, make_config(method, settings))
    return apply(model, method, config)


def save(model: nn.Module, path: str | Path, **settings: Any) -> int:
    """Write ``model`` to ``path`` as a ``.cnnp`` file (``cnnpress.format.save``'s settings); a
    :class:`QuantizedModel` is written as its model with its activations, at the storage
    settings it was quantized with (floats as int8)."""
    if isinstance(model, QuantizedModel):
        settings.setdefault("activations", model.cnnpress_activations)
        model = model.float_model
        _, fold, entropy = storage_settings(model)
        settings = {"float_bits": 8, "fold_batchnorm": fold, "entropy": entropy, **settings}
    return save_file(model, path, **settings)


def load(path: str | Path) -> nn.Module:
    """The model of a ``.cnnp`` file (``cnnpress.format.load``), in eval mode; a file that
    records quantized activations gives a :class:`QuantizedModel`, whose forward is the
    integer program the C export runs."""
    model = load_file(path)
    activations = getattr(model, "cnnpress_activations", None)
    return QuantizedModel(model, activations).eval() if activations else model


def quantize(
    model: nn.Module,
    calibration: Any,
    bits: int = 8,
    observer: str = "mse",
    limit: int = 1000,
    finetune: Any = None,
    epochs: int = 1,
    lr: float = QAT_LR,
    progress: Any = None,
) -> QuantizedModel:
    """``model`` with ``bits``-bit activations (8 or 4; one scale and zero point per tensor),
    calibrated on up to ``limit`` images of ``calibration`` (a tensor N x C x H x W, or a loader
    of images or of (images, labels)) with ``observer`` (``"mse"``, ``"minmax"`` or
    ``"percentile"``, :mod:`cnnpress.runtime.quant`).

    The model is first taken as its file holds it with its floats at 8 bits (int8 with a
    scale per row, TFLite's per-channel weights; the method's packed weights unchanged), so
    the returned model computes exactly what its file, and the C program, compute.

    With ``finetune`` (a loader of training (images, labels)), the model is then fine-tuned
    for ``epochs`` with fake-quantized activations (quantization-aware,
    :func:`cnnpress.runtime.quant.finetune`, from learning rate ``lr``; ``progress(step,
    steps, loss)`` after each step) and calibrated again.

    Returns:
        A :class:`QuantizedModel` in eval mode: its forward is the integer program.
    """
    if isinstance(model, QuantizedModel):
        model = model.float_model
    q = _quantized(model, calibration, bits, observer, limit)
    if finetune is not None and epochs > 0:
        tune(q, finetune, epochs=epochs, lr=lr, progress=progress)
        q = _quantized(q.float_model, calibration, bits, observer, limit)
    return q


def _quantized(
    model: nn.Module, calibration: Any, bits: int, observer: str, limit: int
) -> QuantizedModel:
    """The model as its file holds it (floats at 8 bits), calibrated."""
    _, fold, entropy = storage_settings(model)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.cnnp"
        try:
            save_file(model, path, float_bits=8, fold_batchnorm=fold, entropy=entropy)
        except CnnpressError as err:
            raise CnnpressError(f"cannot quantize a model that cannot be saved: {err}") from None
        stored = load_file(path)
    activations = calibrate(stored, calibration, bits=bits, observer=observer, limit=limit)
    q = QuantizedModel(stored, activations).eval()
    spec = getattr(stored, "cnnpress_dataset", None) or {}
    if isinstance(calibration, torch.Tensor):
        q.program(tuple(int(v) for v in calibration.shape[1:]))  # refuses what has no kernel
    elif spec.get("in_channels") and spec.get("image_size"):
        q.program((int(spec["in_channels"]), *(int(v) for v in spec["image_size"])))
    return q


def load_model(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a saved model, in eval mode, with its metadata.

    ``path`` is a ``.cnnp`` file, a run folder (its ``model.cnnp``, else the model in its
    last checkpoint), a safetensors weights/checkpoint file written by cnnpress, or
    ``pretrained:NAME`` (a model shipped with the package, ``cnnpress.pretrained``).
    """
    path = model_file(path)
    if path.suffix == ".cnnp":
        model = load(path)
        meta = {
            "arch": model.cnnpress_arch,
            "method": getattr(model, "cnnpress_method", None),
            "dataset": model.cnnpress_dataset,
            "provenance": model.cnnpress_provenance,
            "file": str(path),
        }
        return model, meta
    meta = read_meta(path)
    model = build_model(meta)
    tensors = read_tensors(path)
    if "epoch" in meta:  # a training checkpoint: the weights carry a "model." prefix
        tensors = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    load_state(model, tensors, path)
    model.cnnpress_dataset = meta.get("dataset")
    model.cnnpress_provenance = meta.get("provenance")
    return model.eval(), meta
