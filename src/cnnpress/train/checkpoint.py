"""Training checkpoints as safetensors + JSON metadata (no pickle), and model loading.

A checkpoint holds the state dict, the optimiser state, the RNG state and the epoch, and in
its metadata how to rebuild the model: the architecture (registry name and arguments), the
compression method and its config, and the dataset spec. Every write is atomic. Finished
models are ``.cnnp`` files (``cnnpress.format``); ``cnnpress.api.load_model`` reads both.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from cnnpress.atomic import atomic_write_bytes
from cnnpress.errors import CnnpressError
from cnnpress.methods import get as get_method
from cnnpress.methods import names as method_names
from cnnpress.methods.apply import rebuild
from cnnpress.models import arch_of

__all__ = [
    "CheckpointError",
    "build_model",
    "check_checkpoint",
    "load_checkpoint",
    "load_state",
    "read_tensors",
    "model_meta",
    "read_meta",
    "save_checkpoint",
]

_KEY = "cnnpress"


class CheckpointError(CnnpressError):
    """A checkpoint or weights file that is missing, corrupt or belongs to another model."""


def model_meta(model: nn.Module, **extra: Any) -> dict[str, Any]:
    """What it takes to rebuild ``model``: architecture, method and config, plus ``extra``."""
    return {"arch": arch_of(model), "method": getattr(model, "cnnpress_method", None), **extra}


def build_model(meta: dict[str, Any]) -> nn.Module:
    """A fresh model of the recorded architecture with the recorded method applied."""
    return rebuild(meta["arch"], meta.get("method"))


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def _meta_of(raw: str | None, path: Path) -> dict[str, Any]:
    if raw is None:
        raise CheckpointError(f"{path}: no cnnpress metadata; was it written by cnnpress?")
    try:
        meta = json.loads(raw)
    except ValueError:
        raise CheckpointError(f"{path}: corrupt cnnpress metadata") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: corrupt cnnpress metadata")
    return meta


def read_meta(path: str | Path) -> dict[str, Any]:
    """The cnnpress metadata of a safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(_KEY)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None
    return _meta_of(raw, path)


def _meta_from_bytes(data: bytes, path: Path) -> dict[str, Any]:
    """The cnnpress metadata from a safetensors file's bytes (its JSON header)."""
    try:
        size = int.from_bytes(data[:8], "little")
        if len(data) < 8 or size > len(data) - 8:
            raise ValueError("truncated header")
        header = json.loads(data[8 : 8 + size])
        raw = (header.get("__metadata__") or {}).get(_KEY)
    except (ValueError, AttributeError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None
    return _meta_of(raw, path)


def read_tensors(path: Path, data: bytes | None = None) -> dict[str, torch.Tensor]:
    try:
        return st_load(path.read_bytes() if data is None else data)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: corrupt safetensors data ({err})") from None


def _describe(meta: dict[str, Any], other: dict[str, Any]) -> str:
    """``meta``'s model in words; method settings shown where they differ from ``other``'s."""
    arch = dict(meta.get("arch") or {})
    name = arch.pop("name", "?")
    text = f"{name}({', '.join(f'{k}={v}' for k, v in arch.items())})"
    method, theirs = meta.get("method"), other.get("method")
    if not method:
        return text
    text += f" compressed with {method['name']}"
    if theirs and theirs.get("name") == method["name"]:
        mine, yours = method.get("config") or {}, theirs.get("config") or {}
        diff = [
            f"{k}={mine.get(k)}"
            for k in sorted(mine.keys() | yours.keys())
            if mine.get(k) != yours.get(k)
        ]
        text += f" ({', '.join(diff)})" if diff else ""
    return text


def _settings(meta: dict[str, Any]) -> dict[str, Any]:
    """``meta`` without the method's trained state (``Method.trained_state``), which a
    checkpoint restores from its tensors: what a fresh model must share with it."""
    method = meta.get("method")
    if not isinstance(method, dict) or method.get("name") not in method_names():
        return meta  # no method, or one this version lacks: compared as it is
    state = get_method(method["name"]).trained_state
    config = {k: v for k, v in (method.get("config") or {}).items() if k not in state}
    return {**meta, "method": {**method, "config": config}}


def _check_fits(meta: dict[str, Any], model: nn.Module, path: Path) -> None:
    own = json.loads(json.dumps(model_meta(model), default=str))  # as stored: lists, not tuples
    meta, own = _settings(meta), _settings(own)
    if "arch" in meta and (meta["arch"] != own["arch"] or meta.get("method") != own["method"]):
        raise CheckpointError(
            f"{path} does not fit this model: it holds a {_describe(meta, own)}, but this run "
            f"builds a {_describe(own, meta)}; resume with the settings it was trained with"
        )


def check_checkpoint(path: str | Path, model: nn.Module) -> dict[str, Any]:
    """The metadata of training checkpoint ``path`` if it was saved from a model like ``model``.

    Reads only the file's header. Raises :class:`CheckpointError` otherwise.
    """
    path = Path(path)
    meta = read_meta(path)
    _check_fits(meta, model, path)
    return meta


def load_state(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    wrong = sorted(k for k in own.keys() & state.keys() if own[k].shape != state[k].shape)
    if missing or extra or wrong:
        first = (missing or extra or wrong)[0]
        raise CheckpointError(
            f"{path} does not fit this model ({len(missing)} missing, {len(extra)} unexpected, "
            f"{len(wrong)} mis-shaped tensors, e.g. {first!r}); was it saved from another model?"
        )
    model.load_state_dict(state)


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    epoch: int,
    extra: dict[str, Any],
) -> None:
    """Everything needed to resume after ``epoch``: weights, optimiser, RNG; atomically."""
    tensors = {f"model.{k}": v for k, v in _state(model).items()}
    opt = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in opt["state"].items():
        for key, value in st.items():
            if torch.is_tensor(value):
                tensors[f"optim.{idx}.{key}"] = value.detach().cpu().contiguous().clone()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {
        "epoch": epoch,
        "param_groups": opt["param_groups"],
        "optim_scalars": scalars,
        **model_meta(model),
        **extra,
    }
    atomic_write_bytes(path, st_save(tensors, metadata={_KEY: json.dumps(meta)}))


def load_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: bytes | None = None,
) -> dict[str, Any]:
    """Restore weights, optimiser and RNG from ``path``; returns its metadata.

    Args:
        path: The checkpoint (named in errors).
        model: A freshly built model of the run's architecture and method.
        optimizer: Its optimiser, built as the run builds it.
        data: The file's bytes when already read (distributed runs broadcast them).

    Raises:
        CheckpointError: The file is unreadable or belongs to another model or optimiser.
    """
    path = Path(path)
    meta = read_meta(path) if data is None else _meta_from_bytes(data, path)
    if "epoch" not in meta or "optim_scalars" not in meta or "param_groups" not in meta:
        raise CheckpointError(f"{path}: not a training checkpoint (no epoch or optimiser state)")
    _check_fits(meta, model, path)
    tensors = read_tensors(path, data)
    load_state(model, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, path)
    if meta.get("method"):  # the trained state (masks) is loaded: re-record it in the config
        get_method(meta["method"]["name"])().sync(model)
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for idx, values in meta["optim_scalars"].items():
        state.setdefault(int(idx), {}).update(values)
    try:
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    except (ValueError, KeyError) as err:
        raise CheckpointError(f"{path}: optimiser state does not fit ({err})") from None
    if "rng.torch" not in tensors:
        raise CheckpointError(f"{path}: no RNG state; it cannot resume the run exactly")
    torch.set_rng_state(tensors["rng.torch"])
    return meta
