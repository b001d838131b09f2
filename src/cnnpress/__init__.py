"""cnnpress: compress convolutional neural networks for memory-constrained devices.

Public API: :func:`compress`, :func:`quantize`, :func:`summary`, :func:`save`, :func:`load`,
:func:`export_c`, :mod:`models`, :mod:`methods`.
"""

from __future__ import annotations

from cnnpress import data, methods, models
from cnnpress.api import compress, load, quantize, save
from cnnpress.cost import summary
from cnnpress.errors import CnnpressError
from cnnpress.runtime import export_c

__all__ = [
    "CnnpressError",
    "compress",
    "data",
    "export_c",
    "load",
    "methods",
    "models",
    "quantize",
    "save",
    "summary",
]

__version__ = "0.1.0"
