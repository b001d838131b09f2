"""The library entry points re-exported by ``cnnpress``."""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from cnnpress.methods import get as get_method
from cnnpress.methods.base import config_from_dict

__all__ = ["compress"]


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
