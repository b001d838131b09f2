"""The .cnnp file: bit packing, exact round trips, honest sizes, and bad files refused."""

from __future__ import annotations

import json
import os
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import cnnpress
from cnnpress.data import get_spec
from cnnpress.format import (
    FORMAT_VERSION,
    FormatError,
    load,
    pack_bits,
    packed_size,
    read_info,
    save,
    unpack_bits,
)
from cnnpress.format.container import MAGIC, _assemble


@settings(max_examples=200, deadline=None)
@given(bits=st.integers(1, 16), data=st.data())
def test_bitpack_round_trip_any_length(bits, data):
    values = np.array(
        data.draw(st.lists(st.integers(0, (1 << bits) - 1), max_size=300)), dtype=np.int64
    )
    packed = pack_bits(values, bits)
    assert len(packed) == packed_size(len(values), bits) == -(-len(values) * bits // 8)
    np.testing.assert_array_equal(unpack_bits(packed, bits, len(values)), values)


def test_bitpack_documented_bit_order_and_errors():
    assert pack_bits(np.array([1, 0, 1, 1]), 1) == bytes([0b1101])
    assert pack_bits(np.array([3, 1]), 2) == bytes([0b0111])
    assert pack_bits(np.array([0x1FF]), 9) == bytes([0xFF, 0x01])
    with pytest.raises(ValueError, match="lie in"):
        pack_bits(np.array([4]), 2)
    with pytest.raises(ValueError, match="need"):
        unpack_bits(b"\x00", 3, 3)


def slbf_resnet(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = cnnpress.compress(
        cnnpress.models.create("resnet20", 1, 10),
        "slbf",
        slice_channels=8,
        num_filters=16,
        layers={"layer3.*": {"num_filters": 64}},
    )
    for m in net.modules():  # trained-looking BatchNorm so the comparison is not trivial
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_()
            m.bias.data.normal_()
    return net.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("f") / "m.cnnp"
    net = slbf_resnet()
    save(
        net,
        path,
        dataset=get_spec("fashion-mnist").to_dict(),
        provenance={
            "command": "cnnpress compress --method slbf --model resnet20 --data "
            "fashion-mnist --epochs 15 --out runs/slbf",
            "commit": "0" * 40,
            "test_accuracy": 91.23,
        },
    )
    return net, path


@pytest.mark.parametrize("name", ["resnet20-slbf", "lenet5", "vgg_small"])
def test_round_trip_outputs_are_equal_in_fp32(tmp_path, name):
    net = slbf_resnet() if name == "resnet20-slbf" else cnnpress.models.create(name, 1, 10).eval()
    save(net, tmp_path / "m.cnnp")
    same = load(tmp_path / "m.cnnp")
    assert not same.training
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        a, b = net(x), same(x)
    assert ((a - b).abs().max() / a.abs().max()).item() <= 1e-5


def test_float16_file_is_smaller_and_within_tolerance(tmp_path):
    net = slbf_resnet()
    n32 = save(net, tmp_path / "a.cnnp")
    n16 = save(net, tmp_path / "b.cnnp", float16=True)
    assert n16 < n32
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        a, b = net(x), load(tmp_path / "b.cnnp")(x)
    assert ((a - b).abs().max() / a.abs().max()).item() <= 5e-3  # the stated fp16 tolerance


def test_file_size_equals_the_cost_model(saved):
    net, path = saved
    info = read_info(path)
    assert os.path.getsize(path) == info["file_bytes"]
    checksums = 4 + 2 * len(info["arrays"])  # the file's CRC-32 and a CRC-16 per array
    assert info["checksum_bytes"] == checksums
    assert info["file_bytes"] == info["header_bytes"] + info["payload_bytes"] + checksums
    s = cnnpress.summary(net, (1, 28, 28))
    s.attach_file(info)
    arrays_per_row: dict[str, int] = {}
    for a in info["arrays"]:
        arrays_per_row[a["module"]] = arrays_per_row.get(a["module"], 0) + 1
    for row in s.rows:  # bytes written == stored bits, rounded up per array
        assert 0 <= 8 * row.file_bytes - row.stored_bits < 8 * arrays_per_row[row.name], row.name
    assert sum(r.file_bytes for r in s.rows) == info["payload_bytes"]
    assert s.file["ratio"] == pytest.approx(s.totals["fp32_bits"] / 8 / os.path.getsize(path))
    assert info["header_bytes"] / info["file_bytes"] < 0.05  # the header stays small


def test_file_is_smaller_than_fp32(saved, tmp_path):
    _, path = saved
    fp32 = tmp_path / "fp32.cnnp"
    save(cnnpress.models.create("resnet20", 1, 10), fp32)
    assert os.path.getsize(path) * 30 < os.path.getsize(fp32)


def test_manifest_carries_dataset_and_provenance(saved):
    _, path = saved
    model = load(path)
    assert model.cnnpress_dataset["class_names"][0] == "T-shirt/top"
    assert model.cnnpress_provenance["test_accuracy"] == 91.23


def _rewrite(path, tmp_path, edit=None, version=FORMAT_VERSION, payload_edit=None):
    data = path.read_bytes()
    (length,) = struct.unpack_from("<I", data, 10)
    manifest = json.loads(zlib.decompress(data[14 : 14 + length]))
    payload = data[14 + length : -4]
    if edit:
        edit(manifest)
    if payload_edit:
        payload = payload_edit(payload)
    out = tmp_path / "bad.cnnp"
    out.write_bytes(_assemble(manifest, payload, version))
    return out


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("truncated", "truncated or corrupt"),
        ("tiny", "truncated"),
        ("magic", "wrong magic"),
        ("flipped", "checksum mismatch"),
        ("newer", "newer than this cnnpress reads"),
        ("coded", "no packed integer stream"),
        ("count", "arrays, the model needs"),
        ("payload", "payload holds"),
        ("arch", "not-a-net"),
        ("config", "cannot rebuild"),
        ("missing", "no such file"),
    ],
)
def test_bad_files_raise_one_line_format_error(saved, tmp_path, case, needle):
    _, path = saved
    data = path.read_bytes()
    bad = tmp_path / "bad.cnnp"
    if case == "truncated":
        bad.write_bytes(data[: len(data) // 2])
    elif case == "tiny":
        bad.write_bytes(MAGIC[:5])
    elif case == "magic":
        bad.write_bytes(b"PK\x03\x04" + data[4:])
    elif case == "flipped":
        bad.write_bytes(data[:500] + bytes([data[500] ^ 0x10]) + data[501:])
    elif case == "newer":
        bad = _rewrite(path, tmp_path, version=FORMAT_VERSION + 1)
    elif case == "coded":
        bad = _rewrite(path, tmp_path, edit=lambda m: m["coded"].__setitem__("0", 12))
    elif case == "count":
        bad = _rewrite(path, tmp_path, edit=lambda m: m.__setitem__("count", m["count"] - 1))
    elif case == "payload":
        bad = _rewrite(path, tmp_path, payload_edit=lambda p: p + b"\x00")
    elif case == "arch":
        bad = _rewrite(path, tmp_path, edit=lambda m: m["arch"].__setitem__("name", "not-a-net"))
    elif case == "config":
        bad = _rewrite(
            path, tmp_path, edit=lambda m: m["method"]["config"].__setitem__("slice_channels", 5)
        )
    elif case == "missing":
        bad = tmp_path / "nothing.cnnp"
    with pytest.raises(FormatError) as info:
        load(bad)
    assert needle in str(info.value) and "\n" not in str(info.value)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_mutated_or_truncated_files_raise_format_error_only(saved, tmp_path, data):
    _, path = saved
    raw = bytearray(path.read_bytes())
    kind = data.draw(st.sampled_from(["truncate", "flip", "insert", "zero-run"]))
    if kind == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif kind == "flip":
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] ^= data.draw(st.integers(1, 255))
    elif kind == "insert":
        i = data.draw(st.integers(0, len(raw)))
        raw[i:i] = data.draw(st.binary(min_size=1, max_size=16))
    else:
        i = data.draw(st.integers(0, len(raw) - 2))
        raw[i : i + 8] = bytes(len(raw[i : i + 8]))
    assume(bytes(raw) != path.read_bytes())
    bad = tmp_path / "mutated.cnnp"
    bad.write_bytes(bytes(raw))
    with pytest.raises(FormatError):
        load(bad)


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "m.cnnp"
    save(cnnpress.models.create("lenet5", 1, 10), path)
    before = path.read_bytes()

    def crash(*_args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        save(slbf_resnet(), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.cnnp"]  # no temporary left


@pytest.mark.parametrize("float16", [False, True])
def test_folded_batchnorm_is_smaller_same_function_and_costed(tmp_path, float16):
    net = slbf_resnet()
    save(net, tmp_path / "plain.cnnp", float16=float16)
    save(net, tmp_path / "folded.cnnp", float16=float16, fold_batchnorm=True)
    plain = read_info(tmp_path / "plain.cnnp")["payload_bytes"]
    folded = read_info(tmp_path / "folded.cnnp")["payload_bytes"]
    channels = sum(m.num_features for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert plain - folded == 2 * channels * (2 if float16 else 4)  # 2 of 4 values per channel
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        a, b = net(x), load(tmp_path / "folded.cnnp")(x)
    tolerance = 5e-3 if float16 else 1e-5
    assert ((a - b).abs().max() / a.abs().max()).item() <= tolerance
    s = cnnpress.summary(net, (1, 28, 28), float_bits=16 if float16 else 32, fold_batchnorm=True)
    info = read_info(tmp_path / "folded.cnnp")
    assert 0 <= info["payload_bytes"] * 8 - s.totals["stored_bits"] < 8 * len(info["arrays"])


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 10), data=st.data())
def test_huffman_round_trip(bits, data):
    from cnnpress.format.entropy import huffman_decode, huffman_encode, huffman_size

    alphabet = 1 << bits
    values = np.array(data.draw(st.lists(st.integers(0, alphabet - 1), min_size=1,
                                         max_size=400)), dtype=np.int64)
    coded = huffman_encode(values, alphabet)
    assert len(coded) == huffman_size(values, alphabet)
    np.testing.assert_array_equal(huffman_decode(coded, alphabet, len(values)), values)


def test_entropy_coded_selections_are_smaller_and_decode_exactly(tmp_path):
    net = slbf_resnet()
    gen = torch.Generator().manual_seed(0)
    for m in net.modules():  # uneven bank use, as after clustering trained filters
        if isinstance(m, cnnpress.methods.slbf.SLBFConv2d):
            probs = 1.0 / torch.arange(1, m.num_filters + 1, dtype=torch.float) ** 1.5
            idx = torch.multinomial(probs, m.out_channels * m.num_slices, True, generator=gen)
            m.load_selection(idx.view(m.out_channels, m.num_slices), m.bank())
    plain = save(net, tmp_path / "plain.cnnp")
    coded = save(net, tmp_path / "coded.cnnp", entropy=True)
    assert coded < plain
    info = read_info(tmp_path / "coded.cnnp")
    huff = [a for a in info["arrays"] if a["encoding"].startswith("h")]
    assert huff and all(a["bytes"] < a["packed_bytes"] for a in huff)
    assert plain - coded == sum(a["packed_bytes"] - a["bytes"] for a in huff) + (
        read_info(tmp_path / "plain.cnnp")["header_bytes"] - info["header_bytes"]
    )
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(load(tmp_path / "coded.cnnp")(x), net(x), rtol=0, atol=0)


def test_entropy_report_matches_the_file_and_respects_the_shannon_bound(tmp_path):
    from cnnpress.format.layout import entropy_report, layout

    net = slbf_resnet()
    gen = torch.Generator().manual_seed(1)
    for m in net.modules():
        if isinstance(m, cnnpress.methods.slbf.SLBFConv2d):
            probs = 1.0 / torch.arange(1, m.num_filters + 1, dtype=torch.float) ** 2
            idx = torch.multinomial(probs, m.out_channels * m.num_slices, True, generator=gen)
            m.load_selection(idx.view(m.out_channels, m.num_slices), m.bank())
    save(net, tmp_path / "coded.cnnp", entropy=True)
    stored = [a["bytes"] for a in read_info(tmp_path / "coded.cnnp")["arrays"]
              if a["encoding"][0] in "uh" and int(a["encoding"][1:]) >= 2]
    rows = entropy_report(layout(net, with_values=True))
    assert [r["stored_bytes"] for r in rows] == stored
    for r in rows:
        assert 0 < r["entropy_bits"] < r["bits"]  # uneven use: below the packed width
        assert 8 * r["huffman_bytes"] >= r["count"] * r["entropy_bits"]  # no code beats H
        assert r["stored_bytes"] == min(r["packed_bytes"], r["huffman_bytes"])


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(0, 6), min_size=0, max_size=3).map(tuple),
    scale=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**16),
)
def test_int8_floats_round_trip_within_half_a_step(shape, scale, seed):
    from cnnpress.floats import q8_decode, q8_encode, q8_rows, stored_float_bits

    x = (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)
    data = q8_encode(x)
    assert 8 * len(data) == stored_float_bits(shape, 8)
    back = q8_decode(data, shape)
    assert back.shape == x.shape and back.dtype == np.float32
    if x.size:
        rows = x.reshape(q8_rows(shape), -1)
        step = np.abs(rows).max(axis=1, keepdims=True) / 127.0
        err = np.abs(back.reshape(rows.shape) - rows)
        assert np.all(err <= 0.501 * step + 1e-30)  # half a step


def test_a_format_1_file_still_loads():
    """The shipped model was written in format 1 (every array's encoding and shape listed)."""
    from cnnpress.pretrained import path as pretrained_path

    info = read_info(pretrained_path("resnet20-fmnist"))
    assert "arrays" in info["manifest"] and "count" not in info["manifest"]
    model = load("pretrained:resnet20-fmnist")
    assert model(torch.zeros(1, 1, 28, 28)).shape == (1, 10)
