"""k-means weight sharing: linear-init Lloyd clustering, every weight a centroid, mean or summed
centroid gradients, the prune-then-quantize pipeline, the .cnnp file at its reported cost, the
recipe."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import cnnpress
import cnnpress.methods.kmeans  # noqa: F401  (registers kmeans)
from cnnpress.errors import ConfigError
from cnnpress.format import read_info
from cnnpress.methods.kmeans import KMeansConfig, KMeansLayer, kmeans_1d
from cnnpress.methods.sparse import position_bits
from cnnpress.runtime.dense import to_dense
from helpers import rel_err, resnet

ROOT = Path(__file__).resolve().parents[1]


def kmeans_layers(net: nn.Module) -> dict[str, KMeansLayer]:
    return {n: m for n, m in net.named_modules() if isinstance(m, KMeansLayer)}


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 300), k=st.sampled_from([2, 4, 16]), seed=st.integers(0, 2**16))
def test_kmeans_assigns_nearest_and_improves_on_linear_init(n, k, seed):
    v = torch.randn(n, generator=torch.Generator().manual_seed(seed)) ** 3
    centroids, assign = kmeans_1d(v, k, iterations=20)
    assert centroids.shape == (k,) and assign.shape == (n,)
    dist = (v.view(-1, 1) - centroids.view(1, -1)).abs()
    torch.testing.assert_close(dist.gather(1, assign.view(-1, 1)).squeeze(1), dist.min(1).values)
    linear, linear_assign = kmeans_1d(v, k, iterations=0)
    torch.testing.assert_close(linear, torch.linspace(float(v.min()), float(v.max()), k))
    err = (v - centroids[assign]).square().sum()
    assert err <= (v - linear[linear_assign]).square().sum() + 1e-6


@pytest.mark.parametrize("sparsity", [0.0, 0.7])
def test_forward_gradients_codebook_and_weights(sparsity):
    net = cnnpress.compress(resnet(), "kmeans", bits=3, sparsity=sparsity, include_linear=True)
    layers = kmeans_layers(net)
    assert len(layers) == 19
    for layer in layers.values():
        w = layer.dense_weight().detach()
        assert layer.centroids.shape == (8,)
        kept = w[layer.mask] if layer.mask is not None else w.flatten()
        assert torch.isin(kept, layer.centroids.detach()).all()  # every weight is a centroid
        if layer.mask is not None:
            n = layer.numel()
            assert n - layer.kept() == round(sparsity * n)
            assert (w[~layer.mask] == 0).all()
    out = net(torch.randn(2, 1, 28, 28))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    out.square().mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    dense = to_dense(net.eval())  # the plain-layer runtime rebuilds codebook[index] * mask
    assert not kmeans_layers(dense)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert rel_err(net(x), dense(x)) <= 1e-6


def test_pruning_keeps_the_largest_weights_and_clusters_only_them():
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 6, 3))
    original = conv[1].weight.detach().clone()
    net = cnnpress.compress(conv, "kmeans", bits=2, sparsity=0.5)
    layer = net[1]
    assert original[layer.mask].abs().min() >= original[~layer.mask].abs().max()
    kept = original[layer.mask]
    assert layer.centroids.min() >= kept.min() and layer.centroids.max() <= kept.max()


@pytest.mark.parametrize(("sparsity", "rule"), [(0.0, "mean"), (0.6, "mean"), (0.6, "sum")])
def test_centroid_gradient_is_the_mean_or_sum_of_its_members(sparsity, rule):
    torch.manual_seed(1)
    net = cnnpress.compress(resnet(), "kmeans", bits=2, sparsity=sparsity, centroid_grad=rule)
    layer = net.layer2[1].conv1
    weights = {}
    original = layer.dense_weight

    def dense() -> torch.Tensor:
        w = original()
        w.retain_grad()
        weights["w"] = w
        return w

    layer.dense_weight = dense
    net(torch.randn(2, 1, 28, 28)).square().sum().backward()
    members = layer.mask if layer.mask is not None else torch.ones_like(layer.index, dtype=bool)
    for j in range(4):
        chosen = (layer.index == j) & members
        grads = weights["w"].grad[chosen]
        want = grads.mean() if rule == "mean" else grads.sum()
        torch.testing.assert_close(layer.centroids.grad[j], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "settings",
    [
        {"bits": 0},
        {"bits": 17},
        {"bits": 2.5},
        {"bits": True},
        {"sparsity": 1.0},
        {"sparsity": -0.5},
        {"iterations": -1},
        {"centroid_grad": "max"},
        {"clusters": 16},
        {"layers": {"layer1.*": {"include_linear": True}}},
        {"sparse_layout": {"layer1.0.conv1": [5, 2, 3]}},
        {"sparsity": 0.5, "sparse_layout": {"fc": [10, 0, 640]}},
    ],
)
def test_config_errors(settings):
    with pytest.raises(ConfigError):
        cnnpress.compress(resnet(), "kmeans", **settings)


def test_per_layer_bits():
    net = cnnpress.compress(resnet(), "kmeans", bits=2, layers={"layer3.*": {"bits": 5}})
    layers = kmeans_layers(net)
    assert layers["layer3.0.conv1"].centroids.numel() == 32
    assert layers["layer1.0.conv1"].centroids.numel() == 4


@pytest.mark.parametrize(
    "settings",
    [
        {"bits": 4},
        {"bits": 4, "sparsity": 0.8, "include_linear": True},
        {"bits": 2, "sparsity": 0.3, "layers": {"layer3.*": {"sparsity": 0.9, "bits": 5}}},
    ],
)
def test_file_round_trip_size_and_cost(tmp_path, settings):
    net = cnnpress.compress(resnet(), "kmeans", **settings).eval()
    path = tmp_path / "m.cnnp"
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
    fp32 = tmp_path / "fp32.cnnp"
    cnnpress.save(cnnpress.models.create("resnet20", 1, 10, width=8), fp32)
    assert os.path.getsize(path) < 0.5 * os.path.getsize(fp32)


def test_cost_formula_and_sparse_is_smaller():
    dense = cnnpress.compress(resnet(), "kmeans", bits=4)
    sparse = cnnpress.compress(resnet(), "kmeans", bits=4, sparsity=0.8)
    rd = {r.name: r for r in cnnpress.summary(dense, (1, 28, 28)).rows}
    rs = {r.name: r for r in cnnpress.summary(sparse, (1, 28, 28)).rows}
    n = 16 * 16 * 9
    assert rd["layer2.1.conv1"].stored_bits == 16 * 32 + n * 4
    assert rd["layer2.1.conv1"].macs == n * 14 * 14
    layer = sparse.layer2[1].conv1
    want = 16 * 32 + layer.kept() * 4 + position_bits(layer.record)
    assert rs["layer2.1.conv1"].stored_bits == want < rd["layer2.1.conv1"].stored_bits
    assert rs["layer2.1.conv1"].macs == layer.kept() * 14 * 14


def test_float16_file(tmp_path):
    net = cnnpress.compress(resnet(), "kmeans", bits=4, sparsity=0.5).eval()
    n32 = cnnpress.save(net, tmp_path / "a.cnnp")
    n16 = cnnpress.save(net, tmp_path / "b.cnnp", float16=True)
    assert n16 < n32
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert rel_err(net(x), cnnpress.load(tmp_path / "b.cnnp")(x)) <= 5e-3


def test_deep_compression_recipe_resolves():
    from cnnpress.cli.commands import resolve_config
    from cnnpress.cli.main import build_parser

    recipe = ROOT / "recipes" / "deep-compression.yaml"
    cfg = resolve_config(build_parser().parse_args(["compress", "--recipe", str(recipe)]), True)
    assert (cfg["model"], cfg["data"], cfg["method"]) == ("resnet20", "fashion-mnist", "kmeans")
    config = KMeansConfig(**cfg["method_config"])
    assert (config.bits, config.sparsity) == (4, 0.8)
    assert cfg["train"]["epochs"] == 15
