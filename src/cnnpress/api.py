"""The library entry points re-exported by ``cnnpress``."""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from cnnpress.methods import get as get_method
from cnnpress.methods.base import config_from_dict

__all__ = ["compress", "rebuild"]


def compress(model: nn.Module, method: str, **settings: Any) -> nn.Module:
    """A new model with the layers that ``method`` compresses replaced; ``model`` is untouched.

    Args:
        model: A model (ideally from ``cnnpress.models.create``, so its file can rebuild it).
        method: A name from ``cnnpress.methods.names()``.
        **settings: The method's config fields (for SLBF ``slice_channels``, ``num_filters``,
            ``scale``, ``include_first``, ``include_linear``, ``layers``).

    Returns:
        The compressed copy, with ``cnnpress_method`` recording the method and its settings.
    """
    cls = get_method(method)
    config = config_from_dict(cls.Config, settings)
    new = copy.deepcopy(model)
    config = cls().resolve(new, config)
    new = cls().convert(new, config)
    new.cnnpress_method = {"name": method, "config": config.to_dict()}
    return new


def rebuild(arch: dict[str, Any], method: dict[str, Any] | None) -> nn.Module:
    """The model a file or checkpoint records (architecture, method and config), with
    placeholder values that the caller then loads.

    Initialisation from weights ("auto"/"weights") is skipped: it would cluster random
    weights that the stored values replace anyway.
    """
    from cnnpress.models import create

    arch = dict(arch)
    model = create(arch.pop("name", None), **arch)
    if method:
        config = dict(method["config"])
        if config.get("init") in ("auto", "weights"):
            config["init"] = "random"
        model = compress(model, method["name"], **config)
        model.cnnpress_method = method
    return model
