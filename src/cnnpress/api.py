"""The library entry points re-exported by ``cnnpress``."""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cnnpress.budget import file_size, parse_size, resolve_budget, smallest
from cnnpress.errors import CnnpressError, ConfigError
from cnnpress.format import load as load_file
from cnnpress.format import save as save_file
from cnnpress.methods.apply import apply, make_config, rebuild
from cnnpress.pretrained import model_file
from cnnpress.runtime.boards import fit_budget, program_memory
from cnnpress.runtime.c_export import storage_settings
from cnnpress.runtime.quant import QAT_LR, QuantizedModel, calibrate
from cnnpress.runtime.quant import finetune as tune
from cnnpress.train.checkpoint import build_model, load_state, read_meta, read_tensors

__all__ = ["compress", "load", "load_model", "quantize", "rebuild", "save"]


def compress(
    model: nn.Module,
    method: str,
    *,
    target_flash: int | str | None = None,
    target_ram: int | str | None = None,
    core: str = "cortex-m3",
    input_shape: tuple[int, int, int] | None = None,
    activation_bits: int | None = None,
    **settings: Any,
) -> nn.Module:
    """A new model with the layers that ``method`` compresses replaced; ``model`` is untouched.

    Args:
        model: A model (ideally from ``cnnpress.models.create``, so its file can rebuild it).
        method: A name from ``cnnpress.methods.names()``.
        target_flash: A flash budget of the C program (bytes, or a size such as "64KB"):
            the model's constants and the runtime's code on ``core``
            (:func:`cnnpress.runtime.boards.program_memory`).
        target_ram: A RAM budget of the C program: arena, stack, input and logits buffers.
        core: The core the budgets are for (``cnnpress.runtime.boards.CODE_BYTES``).
        input_shape: (C, H, W) of the inputs, for the RAM (default: the recorded data set's).
        activation_bits: With a budget: plan for these activations (8 or 4); default: the
            widest activations (float32, then int8) whose program fits.
        **settings: The method's config fields (for SLBF ``slice_channels``, ``num_filters``,
            ``scale``, ``include_first``, ``include_linear``, ``layers``, or a size budget
            ``target_size`` / ``target_ratio`` that ``cnnpress.budget`` turns into those).

    Returns:
        The compressed copy, with ``cnnpress_method`` recording the method and its settings.
        With a flash or RAM budget, ``cnnpress_device`` records the plan: the activations it
        chose (``activation_bits``: None for float32, else quantize the trained model with
        them) and the program's flash and RAM; a method with a size budget (SLBF) gets the
        largest file whose program fits the flash.

    Raises:
        ConfigError: A budget that no setting meets (with the smallest flash and RAM).
    """
    config = make_config(method, settings)
    if target_flash is None and target_ram is None:
        return apply(model, method, resolve_budget(model, config))
    device = _Device(
        None if target_flash is None else parse_size(target_flash),
        None if target_ram is None else parse_size(target_ram),
        core,
        input_shape or _recorded_shape(model),
    )
    options = (None, 8) if activation_bits is None else (activation_bits,)
    return _fit_device(model, method, config, device, options)


@dataclasses.dataclass(frozen=True)
class _Device:
    """A flash and RAM budget (bytes; None: no limit) on a core, for inputs of ``shape``."""

    flash: int | None
    ram: int | None
    core: str
    shape: tuple[int, int, int]

    def fits(self, memory: dict[str, Any]) -> bool:
        return fit_budget(memory, self.flash, self.ram)["fits"]


def _recorded_shape(model: nn.Module) -> tuple[int, int, int]:
    spec = getattr(model, "cnnpress_dataset", None) or {}
    if not spec.get("in_channels") or not spec.get("image_size"):
        raise ConfigError("a flash or RAM budget needs input_shape (C, H, W)")
    return (int(spec["in_channels"]), *(int(v) for v in spec["image_size"]))


def _fit_device(
    model: nn.Module, method: str, config: Any, device: _Device, options: tuple
) -> nn.Module:
    """The first activation width of ``options`` whose program fits ``device``, with the
    method's largest settings that fit its flash; a width whose smallest program does not fit
    is not searched (larger settings only add flash and scratch)."""
    sized = (
        hasattr(config, "target_size")
        and config.target_size is None
        and config.target_ratio is None
        and device.flash is not None
    )
    least_config = smallest(model, config) if sized else resolve_budget(model, config)
    least = apply(model, method, least_config)
    tried = []
    for bits in options:
        memory = _device_memory(least, bits, device)
        tried.append(memory)
        if not device.fits(memory):
            continue
        small = least
        if sized:  # the largest file whose program still fits the flash
            small, memory = _largest(model, method, config, device, bits, (least_config, memory))
        small.cnnpress_device = {
            "activation_bits": bits,
            "target_flash_bytes": device.flash,
            "target_ram_bytes": device.ram,
            **memory,
        }
        return small
    smallest_programs = "; ".join(
        f"{m['activations']}: {m['flash_bytes']:,} bytes of flash and {m['ram_bytes']:,} of RAM"
        for m in tried
    )
    raise ConfigError(
        f"no {method} program of this model fits {_bytes(device.flash)} of flash and "
        f"{_bytes(device.ram)} of RAM on a {device.core}; the smallest need {smallest_programs}"
    )


def _bytes(value: int | None) -> str:
    return "any amount" if value is None else f"{value:,} bytes"


def _device_memory(model: nn.Module, bits: int | None, device: _Device) -> dict[str, Any]:
    """The program's flash and RAM with ``bits``-bit activations (None: float32); the sizes do
    not depend on the calibration, so random images calibrate it."""
    if bits is not None:
        images = torch.randn(8, *device.shape, generator=torch.Generator().manual_seed(0))
        model = quantize(model, images, bits=bits, limit=8)
    return program_memory(model, device.shape, device.core)


def _largest(
    model: nn.Module,
    method: str,
    config: Any,
    device: _Device,
    bits: int | None,
    least: tuple[Any, dict[str, Any]],
) -> tuple[nn.Module, dict[str, Any]]:
    """The model at the largest size budget whose program fits ``device.flash``, and its
    memory; ``least``: the smallest settings' config and memory, which fit."""
    least_config, memory = least
    # The program's flash grows with the file about byte for byte: give the file what is left.
    target = file_size(model, least_config) + config.header_reserve
    target += device.flash - memory["flash_bytes"]
    for _ in range(4):
        try:
            sized = resolve_budget(model, dataclasses.replace(config, target_size=target))
        except ConfigError:  # below the smallest file: keep the smallest settings
            break
        small = apply(model, method, sized)
        got = _device_memory(small, bits, device)
        if device.fits(got):
            return small, got
        over = got["flash_bytes"] - device.flash
        if over <= 0:  # the RAM, not the flash, is what the larger settings broke
            break
        target -= over + 64
    return apply(model, method, least_config), memory


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
