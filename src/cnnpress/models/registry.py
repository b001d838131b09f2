"""The model registry (kept apart so architecture modules can import it without cycles)."""

from __future__ import annotations

from cnnpress.registry import Registry

__all__ = ["MODELS"]

MODELS: Registry = Registry("model")
