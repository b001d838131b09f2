"""Deployment: dense PyTorch copies of compressed models, ONNX export and a C99 program.

:func:`to_dense` replaces every compressed layer by a plain ``nn.Conv2d`` / ``nn.Linear``;
:func:`export_onnx` writes an ONNX file, with SLBF convs dense or as split-transform-merge;
:func:`export_c` writes a self-contained C99 program that keeps the packed weights, and
:func:`c_memory` gives its flash and RAM.
"""

from __future__ import annotations

from cnnpress.runtime.c_export import c_memory, export_c
from cnnpress.runtime.dense import to_dense
from cnnpress.runtime.onnx import export_onnx

__all__ = ["c_memory", "export_c", "export_onnx", "to_dense"]
