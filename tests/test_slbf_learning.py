"""SLBF's binary parts learn under a plain optimizer: training flips bank bits and changes
selections, far more than the projection alone, and lowers the loss.

The first estimator (a bank proxy with a clipped sign STE, selection logits with an identity
STE) passed a test that gradients *reach* the proxy and the logits while fine-tuning flipped
no bit; these tests measure the effect instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import cnnpress
from cnnpress.data import Loader, load_dataset
from cnnpress.methods.slbf import learning_stats, snapshot


def _net() -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()]
    for c_in, c_out in ((16, 32), (32, 32)):
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out)]
        layers += [nn.ReLU(), nn.MaxPool2d(2)]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 4))


def _train(model: nn.Module, steps: int, lr: float) -> list[float]:
    data = load_dataset("synthetic", "train", num_samples=1024)
    loader = Loader(data, 32, train=True, seed=1)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)  # what users write
    model.train()
    losses = []
    for epoch in range(steps // len(loader) + 1):
        loader.set_epoch(epoch)
        for x, y in loader:
            if len(losses) == steps:
                return losses
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return losses


def _trained_slbf(lr: float, steps: int = 48) -> tuple[dict, list[float]]:
    torch.manual_seed(0)
    dense = _net()
    _train(dense, 32, 0.05)  # trained weights to start from, as users compress
    model = cnnpress.compress(dense, "slbf", slice_channels=4, num_filters=8)
    before = snapshot(model)
    losses = _train(model, steps, lr)
    return learning_stats(model, before), losses


def test_plain_sgd_flips_bank_bits_and_changes_selections():
    stats, losses = _trained_slbf(lr=0.05)
    still, _ = _trained_slbf(lr=0.0)  # what the per-step projection does on its own
    total, idle = stats["total"], still["total"]
    assert total["bits_flipped"] >= 0.02 * total["bank_bits"]
    assert total["selections_changed"] >= 0.02 * total["selections"]
    assert total["bits_flipped"] > 3 * idle["bits_flipped"]
    assert total["selections_changed"] > 3 * idle["selections_changed"]
    assert sum(losses[-8:]) < sum(losses[:8])
    for layer in stats["layers"].values():  # every layer learns, none leaves filters unused
        assert layer["bits_flipped"] + layer["selections_changed"] > 0
        assert layer["filters_used"] == layer["num_filters"]
        assert layer["latent_change"] > 0


def test_the_training_loop_records_what_changed_per_epoch(tmp_path):
    from cnnpress.train.config import TrainConfig
    from cnnpress.train.loop import fit

    torch.manual_seed(0)
    net = cnnpress.models.create("resnet20", in_channels=1, num_classes=4)
    model = cnnpress.compress(net, "slbf", slice_channels=4, num_filters=8)
    data = load_dataset("synthetic", "train", num_samples=256)
    test = load_dataset("synthetic", "test", num_samples=64)
    cfg = TrainConfig(epochs=2, batch_size=32, lr=0.05, bn_recalibrate=0)
    result = fit(
        model,
        Loader(data, 32, train=True),
        Loader(test, 64, train=False),
        cfg,
        tmp_path / "run",
        method=cnnpress.methods.get("slbf")(),
    )
    for record in result["history"]:
        learning = record["learning"]
        assert len(learning["layers"]) == 18  # every conv but the first
        assert learning["total"]["bits_flipped"] == sum(
            v["bits_flipped"] for v in learning["layers"].values()
        )
    assert sum(r["learning"]["total"]["selections_changed"] for r in result["history"]) > 0
