"""SLBF from trained weights: the clustered init beats random selections, never beats the
sign-of-every-slice floor (and reaches it when every slice can have its own filter), loads the
layer consistently, and keeps a conv-BatchNorm pair's function up to the approximation."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import cnnpress
from cnnpress.errors import ConfigError
from cnnpress.methods.slbf import SLBFConv2d, SLBFLinear
from cnnpress.methods.slbf_init import (
    cluster,
    init_from_dense,
    init_from_module,
    scaled_error,
    slices_of,
)


def conv_layer(c: int = 32, n: int = 16, d: int = 8, m: int = 8) -> tuple[nn.Conv2d, SLBFConv2d]:
    dense = nn.Conv2d(c, n, 3, padding=1, bias=False)
    return dense, SLBFConv2d.from_conv(dense, d, m, scale=False)


def test_init_beats_random_and_never_beats_the_sign_floor():
    torch.manual_seed(0)
    dense, layer = conv_layer()
    stats = init_from_dense(layer, dense.weight)
    floor = scaled_error(dense.weight, torch.sign(dense.weight))
    assert stats["error"] < stats["random_error"] - 0.05
    assert stats["filter_error"] < stats["random_filter_error"] - 0.05
    assert stats["error"] >= floor[0] - 1e-6 and stats["filter_error"] >= floor[1] - 1e-6
    assert stats["bank_used"] == layer.bank_usage() <= layer.num_filters


def test_a_filter_per_slice_reaches_the_sign_floor():
    torch.manual_seed(1)
    dense, layer = conv_layer(c=16, n=4, d=8, m=8)  # n*s = 8 slices, 8 bank filters
    stats = init_from_dense(layer, dense.weight)
    floor = scaled_error(dense.weight, torch.sign(dense.weight))
    assert stats["error"] == pytest.approx(floor[0], abs=1e-6)
    assert stats["bank_used"] == 8


def test_weighted_vote_beats_hamming_kmeans():
    errors = {True: 0.0, False: 0.0}
    for seed in range(3):
        torch.manual_seed(seed)
        weight = torch.randn(16, 32, 3, 3) * torch.rand(16, 32, 1, 1)  # uneven slice norms
        x = slices_of(weight, 8)
        for weighted in errors:
            bank, idx, _ = cluster(x, 8, weighted=weighted, seed=seed)
            errors[weighted] += scaled_error(weight, bank[idx].reshape(weight.shape))[1]
    assert errors[True] < errors[False]


def test_layer_state_matches_the_reported_init():
    torch.manual_seed(2)
    dense, layer = conv_layer()
    before = torch.get_rng_state()
    stats = init_from_dense(layer, dense.weight)
    assert torch.equal(torch.get_rng_state(), before)  # a private generator
    with torch.no_grad():
        stacked = layer.stacked_weight()
    assert scaled_error(dense.weight, stacked)[0] == pytest.approx(stats["error"], abs=1e-6)
    assert torch.equal(layer.latent.detach(), dense.weight.detach())  # latents = trained
    # every slice selects its best bank filter (largest inner product with the slice)
    x = slices_of(dense.weight, 8)
    best = torch.einsum("nsd,md->nsm", x, layer.bank().flatten(1)).max(-1).values
    chosen = torch.einsum("nsd,nsd->ns", x, layer.bank().flatten(1)[layer.indices()])
    assert torch.allclose(chosen, best, atol=1e-6)
    again = conv_layer()[1]
    init_from_dense(again, dense.weight)
    assert torch.equal(again.indices(), layer.indices())
    assert torch.equal(again.bank(), layer.bank())


def test_linear_gets_scales_and_bias():
    torch.manual_seed(3)
    dense = nn.Linear(32, 10)
    nn.init.normal_(dense.bias)
    fresh = SLBFLinear.from_linear(dense, 8, 16, scale=True)
    layer = copy.deepcopy(fresh)
    stats = init_from_module(layer, dense)
    assert torch.allclose(layer.scale.detach(), stats["alpha"])
    assert torch.equal(layer.bias.detach(), dense.bias.detach())
    x = torch.randn(64, 32)
    with torch.no_grad():
        want = dense(x)

        def err(m: nn.Module) -> float:
            return ((m(x) - want).norm() / want.norm()).item()

        assert err(layer) < 0.8 * err(fresh)


def conv_bn_net() -> nn.Sequential:
    torch.manual_seed(4)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, bias=True),
        nn.BatchNorm2d(16),
    )
    for bn in (net[1], net[4]):
        bn.momentum = None  # running statistics = those of the batch below
    with torch.no_grad():
        net.train()
        net(torch.randn(64, 3, 12, 12))
    return net.eval()


def test_conv_batchnorm_pair_keeps_its_function():
    net = conv_bn_net()
    x = torch.randn(8, 3, 12, 12)
    with torch.no_grad():
        want = net(x)
    settings = {"slice_channels": 8, "num_filters": 32}  # a filter per slice: the sign floor
    inited = cnnpress.compress(net, "slbf", init="weights", **settings).eval()
    no_rescale = copy.deepcopy(inited)
    no_rescale[4].load_state_dict(net[4].state_dict())
    torch.manual_seed(0)
    rand = cnnpress.compress(net, "slbf", init="random", **settings).eval()
    with torch.no_grad():
        errs = [((m(x) - want).norm() / want.norm()).item() for m in (inited, no_rescale, rand)]
    assert errs[0] < 0.8 * errs[1] and errs[0] < 0.8 * errs[2]
    assert inited[3].scale is None and net[3].bias is not None


def test_init_setting():
    net = conv_bn_net()
    auto = cnnpress.compress(net, "slbf", slice_channels=8, num_filters=4)
    weights = cnnpress.compress(net, "slbf", slice_channels=8, num_filters=4, init="weights")
    assert torch.equal(auto[3].indices(), weights[3].indices())
    rand = cnnpress.compress(net, "slbf", slice_channels=8, num_filters=4, init="random")
    assert not torch.equal(rand[3].latent, weights[3].latent)  # fresh latent filters
    assert torch.equal(rand[4].running_var, net[4].running_var)
    with pytest.raises(ConfigError, match="init must be one of"):
        cnnpress.compress(net, "slbf", init="kmeans")
    with pytest.raises(ValueError, match="does not fit"):
        init_from_dense(weights[3], torch.randn(16, 8, 3, 3))
