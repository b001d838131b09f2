"""Apply a method to a model, and rebuild the model a file or checkpoint records.

Below the budget planner and the file: ``cnnpress.compress`` plans a size budget first
(``cnnpress.budget``) and then calls :func:`apply`; the loader and the checkpoints call
:func:`rebuild`, whose recorded config is already explicit per layer.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from cnnpress.methods import get as get_method
from cnnpress.methods.base import MethodConfig, config_from_dict
from cnnpress.models import create

__all__ = ["apply", "make_config", "rebuild"]


def make_config(method: str, settings: dict[str, Any]) -> MethodConfig:
    """The checked config of ``method`` from ``settings`` (one line per problem)."""
    return config_from_dict(get_method(method).Config, settings)


def apply(model: nn.Module, method: str, config: MethodConfig) -> nn.Module:
    """A converted copy of ``model`` (``model`` is untouched), recording the method and config."""
    cls = get_method(method)
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
    arch = dict(arch)
    model = create(arch.pop("name", None), **arch)
    if method:
        config = dict(method["config"])
        if config.get("init") in ("auto", "weights"):
            config["init"] = "random"
        model = apply(model, method["name"], make_config(method["name"], config))
        model.cnnpress_method = method
    return model
