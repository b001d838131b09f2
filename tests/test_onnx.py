"""Deployment: dense copies equal the SLBF model; ONNX files (dense and split-transform-merge)
run in onnxruntime with the PyTorch outputs at any batch size; the graphs have the promised
nodes; bad settings are one-line CnnpressErrors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import cnnpress
from cnnpress.errors import CnnpressError
from cnnpress.format import read_info
from cnnpress.methods.slbf import SLBFConv2d, SLBFLayer, SLBFLinear
from cnnpress.runtime import export_onnx, to_dense
from cnnpress.runtime.dense import dense_layer, is_compressed

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
numpy_helper = onnx.numpy_helper

RESNET_SHAPE = (1, 16, 16)
LENET_SHAPE = (1, 28, 28)


def calibrate_batchnorm(model: nn.Module, shape: tuple[int, ...], seed: int) -> nn.Module:
    """Give every BatchNorm non-trivial running stats (measured on random data) and affine."""
    torch.manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(16, *shape))
        for bn in bns:
            bn.running_mean.add_(0.1 * torch.randn_like(bn.running_mean) * bn.running_var.sqrt())
            bn.running_var.mul_(torch.empty_like(bn.running_var).uniform_(0.7, 1.3))
            bn.weight.copy_(1 + 0.2 * torch.randn_like(bn.weight))
            bn.bias.copy_(0.1 * torch.randn_like(bn.bias))
    return model.eval()


def slbf_resnet(width: int = 16, shape: tuple[int, ...] = RESNET_SHAPE, seed: int = 0):
    torch.manual_seed(seed)
    base = cnnpress.models.create("resnet20", 1, 10, width=width)
    model = cnnpress.compress(base, "slbf", slice_channels=8, num_filters=16, include_linear=True)
    model = calibrate_batchnorm(model, shape, seed)  # training mode: projects the latents
    with torch.no_grad():  # then random selections and biases
        for m in model.modules():
            if isinstance(m, SLBFLayer):
                m.selection.random_(0, m.num_filters)
                if m.bias is not None:
                    m.bias.normal_(std=0.1)
    return model


def lenet() -> nn.Module:
    torch.manual_seed(3)
    return cnnpress.models.create("lenet5", 1, 10).eval()


def slbf_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, SLBFLayer)]


# -- to_dense -------------------------------------------------------------------------------


def test_to_dense_matches_slbf_model_and_has_no_slbf_layers():
    model = slbf_resnet(width=16, shape=(1, 32, 32))
    assert sum(isinstance(m, SLBFConv2d) for m in model.modules()) == 18
    assert sum(isinstance(m, SLBFLinear) for m in model.modules()) == 1
    dense = to_dense(model)
    assert not slbf_layers(dense)
    assert not dense.training
    assert sum(type(m) is nn.Conv2d for m in dense.modules()) == 19
    assert type(dense.fc) is nn.Linear
    assert dense.layer2[0].conv1.stride == (2, 2) and dense.layer2[0].conv1.padding == (1, 1)
    assert dense.cnnpress_arch == model.cnnpress_arch
    assert dense.cnnpress_method == model.cnnpress_method
    assert len(slbf_layers(model)) == 19  # the original is untouched
    torch.manual_seed(11)
    x = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        expected, got = model(x), dense(x)
    assert expected.abs().max() > 0.1  # not a trivially small output
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_dense_layer_follows_the_duck_typed_rule():
    class FutureConv(nn.Module):
        """A layer of some later method: a dense_weight(), conv attributes, a bias."""

        def __init__(self) -> None:
            super().__init__()
            self.stride, self.padding, self.dilation = (2, 2), (1, 1), (1, 1)
            self.w = nn.Parameter(torch.randn(5, 3, 3, 3))
            self.bias = nn.Parameter(torch.randn(5))

        def dense_weight(self) -> torch.Tensor:
            return self.w * 2

    class FutureLinear(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 6))
            self.bias = None

        def stacked_weight(self) -> torch.Tensor:
            return -self.w

    conv, linear = FutureConv(), FutureLinear()
    assert is_compressed(conv) and is_compressed(linear)
    assert not is_compressed(nn.Conv2d(3, 5, 3)) and not is_compressed(nn.ReLU())
    dense_conv, dense_linear = dense_layer(conv), dense_layer(linear)
    assert type(dense_conv) is nn.Conv2d and dense_conv.stride == (2, 2)
    assert type(dense_linear) is nn.Linear and dense_linear.bias is None
    x, v = torch.randn(2, 3, 9, 9), torch.randn(2, 6)
    with torch.no_grad():
        want = nn.functional.conv2d(x, conv.w * 2, conv.bias, 2, 1)
        torch.testing.assert_close(dense_conv(x), want)
        torch.testing.assert_close(dense_linear(v), v @ -linear.w.T)
    model = to_dense(nn.Sequential(conv, nn.ReLU(), nn.Sequential(linear)))
    assert type(model[0]) is nn.Conv2d and type(model[2][0]) is nn.Linear


# -- ONNX export ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models() -> dict[str, tuple[nn.Module, tuple[int, int, int]]]:
    return {"slbf": (slbf_resnet(width=8), RESNET_SHAPE), "lenet": (lenet(), LENET_SHAPE)}


@pytest.fixture(scope="module")
def exported(models, tmp_path_factory) -> dict[tuple[str, str], Path]:
    folder = tmp_path_factory.mktemp("onnx")
    return {
        (name, mode): export_onnx(model, folder / f"{name}-{mode}.onnx", shape, mode=mode)
        for name, (model, shape) in models.items()
        for mode in ("dense", "stm")
    }


def session(path: Path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("mode", ["dense", "stm"])
@pytest.mark.parametrize("name", ["slbf", "lenet"])
def test_onnxruntime_matches_pytorch_at_any_batch(models, exported, name, mode):
    model, shape = models[name]
    sess = session(exported[name, mode])
    assert sess.get_inputs()[0].name == "input"
    torch.manual_seed(5)
    for batch in (1, 5):
        x = torch.randn(batch, *shape)
        with torch.no_grad():
            expected = model(x).numpy()
        (got,) = sess.run(None, {"input": x.numpy()})
        assert got.shape == (batch, 10)
        assert abs(got - expected).max() <= 1e-4
        assert abs(expected).max() > 0.05  # the comparison is not between near-zeros


def nodes(path: Path, op: str) -> list:
    return [n for n in onnx.load(str(path)).graph.node if n.op_type == op]


def attr(node, name: str, default=None):
    found = [a for a in node.attribute if a.name == name]
    return onnx.helper.get_attribute_value(found[0]) if found else default


def test_stm_graph_keeps_the_bank_and_selections_packed(models, exported):
    model, _ = models["slbf"]
    convs = [m for m in model.modules() if isinstance(m, SLBFConv2d)]
    path = exported["slbf", "stm"]
    init = [numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer]
    packed = {a.tobytes() for a in init if a.dtype == np.uint8}
    for conv in convs:  # every bank once, 8 signs a byte, and its selections at 4 bits
        bits = np.packbits((conv.bank().reshape(-1) > 0).numpy())
        assert bits.tobytes() in packed
        sel = conv.indices().reshape(-1).numpy().astype(np.uint8)
        assert ((sel[0::2] << 4) | sel[1::2]).tobytes() in packed
        m, d, k = conv.num_filters, conv.slice_channels, 3
        expanded = {m * d * k * k, conv.num_slices * m * d * k * k}
        assert not [a for a in init if a.dtype == np.float32 and a.size in expanded]
        assert not [a for a in init if a.dtype == np.int64 and a.size == sel.size]
    # one plain Conv over the slices, one Gather (axis 1) and one ReduceSum per SLBF conv
    assert len(nodes(path, "Conv")) == len(convs) + 1
    gathers = [n for n in nodes(path, "Gather") if attr(n, "axis", 0) == 1]
    assert len(gathers) == len(nodes(path, "ReduceSum")) == len(convs) == 18
    assert len(nodes(path, "Gemm")) == 1  # the SLBF classifier stays dense


@pytest.mark.parametrize("float_bits", [16, 8])
def test_stm_file_keeps_the_widths_of_the_cnnp(float_bits, tmp_path):
    torch.manual_seed(0)
    base = cnnpress.models.create("resnet20", 1, 10, width=16)
    model = calibrate_batchnorm(cnnpress.compress(base, "slbf"), RESNET_SHAPE, 0)
    cnnp = tmp_path / "m.cnnp"
    cnnpress.save(model, cnnp, float_bits=float_bits, fold_batchnorm=True)
    loaded = cnnpress.load(cnnp).eval()
    path = export_onnx(loaded, tmp_path / "m.onnx", RESNET_SHAPE, mode="stm")
    init = [numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer]
    narrow = np.float16 if float_bits == 16 else np.int8
    floats = sum(a.size for a in init if a.dtype == narrow)
    wide = [a for a in init if a.dtype == np.float32 and a.size > 16]
    stored = sum(
        a["shape"] and int(np.prod(a["shape"]))
        for a in read_info(cnnp)["arrays"]
        if a["encoding"] in ("f2", "q8")
    )
    assert floats == stored and not wide  # every unpacked float at the file's width
    # the values take about what the .cnnp payload takes (indices at 4 bits, not Huffman
    # coded; a scale per int8 array); the graph's nodes add a few hundred bytes a layer
    values = sum(a.nbytes for a in init)
    assert values <= 1.25 * read_info(cnnp)["payload_bytes"]
    assert path.stat().st_size <= values + 20_000
    x = torch.randn(3, *RESNET_SHAPE)
    got = ort.InferenceSession(str(path)).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), loaded(x), rtol=1e-4, atol=1e-4)


def test_dense_graph_has_plain_convs_only(exported):
    path = exported["slbf", "dense"]
    assert not nodes(path, "Gather") and not nodes(path, "ReduceSum")
    convs = nodes(path, "Conv")
    assert len(convs) == 19 and all(attr(n, "group", 1) == 1 for n in convs)


def test_batch_axis_is_dynamic_and_metadata_is_recorded(models, exported):
    model, _ = models["slbf"]
    proto = onnx.load(str(exported["slbf", "stm"]))
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and not dims[0].HasField("dim_value")
    assert [d.dim_value for d in dims[1:]] == list(RESNET_SHAPE)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["cnnpress_arch"]) == model.cnnpress_arch
    method = json.loads(meta["cnnpress_method"])
    assert method["name"] == "slbf" and method["config"]["slice_channels"] == 8
    assert meta["cnnpress_export_mode"] == "stm"
    lenet_meta = {p.key for p in onnx.load(str(exported["lenet", "dense"])).metadata_props}
    assert "cnnpress_arch" in lenet_meta and "cnnpress_method" not in lenet_meta


def test_export_is_atomic_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "sub" / "m.onnx"
    target.parent.mkdir()
    target.write_bytes(b"old")
    assert export_onnx(lenet(), str(target), LENET_SHAPE) == target
    assert onnx.load(str(target)).graph.node
    assert [p.name for p in target.parent.iterdir()] == ["m.onnx"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "binary"}, "unknown ONNX export mode"),
        ({"input_shape": (28, 28)}, "input_shape must be"),
        ({"input_shape": (1, 0, 28)}, "input_shape must be"),
        ({"input_shape": (3, 28, 28)}, "does not fit the model"),
        ({"opset": 9}, "opset must be"),
    ],
)
def test_bad_settings_raise_one_line_cnnpress_error(tmp_path, kwargs, message):
    target = tmp_path / "bad.onnx"
    settings = {"input_shape": LENET_SHAPE, **kwargs}
    with pytest.raises(CnnpressError, match=message) as info:
        export_onnx(lenet(), target, **settings)
    assert "\n" not in str(info.value)
    assert not target.exists() and not list(tmp_path.iterdir())
