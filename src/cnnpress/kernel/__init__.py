"""The fused SLBF inference kernel (C++, built on first use), below the layers that call it.

It reads a layer only through :class:`StackedConv`; see :mod:`cnnpress.kernel.fused`.
"""

from __future__ import annotations

from cnnpress.kernel.fused import (
    BUILD_DIR_ENV,
    BUILD_NOTICE,
    DISABLE_ENV,
    FLAGS,
    SOURCE,
    StackedConv,
    available,
    choices,
    choose_path,
    clear_choices,
    conv2d,
    forward,
    load,
    plan,
    status,
)

__all__ = [
    "BUILD_DIR_ENV",
    "BUILD_NOTICE",
    "DISABLE_ENV",
    "FLAGS",
    "SOURCE",
    "StackedConv",
    "available",
    "choices",
    "choose_path",
    "clear_choices",
    "conv2d",
    "forward",
    "load",
    "plan",
    "status",
]
