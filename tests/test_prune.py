"""Pruning: magnitude masks hit their targets (layer, global, cubic schedule), sparse position
encodings round trip and pick the smaller, filter pruning gives a really smaller model equal to
the masked original, and every pruned model survives the .cnnp file at the cost it reports."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import cnnpress
import cnnpress.methods.prune  # noqa: F401  (registers magnitude_prune)
from cnnpress.errors import ConfigError
from cnnpress.format import read_info
from cnnpress.methods.filter_prune import prunable_channels
from cnnpress.methods.prune import MaskedLayer, cubic_sparsity
from cnnpress.methods.sparse import (
    decode_positions,
    describe_mask,
    encode_positions,
    placeholder_mask,
    position_bits,
)
from cnnpress.runtime.dense import to_dense
from helpers import rel_err, resnet


def masked_layers(net: nn.Module) -> dict[str, MaskedLayer]:
    return {n: m for n, m in net.named_modules() if isinstance(m, MaskedLayer)}


# -- sparse position encodings ------------------------------------------------------------


def reference_relative_bits(mask: np.ndarray, bits: int) -> int:
    """Relative indices with fillers, by a plain loop over the positions."""
    filler, entries, gap = (1 << bits) - 1, 0, 0
    for keep in mask:
        if not keep:
            gap += 1
            continue
        while gap >= filler:
            entries, gap = entries + 1, gap - filler
        entries, gap = entries + 1, 0
    return entries * bits


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 400),
    density=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_sparse_encodings_round_trip_and_the_smaller_is_chosen(n, density, seed):
    mask = np.random.default_rng(seed).random(n) < density
    record = describe_mask(mask)
    assert record[0] == mask.sum()
    cheapest = min([n] + [reference_relative_bits(mask, b) for b in range(1, 17)])
    assert position_bits(record) == cheapest
    for bits in (0, 1, 3, record[1]):  # every encoding round trips, the chosen one included
        _, codes = encode_positions(mask, bits)
        assert codes.max(initial=0) < (1 << max(bits, 1))
        np.testing.assert_array_equal(decode_positions(codes, bits, n), mask)
    # a layer rebuilt from the record alone has the same stored sizes
    placeholder = placeholder_mask(record, (n,))
    _, codes = encode_positions(placeholder, record[1])
    assert [int(placeholder.sum()), record[1], codes.size] == record


def test_bad_positions_are_refused():
    with pytest.raises(ValueError, match="run past"):
        decode_positions(np.array([3, 2]), 2, 5)  # skip 3, skip 2, keep: position 5 of 0..4
    with pytest.raises(ValueError, match="bitmap"):
        decode_positions(np.zeros(4), 0, 5)


# -- magnitude pruning --------------------------------------------------------------------


def test_forward_gradients_and_masked_weights_get_none():
    net = cnnpress.compress(resnet(), "magnitude_prune", sparsity=0.7, include_linear=True)
    out = net(torch.randn(2, 1, 28, 28))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    out.square().mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    for layer in masked_layers(net).values():
        assert (layer.weight.grad[~layer.mask] == 0).all()
    dense = to_dense(net.eval())  # the plain-layer runtime rebuilds W * M
    assert not masked_layers(dense)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert rel_err(net(x), dense(x)) <= 1e-6


@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_layer_scope_reaches_the_target_in_every_layer(sparsity):
    net = cnnpress.compress(resnet(), "magnitude_prune", sparsity=sparsity)
    layers = masked_layers(net)
    assert len(layers) == 18  # every conv but the first; the classifier stays dense
    for layer in layers.values():
        n = layer.numel()
        assert n - layer.kept() == round(sparsity * n)
        kept = layer.weight[layer.mask].abs()
        assert kept.min() >= layer.weight[~layer.mask].abs().max()  # largest magnitudes kept
        assert torch.equal(layer.dense_weight() == 0, ~layer.mask)


def test_global_scope_uses_one_threshold():
    net = cnnpress.compress(resnet(), "magnitude_prune", sparsity=0.8, scope="global")
    layers = list(masked_layers(net).values())
    total = sum(m.numel() for m in layers)
    assert total - sum(m.kept() for m in layers) == round(0.8 * total)
    kept = torch.cat([m.weight[m.mask].abs() for m in layers])
    pruned = torch.cat([m.weight[~m.mask].abs() for m in layers])
    assert kept.min() >= pruned.max()
    per_layer = {m.kept() / m.numel() for m in layers}
    assert len(per_layer) > 1  # layers differ, unlike layer scope


def test_cubic_schedule_reaches_the_target_at_prune_epochs(tmp_path):
    net = cnnpress.compress(resnet(), "magnitude_prune", sparsity=0.8, prune_epochs=3)
    method = cnnpress.methods.get("magnitude_prune")()
    layers = masked_layers(net)
    assert all(m.mask.all() for m in layers.values())  # dense until the first epoch ends
    previous = {n: m.mask.clone() for n, m in layers.items()}
    for epoch in range(5):
        method.on_epoch_end(net, epoch, 10)
        want = cubic_sparsity(0.8, min(epoch + 1, 3), 3)
        for name, m in layers.items():
            n = m.numel()
            assert n - m.kept() == round(want * n), (epoch, name)
            assert not (m.mask & ~previous[name]).any()  # pruned weights stay pruned
            previous[name] = m.mask.clone()
            assert net.cnnpress_method["config"]["sparse_layout"][name] == m.record
    assert cubic_sparsity(0.8, 3, 3) == 0.8 and 0 < cubic_sparsity(0.8, 1, 3) < 0.8
    path = tmp_path / "m.cnnp"  # the config follows the masks, so the file rebuilds
    cnnpress.save(net.eval(), path)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert rel_err(net(x), cnnpress.load(path)(x)) <= 1e-5


def test_a_stale_layout_is_refused_by_pack_and_synced_by_save(tmp_path):
    net = cnnpress.compress(resnet(), "magnitude_prune", sparsity=0.5).eval()
    layer = masked_layers(net)["layer1.0.conv1"]
    with torch.no_grad():
        layer.mask.view(-1)[:40] = False
    method = cnnpress.methods.get("magnitude_prune")()
    with pytest.raises(ConfigError, match="sync_layout"):
        method.pack(layer)
    cnnpress.save(net, tmp_path / "m.cnnp")  # save calls Method.sync first
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert rel_err(net(x), cnnpress.load(tmp_path / "m.cnnp")(x)) <= 1e-5


@pytest.mark.parametrize(
    "settings",
    [
        {"sparsity": 1.0},
        {"sparsity": -0.1},
        {"sparsity": "half"},
        {"scope": "model"},
        {"prune_epochs": -1},
        {"pruning": 0.5},
        {"scope": "global", "layers": {"layer1.*": {"sparsity": 0.1}}},
        {"layers": {"layer1.*": {"scope": "global"}}},
        {"sparse_layout": {"layer1.0.conv1": [1, 2]}},
        {"sparse_layout": {"fc": [10, 0, 640]}},
    ],
)
def test_magnitude_config_errors(settings):
    with pytest.raises(ConfigError):
        cnnpress.compress(resnet(), "magnitude_prune", **settings)


# -- filter pruning -----------------------------------------------------------------------


def test_resnet_prunes_only_block_internal_channels():
    groups = prunable_channels(resnet())
    assert sorted(groups) == sorted(f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(3))
    assert groups["layer2.0.conv1"].bns == ["layer2.0.bn1"]
    assert groups["layer2.0.conv1"].consumers == [("layer2.0.conv2", 1)]
    lenet = prunable_channels(cnnpress.models.create("lenet5", 1, 10))
    assert lenet["conv2"].consumers == [("fc1", 25)]  # flatten: 25 inputs per channel


def masked_reference(net: nn.Module, pruned: nn.Module) -> nn.Module:
    """A copy of ``net`` whose removed channels are zeroed (filters, BN weight and bias)."""
    ref = cnnpress.models.create("resnet20", 1, 10, width=8)
    ref.load_state_dict(net.state_dict())
    for name, keep in pruned.cnnpress_method["config"]["channels"].items():
        conv, bn = ref.get_submodule(name), ref.get_submodule(name.replace("conv1", "bn1"))
        kept_filters = pruned.get_submodule(name).weight.detach()
        idx = [
            i
            for i in range(conv.out_channels)
            if any(torch.equal(conv.weight[i], f) for f in kept_filters)
        ]
        assert len(idx) == keep
        drop = sorted(set(range(conv.out_channels)) - set(idx))
        with torch.no_grad():
            conv.weight[drop] = 0
            bn.weight[drop] = 0
            bn.bias[drop] = 0
    return ref.eval()


@pytest.mark.parametrize("criterion", ["l1", "l2", "bn"])
def test_filter_pruned_model_is_smaller_and_equals_the_masked_original(criterion):
    net = resnet().eval()
    pruned = cnnpress.compress(net, "filter_prune", ratio=0.5, criterion=criterion).eval()
    count = sum(p.numel() for p in pruned.parameters())
    assert count < 0.8 * sum(p.numel() for p in net.parameters())
    block = pruned.layer3[0]
    assert (block.conv1.out_channels, block.bn1.num_features, block.conv2.in_channels) == (
        16,
        16,
        16,
    )
    assert type(block.conv1) is nn.Conv2d and block.conv2.out_channels == 32
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert rel_err(masked_reference(net, pruned)(x), pruned(x)) <= 1e-5


def test_criteria_keep_the_largest_channels():
    net = resnet()
    gamma = net.layer1[0].bn1.weight
    pruned = cnnpress.compress(net, "filter_prune", ratio=0.25, criterion="bn")
    kept = pruned.layer1[0].bn1.weight.detach()
    assert torch.equal(kept.abs().sort().values, gamma.detach().abs().sort().values[2:])
    pruned = cnnpress.compress(net, "filter_prune", ratio=0.25, criterion="l1")
    norms = net.layer1[0].conv1.weight.detach().abs().sum((1, 2, 3))
    got = pruned.layer1[0].conv1.weight.detach().abs().sum((1, 2, 3))
    torch.testing.assert_close(got.sort().values, norms.sort().values[2:])


def test_lenet_flatten_and_gradients():
    torch.manual_seed(0)
    net = cnnpress.models.create("lenet5", 1, 10)
    pruned = cnnpress.compress(net, "filter_prune", ratio=0.5, include_first=True)
    assert (pruned.conv1.out_channels, pruned.conv2.in_channels) == (3, 3)
    assert (pruned.conv2.out_channels, pruned.fc1.in_features) == (8, 8 * 25)
    out = pruned(torch.randn(2, 1, 28, 28))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in pruned.parameters())


def test_slimming_regulariser():
    method = cnnpress.methods.get("filter_prune")()
    net = cnnpress.compress(resnet(), "filter_prune", ratio=0.0, slimming_l1=1e-4)
    reg = method.regulariser(net)
    gammas = [m.weight for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert reg.item() == pytest.approx(1e-4 * sum(g.abs().sum().item() for g in gammas))
    reg.backward()
    assert all(g.grad is not None for g in gammas)
    assert method.regulariser(cnnpress.compress(resnet(), "filter_prune")) is None


def test_global_slimming_threshold_removes_the_smallest_gammas_over_all_layers():
    net = resnet()
    groups = prunable_channels(net)
    with torch.no_grad():  # stage 1's gammas small: a global threshold takes most of them there
        for name in groups:
            bn = net.get_submodule(name.replace("conv1", "bn1"))
            bn.weight.mul_(0.01 if name.startswith("layer1") else 1.0)
    gammas = {n: net.get_submodule(n.replace("conv1", "bn1")).weight.abs() for n in groups}
    total = sum(g.numel() for g in gammas.values())
    pruned = cnnpress.compress(net, "filter_prune", ratio=0.3, criterion="bn", scope="global")
    kept = pruned.cnnpress_method["config"]["channels"]
    threshold = torch.cat(list(gammas.values())).sort().values[round(0.3 * total)]
    above = {name: int((g >= threshold).sum()) for name, g in gammas.items()}
    assert sum(above.values()) == total - round(0.3 * total)
    assert kept == {name: max(1, count) for name, count in above.items()}
    assert max(kept[f"layer1.{b}.conv1"] for b in range(3)) < 8 / 2  # stage 1 hit hardest
    layer_scope = cnnpress.compress(net, "filter_prune", ratio=0.3, criterion="bn")
    assert set(layer_scope.cnnpress_method["config"]["channels"].values()) == {6, 11, 22}


def test_global_l1_compares_filters_of_different_sizes_by_their_mean():
    net = resnet()
    pruned = cnnpress.compress(net, "filter_prune", ratio=0.5, scope="global")
    kept = pruned.cnnpress_method["config"]["channels"]
    means = torch.cat(
        [net.get_submodule(n).weight.detach().abs().mean((1, 2, 3)) for n in sorted(kept)]
    )
    assert sum(kept.values()) == means.numel() - round(0.5 * means.numel())
    rebuilt = cnnpress.compress(resnet(), "filter_prune", **pruned.cnnpress_method["config"])
    assert [p.shape for p in rebuilt.parameters()] == [p.shape for p in pruned.parameters()]


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(x)
        return y + self.conv2(y)


@pytest.mark.parametrize(
    ("model", "settings", "needle"),
    [
        (resnet, {"ratio": 1.0}, "ratio"),
        (resnet, {"criterion": "l3"}, "criterion"),
        (resnet, {"slimming_l1": -1.0}, "slimming_l1"),
        (resnet, {"scope": "all"}, "scope"),
        (resnet, {"scope": "global", "layers": {"layer1.0.conv1": {"ratio": 0.1}}}, "scope"),
        (resnet, {"channels": {"layer1.0.conv1": 0}}, "channels"),
        (resnet, {"channels": {"layer1.0.conv2": 4}}, "not a prunable conv"),
        (resnet, {"layers": {"layer1.0.conv2": {"ratio": 0.5}}}, "cannot be removed"),
        (Residual, {}, "finds no conv"),
    ],
)
def test_filter_config_errors(model, settings, needle):
    with pytest.raises(ConfigError, match=needle):
        cnnpress.compress(model(), "filter_prune", **settings)


# -- the file -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "settings"),
    [
        ("magnitude_prune", {"sparsity": 0.9, "include_linear": True}),
        ("magnitude_prune", {"sparsity": 0.6, "scope": "global"}),
        ("filter_prune", {"ratio": 0.5}),
    ],
)
def test_file_round_trip_size_and_cost(tmp_path, method, settings):
    net = cnnpress.compress(resnet(), method, **settings).eval()
    path, fp32 = tmp_path / "m.cnnp", tmp_path / "fp32.cnnp"
    cnnpress.save(net, path)
    same = cnnpress.load(path)
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert rel_err(net(x), same(x)) <= 1e-5
    info = read_info(path)
    s = cnnpress.summary(net, (1, 28, 28))
    s.attach_file(info)
    arrays_per_row: dict[str, int] = {}
    for a in info["arrays"]:
        arrays_per_row[a["module"]] = arrays_per_row.get(a["module"], 0) + 1
    for row in s.rows:  # bytes written == stored bits, rounded up per array
        assert 0 <= 8 * row.file_bytes - row.stored_bits < 8 * arrays_per_row[row.name], row.name
    assert sum(r.file_bytes for r in s.rows) == info["payload_bytes"]
    cnnpress.save(cnnpress.models.create("resnet20", 1, 10, width=8), fp32)
    assert os.path.getsize(path) < 0.6 * os.path.getsize(fp32)


def test_cost_counts_kept_weights():
    net = cnnpress.compress(resnet(), "magnitude_prune", sparsity=0.75)
    rows = {r.name: r for r in cnnpress.summary(net, (1, 28, 28)).rows}
    layer = net.layer2[1].conv1  # 16 -> 16 channels, 3x3, on 14x14 maps
    assert rows["layer2.1.conv1"].macs == layer.kept() * 14 * 14
    assert layer.kept() == 16 * 16 * 9 - round(0.75 * 16 * 16 * 9)
    assert rows["layer2.1.conv1"].stored_bits == 32 * layer.kept() + position_bits(layer.record)
    assert math.isclose(rows["layer2.1.conv1"].fp32_bits, 32 * 16 * 16 * 9)
