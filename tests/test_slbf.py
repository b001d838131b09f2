"""SLBF: split-transform-merge equals the dense conv of the stacked filters; STE gradients;
bank usage; settings validation; conversion rules and the storage formula."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import cnnpress
from cnnpress.errors import ConfigError
from cnnpress.methods.slbf import SLBFConv2d, SLBFLinear, index_bits


def reference_filters(layer: SLBFConv2d) -> torch.Tensor:
    """Filter i = concat over slices j of B[p(i, j)], built with plain loops."""
    bank, idx = layer.bank(), layer.indices()
    filters = []
    for i in range(layer.out_channels):
        f = torch.cat([bank[idx[i, j]] for j in range(layer.num_slices)], dim=0)
        if layer.scale is not None:
            f = f * layer.scale.detach()[i]
        filters.append(f)
    return torch.stack(filters)


@settings(max_examples=25, deadline=None)
@given(
    d=st.sampled_from([1, 2, 3, 5]),
    s=st.integers(1, 4),
    n=st.integers(1, 11),
    m=st.integers(2, 9),
    k=st.sampled_from([1, 2, 3, 5]),
    stride=st.sampled_from([1, 2]),
    padding=st.integers(0, 2),
    hw=st.integers(5, 11),
    batch=st.integers(1, 3),
    scale=st.booleans(),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_split_transform_merge_equals_dense_conv(
    d, s, n, m, k, stride, padding, hw, batch, scale, bias, seed
):
    torch.manual_seed(seed)
    c = d * s
    layer = SLBFConv2d(
        c,
        n,
        k,
        stride=stride,
        padding=padding,
        bias=bias,
        slice_channels=d,
        num_filters=m,
        scale=scale,
    )
    if bias:
        nn.init.normal_(layer.bias)
    x = torch.randn(batch, c, hw + k, hw)
    expected = F.conv2d(x, reference_filters(layer), layer.bias, stride, padding)
    with torch.no_grad():
        dense = layer.forward_dense(x)
        stm_gather = layer.forward_stm(x)
    tol = dict(rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(dense, expected, **tol)
    torch.testing.assert_close(stm_gather, expected, **tol)


def test_stacked_weight_matches_loop_reference():
    torch.manual_seed(1)
    layer = SLBFConv2d(12, 7, 3, slice_channels=4, num_filters=5, scale=True)
    torch.testing.assert_close(layer.stacked_weight().detach(), reference_filters(layer))


def test_training_forward_uses_the_projection_and_every_path_agrees_after_it():
    torch.manual_seed(2)
    layer = SLBFConv2d(8, 6, 3, padding=1, slice_channels=4, num_filters=4, scale=True)
    x = torch.randn(2, 8, 7, 7)
    with torch.no_grad():
        layer.latent.add_(torch.randn_like(layer.latent))  # far from the current projection
    bank = layer.bank().clone()
    y_train = layer.train()(x).detach()  # projects first
    assert not torch.equal(layer.bank(), bank)
    layer.eval()
    for path in ("dense", "stm", "auto"):
        layer.path = path
        with torch.no_grad():
            torch.testing.assert_close(layer(x), y_train, rtol=1e-5, atol=1e-4)


def test_gradient_reaches_the_latent_filters_straight_through_scaled_by_mean_abs():
    torch.manual_seed(3)
    layer = SLBFConv2d(8, 4, 3, padding=1, slice_channels=4, num_filters=3)
    x = torch.randn(2, 8, 6, 6)
    layer(x).pow(2).sum().backward()
    # reference: the gradient of the stacked binary filters as plain conv weights
    w = layer.binary_filters().clone().requires_grad_(True)
    F.conv2d(x, w, padding=1).pow(2).sum().backward()
    gain = layer.latent.detach().abs().flatten(1).mean(1).view(-1, 1, 1, 1)
    torch.testing.assert_close(layer.latent.grad, w.grad / gain)


def test_a_slice_moved_next_to_another_bank_filter_changes_selection_and_bits():
    torch.manual_seed(5)
    layer = SLBFConv2d(4, 3, 1, slice_channels=2, num_filters=4)
    bank = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]]).view(4, 2, 1, 1)
    idx = torch.tensor([[0, 0], [0, 1], [2, 3]])
    layer.load_selection(idx, bank)
    layer.project()
    assert torch.equal(layer.indices(), idx) and torch.equal(layer.bank(), bank)  # a fixed point
    with torch.no_grad():
        layer.latent[0, :2] = torch.tensor([1.0, -1.0]).view(2, 1, 1)  # slice (0, 0) -> filter 1
    layer.project()
    assert layer.indices()[0, 0] == 1


def test_a_bank_bit_flips_when_the_majority_of_its_members_flips():
    layer = SLBFConv2d(4, 2, 1, slice_channels=2, num_filters=2)
    bank = torch.tensor([[1.0, 1.0], [-1.0, -1.0]]).view(2, 2, 1, 1)
    layer.load_selection(torch.tensor([[0, 0], [0, 1]]), bank)
    with torch.no_grad():  # filter 0's three members: two now lean -1 on the second bit
        layer.latent[0, :2] = torch.tensor([1.0, -0.2]).view(2, 1, 1)
        layer.latent[0, 2:] = torch.tensor([1.0, -0.3]).view(2, 1, 1)
        layer.latent[1, :2] = torch.tensor([1.0, 0.1]).view(2, 1, 1)
    layer.project()
    assert layer.indices()[:, 0].tolist() == [0, 0] and layer.indices()[0, 1] == 0
    assert layer.bank()[0].flatten().tolist() == [1.0, -1.0]
    assert layer.bank()[1].flatten().tolist() == [-1.0, -1.0]  # its member did not move


def test_an_unused_bank_filter_is_reseeded_from_the_worst_fitting_slice():
    layer = SLBFConv2d(4, 2, 1, slice_channels=2, num_filters=3)
    bank = torch.tensor([[1.0, 1.0], [1.0, 1.0], [-1.0, -1.0]]).view(3, 2, 1, 1)
    layer.load_selection(torch.tensor([[0, 0], [0, 2]]), bank)
    with torch.no_grad():
        layer.latent[0, 2:] = torch.tensor([1.0, -1.0]).view(2, 1, 1)  # fits no bank filter
    layer.project()
    assert layer.bank_usage() == 3  # the duplicate filter 1 took the misfit slice
    assert layer.bank()[layer.indices()[0, 1]].flatten().tolist() == [1.0, -1.0]


def test_bank_usage_on_known_selections():
    layer = SLBFConv2d(8, 6, 3, slice_channels=4, num_filters=8)
    idx = torch.tensor([[0, 1], [1, 0], [0, 0], [1, 1], [5, 1], [0, 5]])
    layer.load_selection(idx, torch.ones(8, 4, 3, 3))
    assert layer.bank_usage() == 3
    assert layer.usage_counts().tolist() == [5, 5, 0, 0, 0, 2, 0, 0]
    torch.testing.assert_close(layer.indices(), idx)


def test_linear_is_a_one_by_one_conv():
    torch.manual_seed(4)
    lin = SLBFLinear(12, 5, slice_channels=3, num_filters=4)
    conv = SLBFConv2d(12, 5, 1, bias=True, slice_channels=3, num_filters=4, scale=True)
    conv.load_state_dict(lin.state_dict())
    x = torch.randn(3, 12)
    torch.testing.assert_close(lin(x), conv(x.view(3, 12, 1, 1)).view(3, 5))


@pytest.mark.parametrize(
    ("settings_", "message"),
    [
        ({"slice_channels": 5}, "does not divide"),
        ({"num_filters": 1}, "from 2 to 65536"),
        ({"num_filters": 2**16 + 1}, "from 2 to 65536"),
        ({"slice_channels": 0}, "positive integer"),
        ({"bank": 3}, "unknown setting"),
        ({"layers": {"nothing.*": {"num_filters": 4}}}, "match no layer"),
    ],
)
def test_invalid_settings_raise_one_clear_error(settings_, message):
    net = cnnpress.models.create("resnet20", 1, 10)
    with pytest.raises(ConfigError, match=message) as info:
        cnnpress.compress(net, "slbf", **settings_)
    assert "\n" not in str(info.value)


def test_compress_returns_a_new_model_with_every_conv_but_the_first_replaced():
    net = cnnpress.models.create("resnet20", 1, 10)
    small = cnnpress.compress(net, "slbf", slice_channels=8, num_filters=16)
    assert small is not net and isinstance(net.layer1[0].conv1, nn.Conv2d)
    assert isinstance(small.conv1, nn.Conv2d) and isinstance(small.fc, nn.Linear)
    slbf = [m for m in small.modules() if isinstance(m, SLBFConv2d)]
    assert len(slbf) == 18 and all(m.scale is None for m in slbf)  # BN follows every conv
    assert small.cnnpress_method["config"]["num_filters"] == 16
    assert small(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_per_layer_overrides_by_glob_and_skip():
    net = cnnpress.models.create("resnet20", 1, 10)
    small = cnnpress.compress(
        net,
        "slbf",
        slice_channels=8,
        num_filters=16,
        include_linear=True,
        layers={
            "layer3.*": {"num_filters": 64, "slice_channels": 16},
            "layer1.0.conv1": None,
            "fc": {"slice_channels": 4},
        },
    )
    assert isinstance(small.layer1[0].conv1, nn.Conv2d)
    assert small.layer3[1].conv2.num_filters == 64 and small.layer3[1].conv2.slice_channels == 16
    assert small.layer2[0].conv1.num_filters == 16
    assert isinstance(small.fc, SLBFLinear) and small.fc.scale is not None  # no BN after fc


def test_stored_bits_follow_the_formula():
    layer = SLBFConv2d(64, 32, 3, slice_channels=8, num_filters=24)
    n, c, d, m, k = 32, 64, 8, 24, 3
    assert layer.stored_bits() == m * d * k * k + n * (c // d) * math.ceil(math.log2(m))
    assert index_bits(2) == 1 and index_bits(16) == 4 and index_bits(17) == 5
    scaled = SLBFConv2d(64, 32, 3, slice_channels=8, num_filters=24, scale=True, bias=True)
    assert scaled.stored_bits() == layer.stored_bits() + 2 * 32 * n


@pytest.mark.parametrize(
    ("conv", "message"),
    [
        (nn.Conv2d(8, 8, 3, groups=4), "grouped convs"),
        (nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"), "'reflect'"),
    ],
)
def test_a_conv_slbf_cannot_represent_is_refused_by_name(conv, message):
    net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), conv)
    with pytest.raises(ConfigError, match=f"layer 2: .*{message}") as info:
        cnnpress.compress(net, "slbf", layers={"2": {"include": True}}, slice_channels=4)
    assert "\n" not in str(info.value)
