"""Summary: totals are the sums of the rows; standard-layer MACs match the conv formula;
SLBF rows use the SLBF formula."""

from __future__ import annotations

import json

import cnnpress
from cnnpress.methods.slbf import SLBFConv2d


def test_totals_equal_the_sum_of_rows():
    net = cnnpress.compress(
        cnnpress.models.create("resnet20", 1, 10), "slbf", slice_channels=8, num_filters=16
    )
    s = cnnpress.summary(net, (1, 28, 28))
    for key in ("weights", "stored_bits", "fp32_bits", "macs", "binary_macs", "adds"):
        assert s.totals[key] == sum(getattr(r, key) for r in s.rows)
    assert s.totals["reference_fp32_bits"] == s.totals["fp32_bits"]  # SLBF keeps the shapes
    assert s.totals["ratio"] == s.totals["fp32_bits"] / s.totals["stored_bits"]
    comp = [r for r in s.rows if r.compressed]
    assert s.totals["compressed_layers"] == len(comp) == 18
    assert json.loads(json.dumps(s.to_dict()))["totals"] == s.totals
    assert "layer3.2.conv2" in str(s)


def test_fp32_macs_and_bits():
    net = cnnpress.models.create("resnet20", 1, 10)
    s = cnnpress.summary(net, (1, 28, 28))
    rows = {r.name: r for r in s.rows}
    # 3x3 conv, 16 -> 16 channels, 28x28 output: n*c*k*k*H*W
    assert rows["layer1.0.conv1"].macs == 16 * 16 * 9 * 28 * 28
    assert rows["layer2.0.conv1"].macs == 32 * 16 * 9 * 14 * 14  # stride 2
    assert rows["fc"].macs == 64 * 10
    assert rows["bn1"].stored_bits == 32 * 4 * 16  # weight, bias, running mean and var
    params = sum(p.numel() for p in net.parameters())
    buffers = sum(b.numel() for n, b in net.named_buffers() if "num_batches" not in n)
    assert s.totals["fp32_bits"] == s.totals["stored_bits"] == 32 * (params + buffers)


def test_slbf_rows_use_the_slbf_formula():
    net = cnnpress.compress(
        cnnpress.models.create("resnet20", 1, 10), "slbf", slice_channels=8, num_filters=16
    )
    row = {r.name: r for r in cnnpress.summary(net, (1, 28, 28)).rows}["layer2.0.conv1"]
    layer: SLBFConv2d = net.layer2[0].conv1
    m, c, k, n, s, pixels = 16, 16, 3, 32, 2, 14 * 14
    assert row.stored_bits == layer.stored_bits() == m * 8 * k * k + n * s * 4
    assert row.binary_macs == m * c * k * k * pixels
    assert row.adds == n * s * pixels
    assert row.fp32_bits == 32 * n * c * k * k
