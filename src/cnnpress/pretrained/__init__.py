"""Trained models shipped with the package, as ``.cnnp`` files.

``resnet20-fmnist``: ResNet-20 on Fashion-MNIST, 93.78% test accuracy, trained by
``cnnpress train --recipe recipes/fmnist-resnet20-fp32.yaml --threads 1`` (15 epochs; the
command, commit, machine and accuracy are in the file's provenance: ``cnnpress summary``).

Wherever the command line takes a model (``--init``, ``--teacher``, ``evaluate``...),
``pretrained:NAME`` names one of these.
"""

from __future__ import annotations

from pathlib import Path

from cnnpress.errors import CnnpressError

__all__ = ["PREFIX", "model_file", "names", "path", "resolve"]

PREFIX = "pretrained:"
_HERE = Path(__file__).parent


def names() -> list[str]:
    """The shipped models."""
    return sorted(p.stem for p in _HERE.glob("*.cnnp"))


def path(name: str) -> Path:
    """The file of shipped model ``name``."""
    file = _HERE / f"{name}.cnnp"
    if not file.is_file():
        raise CnnpressError(f"no pretrained model {name!r}; shipped: {', '.join(names())}")
    return file


def resolve(where: str | Path) -> Path:
    """``pretrained:NAME`` as its file; any other path unchanged."""
    text = str(where)
    return path(text[len(PREFIX) :]) if text.startswith(PREFIX) else Path(where)


def model_file(where: str | Path) -> Path:
    """The file a model argument names: ``pretrained:NAME``'s file, a run folder's
    ``model.cnnp`` (else its ``checkpoint.safetensors``), or the path itself.

    Raises:
        CnnpressError: A folder that holds neither file (one line saying so).
    """
    file = resolve(where)
    if not file.is_dir():
        return file
    for name in ("model.cnnp", "checkpoint.safetensors"):
        if (file / name).is_file():
            return file / name
    raise CnnpressError(
        f"{file} is a folder with no model.cnnp or checkpoint.safetensors in it; pass a model "
        "file (.cnnp) or the folder of a run that has finished an epoch"
    )
