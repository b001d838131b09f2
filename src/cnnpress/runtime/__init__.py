"""Deployment: dense PyTorch copies of compressed models and ONNX export.

:func:`to_dense` replaces every compressed layer by a plain ``nn.Conv2d`` / ``nn.Linear``;
:func:`export_onnx` writes an ONNX file, with SLBF convs dense or as split-transform-merge.
"""

from __future__ import annotations

from cnnpress.runtime.dense import to_dense
from cnnpress.runtime.onnx import export_onnx

__all__ = ["export_onnx", "to_dense"]
