"""The library entry points re-exported by ``cnnpress``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from cnnpress.budget import resolve_budget
from cnnpress.format import load
from cnnpress.methods.apply import apply, make_config, rebuild
from cnnpress.pretrained import model_file
from cnnpress.train.checkpoint import build_model, load_state, read_meta, read_tensors

__all__ = ["compress", "load_model", "rebuild"]


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
