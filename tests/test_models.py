"""Model registry: every architecture builds, runs on 28x28 and 32x32 inputs, and trains."""

from __future__ import annotations

import pytest
import torch

from cnnpress import models
from cnnpress.registry import Registry, RegistryError


@pytest.mark.parametrize("name", models.names())
@pytest.mark.parametrize(("channels", "size"), [(1, 28), (3, 32)])
def test_every_model_forward_and_backward(name, channels, size):
    net = models.create(name, in_channels=channels, num_classes=7)
    out = net(torch.randn(2, channels, size, size))
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in net.parameters())
    assert models.arch_of(net) == {"name": name, "in_channels": channels, "num_classes": 7}


def test_expected_names_and_sizes():
    assert {"resnet20", "resnet32", "resnet56", "vgg_small", "vgg16", "lenet5"} <= set(
        models.names()
    )
    count = lambda n: sum(p.numel() for p in models.create(n, 3, 10).parameters())  # noqa: E731
    assert 0.26e6 < count("resnet20") < 0.28e6  # He et al.: 0.27M
    assert 0.84e6 < count("resnet56") < 0.86e6  # 0.85M
    assert 14.5e6 < count("vgg16") < 15.1e6


def test_unknown_model_and_duplicate_registration_are_errors():
    with pytest.raises(RegistryError, match="unknown model 'resnet21'.*resnet20"):
        models.create("resnet21")
    reg: Registry = Registry("thing")
    reg.register("a")(object)
    with pytest.raises(RegistryError, match="already registered"):
        reg.register("a")(object)
