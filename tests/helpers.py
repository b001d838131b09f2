"""Small helpers shared by the tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

import cnnpress

__all__ = ["load_benchmark", "rel_err", "resnet"]

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def resnet(seed: int = 0) -> nn.Module:
    """A width-8 ResNet-20 with trained-looking BatchNorm so comparisons are not trivial."""
    torch.manual_seed(seed)
    net = cnnpress.models.create("resnet20", 1, 10, width=8)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_()
            m.bias.data.normal_()
    return net


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference relative to the largest magnitude of ``a``."""
    return ((a - b).abs().max() / a.abs().max()).item()


def load_benchmark(name: str) -> ModuleType:
    """The script ``benchmarks/NAME.py`` as a module, registered in ``sys.modules`` first (a
    dataclass of a module with postponed annotations looks its module up there)."""
    spec = importlib.util.spec_from_file_location(f"{name}_bench", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
