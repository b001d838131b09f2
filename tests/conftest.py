"""Test-suite settings: one torch thread (small tensors run faster and results are stable)."""

from __future__ import annotations

import torch

torch.set_num_threads(1)
