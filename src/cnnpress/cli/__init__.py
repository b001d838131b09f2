"""Command-line interface (thin: parses, calls the library, prints)."""

from __future__ import annotations

__all__: list[str] = []
