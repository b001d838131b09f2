"""Low-rank factorisation: SVD and Tucker-2 errors, rank choice by energy and by ratio,
settings validation, and the file (round trip, size equal to the cost model, smaller than fp32)."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cnnpress
import cnnpress.methods.lowrank  # noqa: F401  (registers the method)
from cnnpress.errors import ConfigError
from cnnpress.format import read_info
from cnnpress.methods.lowrank import (
    LowRankConv2d,
    LowRankLinear,
    energy_rank,
    factor_weights,
)
from cnnpress.runtime.dense import to_dense


def orthonormal(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, cols, generator=gen))[0]


def tiny_resnet(**settings) -> nn.Module:
    torch.manual_seed(0)
    return cnnpress.compress(
        cnnpress.models.create("resnet20", 1, 10, width=8), "lowrank", **settings
    )


@pytest.fixture(scope="module")
def lr_resnet() -> nn.Module:
    net = tiny_resnet(include_linear=True, layers={"layer3.*": {"ratio": 3.0}})
    for m in net.modules():  # trained-looking BatchNorm so comparisons are not trivial
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    return net.eval()


def test_svd_error_is_the_sum_of_discarded_squared_singular_values():
    torch.manual_seed(1)
    lin = nn.Linear(12, 20)
    s = torch.linalg.svdvals(lin.weight.detach().double())
    for r in range(1, 13):
        layer = LowRankLinear(12, 20, r)
        layer.init_from(lin.weight)
        err = (layer.dense_weight().detach().double() - lin.weight.detach().double()).pow(2).sum()
        assert float(err) == pytest.approx(float(s[r:].pow(2).sum()), rel=1e-4, abs=1e-6)
    x = torch.randn(4, 12)
    torch.testing.assert_close(layer(x), F.linear(x, layer.dense_weight(), layer.bias))


def test_tucker2_error_decreases_with_rank_and_vanishes_at_full_rank():
    torch.manual_seed(2)
    w = torch.randn(6, 5, 3, 3)
    errors = {}
    for r_in in range(1, 6):
        for r_out in range(1, 7):
            layer = LowRankConv2d(5, 6, 3, [r_in, r_out])
            layer.init_from(w)
            errors[r_in, r_out] = float((layer.dense_weight().detach() - w).pow(2).sum())
            # orthonormal factors: the error is what the core does not hold
            core = float(layer.core.detach().pow(2).sum())
            assert errors[r_in, r_out] == pytest.approx(float(w.pow(2).sum()) - core, abs=1e-3)
    for (r_in, r_out), e in errors.items():
        if r_in < 5:
            assert errors[r_in + 1, r_out] <= e + 1e-5
        if r_out < 6:
            assert errors[r_in, r_out + 1] <= e + 1e-5
    assert errors[1, 1] > 0.5 * float(w.pow(2).sum())
    assert errors[5, 6] < 1e-9 * float(w.pow(2).sum()) + 1e-8


@pytest.mark.parametrize(("stride", "padding", "dilation"), [(1, 1, 1), (2, 0, 1), (1, 2, 2)])
def test_tucker2_forward_is_the_conv_with_the_reconstructed_filters(stride, padding, dilation):
    torch.manual_seed(3)
    layer = LowRankConv2d(5, 7, 3, [3, 4], stride, padding, dilation, bias=True)
    nn.init.normal_(layer.bias)
    x = torch.randn(2, 5, 9, 8)
    expected = F.conv2d(x, layer.dense_weight(), layer.bias, stride, padding, dilation)
    torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-5)


def test_energy_rank_follows_the_documented_thresholds():
    s = torch.tensor([4.0, 2.0, 1.0, 1.0])  # squares 16, 4, 1, 1 of 22
    assert [energy_rank(s, e) for e in (0.5, 16 / 22, 0.73, 0.9, 0.95, 1.0)] == [1, 1, 2, 2, 3, 4]


def test_energy_chooses_the_rank_of_a_linear_layer_through_compress():
    gen = torch.Generator().manual_seed(4)
    model = nn.Sequential(nn.Linear(30, 8))
    s = torch.tensor([4.0, 2.0, 1.0, 1.0])
    w = orthonormal(8, 4, gen) @ torch.diag(s) @ orthonormal(30, 4, gen).T
    model[0].weight.data.copy_(w)
    for energy, rank in ((0.5, 1), (0.9, 2), (0.95, 3), (1.0, 4)):
        small = cnnpress.compress(model, "lowrank", include_linear=True, energy=energy)
        assert small.cnnpress_method["config"]["ranks"] == {"0": [rank]}
        assert small[0].rank == rank
    x = torch.randn(3, 30)  # full rank of W: the factorised layer computes the same
    torch.testing.assert_close(small(x), model(x), rtol=1e-4, atol=1e-5)


def test_energy_finds_the_tucker_ranks_of_a_conv():
    gen = torch.Generator().manual_seed(5)
    core = torch.randn(3, 2, 3, 3, generator=gen)  # r_out = 3, r_in = 2
    w = torch.einsum("rshw,nr,cs->nchw", core, orthonormal(10, 3, gen), orthonormal(8, 2, gen))
    model = nn.Sequential(nn.Conv2d(1, 8, 1), nn.Conv2d(8, 10, 3, padding=1))
    model[1].weight.data.copy_(w)
    small = cnnpress.compress(model, "lowrank", energy=0.999)
    assert small.cnnpress_method["config"]["ranks"] == {"1": [2, 3]}
    torch.testing.assert_close(small[1].dense_weight(), w, rtol=1e-4, atol=1e-5)


def test_ratio_chooses_the_documented_ranks():
    model = nn.Sequential(
        nn.Conv2d(1, 32, 1), nn.Conv2d(32, 64, 3), nn.Flatten(), nn.Linear(30, 10)
    )
    for ratio in (1.5, 4.0, 10.0):
        ranks = chosen_ranks(model, ratio)
        # Linear: the rank whose r * (out + in) is nearest to out * in / ratio
        best = min(range(1, 11), key=lambda r: abs(40 * r - 300 / ratio))
        assert ranks["3"] == [best]
        # conv: ranks in proportion to the channels, storing about 1/ratio of the layer
        r_in, r_out = ranks["1"]
        assert abs(r_in / 32 - r_out / 64) <= 1 / 32
        stored = factor_weights((64, 32, 3, 3), [r_in, r_out]) / (64 * 32 * 9)
        assert 0.8 / ratio <= stored <= 1.2 / ratio


def chosen_ranks(model: nn.Module, ratio: float) -> dict[str, list[int]]:
    small = cnnpress.compress(model, "lowrank", include_linear=True, ratio=ratio)
    return small.cnnpress_method["config"]["ranks"]


def test_ranks_never_store_more_than_the_dense_layer():
    torch.manual_seed(6)
    net = tiny_resnet(include_linear=True, energy=1.0)
    for name, m in net.named_modules():
        if isinstance(m, LowRankConv2d):
            dense = m.out_channels * m.in_channels * 9
            assert factor_weights((m.out_channels, m.in_channels, 3, 3), m.ranks) < dense, name
    assert isinstance(net.fc, LowRankLinear) and net.fc.rank * (64 + 10) < 640


def test_a_one_channel_first_conv_keeps_ranks_of_at_least_one():
    """The first conv of a 1-channel model has r_in = 1 at most: the cap lowers r_out, not
    r_in to 0 (which failed with "ranks['conv1'] must hold positive integers, got [0, 6]")."""
    torch.manual_seed(7)
    net = tiny_resnet(include_first=True, energy=1.0)
    assert isinstance(net.conv1, LowRankConv2d) and net.conv1.r_in == 1
    ranks = net.cnnpress_method["config"]["ranks"]["conv1"]
    assert min(ranks) >= 1 and factor_weights(tuple(net.conv1.dense_weight().shape), ranks) < 72


def test_full_ranks_reproduce_the_model_and_given_ranks_are_kept():
    torch.manual_seed(7)
    net = cnnpress.models.create("lenet5", 1, 10).eval()
    ranks = {"conv2": [6, 16], "fc1": [120], "fc2": [84], "fc3": [10]}
    small = cnnpress.compress(net, "lowrank", include_linear=True, ranks=ranks).eval()
    assert small.cnnpress_method["config"]["ranks"] == ranks
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(small(x), net(x), rtol=1e-4, atol=1e-5)


def test_resnet_forward_gradients_and_recorded_ranks(lr_resnet):
    net = copy.deepcopy(lr_resnet).train()
    convs = [n for n, m in net.named_modules() if isinstance(m, LowRankConv2d)]
    assert len(convs) == 18 and isinstance(net.conv1, nn.Conv2d)
    assert set(net.cnnpress_method["config"]["ranks"]) == {*convs, "fc"}
    out = net(torch.randn(2, 1, 28, 28))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    out.logsumexp(1).sum().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize(
    ("settings_", "message"),
    [
        ({"energy": 0}, r"energy must be a number in \(0, 1\]"),
        ({"energy": 1.5}, r"energy must be a number in \(0, 1\]"),
        ({"ratio": 0.5}, "ratio must be a number >= 1"),
        ({"ratio": "4"}, "ratio must be a number >= 1"),
        ({"ranks": {"layer1.0.conv1": 3}}, r"must be \[r\] \(Linear\) or \[r_in, r_out\]"),
        ({"ranks": {"layer1.0.conv1": [0, 2]}}, "positive integers"),
        ({"ranks": {"layer1.0.conv1": [2]}}, r"layer layer1.0.conv1: a conv needs ranks"),
        ({"ranks": {"layer1.0.conv1": [9, 2]}}, r"must lie in 1..8"),
        ({"ranks": {"fc": [2]}}, "does not compress"),
        ({"layers": {"fc": {"include": True, "ranks": [2]}}}, "only energy and ratio"),
        ({"rank": 3}, "unknown setting"),
    ],
)
def test_invalid_settings_raise_one_clear_error(settings_, message):
    net = cnnpress.models.create("resnet20", 1, 10, width=8)
    with pytest.raises(ConfigError, match=message) as info:
        cnnpress.compress(net, "lowrank", **settings_)
    assert "\n" not in str(info.value)


def test_round_trip_outputs_are_equal_in_fp32(lr_resnet, tmp_path):
    cnnpress.save(lr_resnet, tmp_path / "m.cnnp")
    same = cnnpress.load(tmp_path / "m.cnnp")
    assert same.cnnpress_method == lr_resnet.cnnpress_method
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        a, b = lr_resnet(x), same(x)
    assert ((a - b).abs().max() / a.abs().max()).item() <= 1e-5


@pytest.mark.parametrize("float_bits", [32, 16])
def test_file_size_equals_the_cost_model(lr_resnet, tmp_path, float_bits):
    path = tmp_path / "m.cnnp"
    cnnpress.save(lr_resnet, path, float16=float_bits == 16)
    info = read_info(path)
    s = cnnpress.summary(lr_resnet, (1, 28, 28), float_bits=float_bits)
    s.attach_file(info)
    arrays_per_row: dict[str, int] = {}
    for a in info["arrays"]:
        arrays_per_row[a["module"]] = arrays_per_row.get(a["module"], 0) + 1
    for row in s.rows:  # bytes written == stored bits, rounded up per array
        assert 0 <= 8 * row.file_bytes - row.stored_bits < 8 * arrays_per_row[row.name], row.name
    assert sum(r.kind.startswith("LowRank") for r in s.rows) == 19
    assert sum(r.file_bytes for r in s.rows) == info["payload_bytes"]
    assert os.path.getsize(path) == info["file_bytes"]
    assert s.file["ratio"] == pytest.approx(s.totals["fp32_bits"] / 8 / os.path.getsize(path))


def test_macs_are_those_of_the_factor_convs():
    layer = LowRankConv2d(8, 16, 3, [3, 5], stride=2, padding=1)
    cost = cnnpress.methods.get("lowrank")().cost(layer, (8, 10, 10))
    # 1x1 at 10x10 input, 3x3 core and 1x1 at the 5x5 output
    assert cost.macs == 100 * 8 * 3 + 25 * (5 * 3 * 9 + 16 * 5)
    assert cost.stored_bits == 32 * (8 * 3 + 5 * 3 * 9 + 16 * 5)
    assert cost.fp32_bits == 32 * 16 * 8 * 9 and cost.binary_macs == 0


def test_file_is_smaller_than_fp32_at_default_settings(tmp_path):
    fp32, small = tmp_path / "fp32.cnnp", tmp_path / "lowrank.cnnp"
    cnnpress.save(cnnpress.models.create("resnet20", 1, 10, width=8), fp32)
    cnnpress.save(tiny_resnet(), small)
    assert os.path.getsize(small) < os.path.getsize(fp32)


def test_dense_runtime_computes_the_same(lr_resnet):
    dense = to_dense(lr_resnet)
    assert not any(m is not dense and cnnpress.methods.method_for(m) for m in dense.modules())
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(dense(x), lr_resnet(x), rtol=1e-4, atol=1e-5)
