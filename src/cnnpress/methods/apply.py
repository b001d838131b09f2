"""Apply a method to a model, and rebuild the model a file or checkpoint records.

Below the budget planner and the file: ``cnnpress.compress`` plans a size budget first
(``cnnpress.budget``) and then calls :func:`apply`; the loader and the checkpoints call
:func:`rebuild`, whose recorded config is already explicit per layer.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from cnnpress.errors import CnnpressError
from cnnpress.methods import get as get_method
from cnnpress.methods.base import MethodConfig, config_from_dict
from cnnpress.models import arch_of, from_arch

__all__ = ["apply", "make_config", "rebuild"]


def make_config(method: str, settings: dict[str, Any]) -> MethodConfig:
    """The checked config of ``method`` from ``settings`` (one line per problem)."""
    return config_from_dict(get_method(method).Config, settings)


def apply(model: nn.Module, method: str, config: MethodConfig) -> nn.Module:
    """A converted copy of ``model`` (``model`` is untouched), recording the method and config."""
    cls = get_method(method)
    arch = _arch_or_why(model)
    new = copy.deepcopy(model)
    config = cls().resolve(new, config)
    new = cls().convert(new, config)
    new.cnnpress_method = {"name": method, "config": config.to_dict()}
    if isinstance(arch, dict):  # recorded before the layers changed: the file rebuilds it
        new.cnnpress_arch = arch
    else:
        new.cnnpress_arch_error = arch
    return new


def _arch_or_why(model: nn.Module) -> dict[str, Any] | str:
    """The architecture a file records for ``model`` (a user's model is traced here, while
    its layers are still plain ones), or why it has none (it can still be used in memory)."""
    try:
        return arch_of(model)
    except CnnpressError as err:
        return str(err)


def rebuild(arch: dict[str, Any], method: dict[str, Any] | None) -> nn.Module:
    """The model a file or checkpoint records (architecture: a registry name or a graph;
    method and config), with placeholder values that the caller then loads.

    Initialisation from weights (SLBF's "auto"/"weights", k-means' Lloyd iterations) is
    skipped: it would cluster random weights that the stored values replace anyway.
    """
    model = from_arch(arch)
    if method:
        config = dict(method["config"])
        if config.get("init") in ("auto", "weights"):
            config["init"] = "random"
        if isinstance(config.get("iterations"), int):  # k-means: no clustering of placeholders
            config["iterations"] = 0
        model = apply(model, method["name"], make_config(method["name"], config))
        model.cnnpress_method = method
    return model
