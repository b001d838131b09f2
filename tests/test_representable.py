"""What each method's layer can represent of a conv, over every registered method.

A compressed layer that drops a conv's groups, dilation or padding mode computes a different
function with the same output shape. So for a grouped, a depthwise, a dilated, a
reflect-padded and a ``padding="same"`` conv explicitly included, every method either keeps
the function family (a conv of the original geometry with the layer's own weight, and the
original output where the method is exact at full precision) or raises one ``ConfigError``
naming the layer; the default rule leaves out what a method cannot represent.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

import cnnpress
from cnnpress.errors import ConfigError
from cnnpress.geometry import numeric_padding, out_hw, out_size
from cnnpress.runtime.dense import dense_layer, is_compressed

METHODS = cnnpress.methods.names()

#: settings that make a method reproduce the dense layer at full precision (where it can)
EXACT = {
    "filter_prune": {"ratio": 0.0},
    "kmeans": {"bits": 16},
    "lowrank": {"ranks": {"body": [8, 8], "mid": [8, 8], "head": [8, 8]}},
    "magnitude_prune": {"sparsity": 0.0},
}  # (pq is exact only with a centroid per sub-vector, which it caps: more than fp32)

BODIES = {
    "grouped": dict(kernel_size=3, padding=1, groups=4),
    "depthwise": dict(kernel_size=3, padding=1, groups=8),
    "dilated": dict(kernel_size=3, padding=2, dilation=2),
    "reflect": dict(kernel_size=3, padding=1, padding_mode="reflect"),
    "circular": dict(kernel_size=3, padding=(1, 2), padding_mode="circular"),
    "same": dict(kernel_size=3, padding="same"),
    "same_even": dict(kernel_size=4, padding="same"),
    "strided": dict(kernel_size=3, stride=2, padding=(0, 1)),
}


class Net(nn.Module):
    """A stem conv (left out by the default rule), the conv under test, a plain 3x3 conv and
    a 1x1 head."""

    def __init__(self, body: dict) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Conv2d(8, 8, bias=True, **body)
        self.mid = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.body(torch.relu(self.stem(x))))
        return self.head(torch.relu(self.mid(x)))


def net_with(kind: str) -> Net:
    torch.manual_seed(0)
    return Net(BODIES[kind]).eval()


def compress(net: nn.Module, method: str, **settings) -> nn.Module:
    return cnnpress.compress(net, method, **{**EXACT.get(method, {}), **settings}).eval()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / a.norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("kind", list(BODIES))
@pytest.mark.parametrize("method", METHODS)
def test_explicit_include_keeps_the_function_or_names_the_layer(method, kind):
    net = net_with(kind)
    represents = cnnpress.methods.get(method).represents
    what = represents.missing(net.body)
    try:
        out = compress(net, method, layers={"body": {"include": True}})
    except ConfigError as err:
        assert "layer body" in str(err), (method, kind, str(err))
        assert what is not None, f"{method} refused a {kind} conv it says it represents: {err}"
        assert what in str(err)
        return
    assert what is None, f"{method} compressed a {kind} conv it cannot represent ({what})"
    x = torch.randn(2, 3, 9, 11)
    h = torch.relu(net.stem(x))
    layer = out.body
    with torch.no_grad():
        y, want = layer(h), net.body(h)
        assert y.shape == want.shape and out(x).shape == net(x).shape, (method, kind)
        if isinstance(layer, nn.Conv2d):  # filter pruning rebuilds a plain conv
            same = ("stride", "padding", "dilation", "groups", "padding_mode")
            assert all(getattr(layer, a) == getattr(net.body, a) for a in same), (method, kind)
        elif is_compressed(layer):
            # the layer is a conv of the original geometry with its own weight
            ref = copy.deepcopy(net.body)
            dense = dense_layer(layer)
            ref.weight.copy_(dense.weight)
            ref.bias.copy_(dense.bias)
            assert rel(ref(h), y) < 1e-4, (method, kind)
        if method in EXACT:
            assert rel(want, y) < 1e-4, (method, kind, rel(want, y))
        assert torch.isfinite(y).all()
    # the stored size is that of the conv it replaces, whatever its groups
    cls = cnnpress.methods.get(method)
    if cls.layer_types and isinstance(layer, cls.layer_types):
        cost = cls().cost(layer, tuple(h.shape[1:]))
        assert cost.fp32_bits == 32 * (net.body.weight.numel() + net.body.bias.numel())


@pytest.mark.parametrize("kind", ["depthwise", "reflect", "same_even"])
@pytest.mark.parametrize("method", METHODS)
def test_default_rule_leaves_out_what_the_method_cannot_represent(method, kind):
    net = net_with(kind)
    out = cnnpress.compress(net, method).eval()
    if cnnpress.methods.get(method).represents.missing(net.body) or net.body.groups != 1:
        assert type(out.body) is nn.Conv2d
        assert torch.equal(out.body.weight, net.body.weight), (method, kind)
    x = torch.randn(2, 3, 9, 11)
    with torch.no_grad():
        assert out(x).shape == net(x).shape


def test_a_grouped_conv_left_in_fp32_is_counted_at_its_own_size():
    """SLBF leaves a depthwise conv out; the summary counts its 8*1*9 weights, not 8*8*9."""
    net = net_with("depthwise")
    out = cnnpress.compress(net, "slbf")
    assert type(out.body) is nn.Conv2d
    rows = {r.name: r for r in cnnpress.summary(out, (3, 9, 11)).rows}
    assert rows["body"].fp32_bits == 32 * (8 * 1 * 9 + 8)
    assert rows["head"].compressed and rows["head"].fp32_bits == 32 * (8 * 8 + 8)


def test_out_size_matches_torch():
    for k, s, p, d, n in itertools.product((1, 2, 3, 5), (1, 2, 3), (0, 1, 2), (1, 2), (7, 8)):
        if n + 2 * p < d * (k - 1) + 1:
            continue
        conv = nn.Conv2d(1, 1, (k, 1), (s, 1), (p, 0), (d, 1))
        assert out_size(n, k, s, p, d) == conv(torch.zeros(1, 1, n, 3)).shape[2]
    for kind, body in BODIES.items():
        conv = nn.Conv2d(8, 8, **body)
        assert out_hw(conv, 9, 11) == tuple(conv(torch.zeros(1, 8, 9, 11)).shape[2:]), kind


def test_numeric_padding_of_string_padding():
    assert numeric_padding(nn.Conv2d(1, 1, 3, padding="same")) == (1, 1)
    assert numeric_padding(nn.Conv2d(1, 1, 3, padding="valid")) == (0, 0)
    assert numeric_padding(nn.Conv2d(1, 1, (3, 5), padding="same", dilation=2)) == (2, 4)
    assert numeric_padding(nn.Conv2d(1, 1, 4, padding="same")) is None
