"""The method contract, run over every registered method.

The contract is stated in the module docstring of ``cnnpress.methods.base``
(src/cnnpress/methods/base.py) and in the "Methods" section of docs/reference.md. A new method
inherits all of it: forward shape, gradients for every trainable parameter, no NaN, config round
trip, pack -> unpack gives the same outputs, stored bits equal the bytes written (to byte
rounding per array), and the file is smaller than fp32.
"""

from __future__ import annotations

import copy
import dataclasses
import os

import pytest
import torch

import cnnpress
from cnnpress.format import read_info
from cnnpress.methods import method_for
from cnnpress.methods.base import config_from_dict

METHODS = cnnpress.methods.names()


def base_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return cnnpress.models.create("resnet20", 1, 10, width=16)


@pytest.fixture(scope="module", params=METHODS)
def compressed(request):
    net = cnnpress.compress(base_model(), request.param)
    return request.param, net


def randomise_batchnorm(net: torch.nn.Module) -> None:
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)


def test_forward_backward_no_nan(compressed):
    name, net = compressed
    net.train()
    out = net(torch.randn(4, 1, 28, 28))
    assert out.shape == (4, 10) and torch.isfinite(out).all(), name
    out.logsumexp(1).sum().backward()
    missing = [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"{name}: no gradient for {missing[:3]}"
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
    net.zero_grad()


def test_config_round_trip(compressed):
    name, net = compressed
    cls = cnnpress.methods.get(name)
    recorded = net.cnnpress_method["config"]
    config = config_from_dict(cls.Config, recorded)
    assert dataclasses.asdict(config) == recorded
    again = cnnpress.compress(base_model(), name, **recorded)
    shapes = {k: v.shape for k, v in net.state_dict().items()}
    assert {k: v.shape for k, v in again.state_dict().items()} == shapes


def assert_bits_are_bytes(summary, info, name: str) -> None:
    """Each summary row's stored bits are its bytes in the file, to a byte per array."""
    per_row: dict[str, int] = {}
    for arr in info["arrays"]:
        per_row[arr["module"]] = per_row.get(arr["module"], 0) + 1
    for row in summary.rows:
        slack = 8 * per_row.get(row.name, 0)
        assert 0 <= 8 * row.file_bytes - row.stored_bits < max(slack, 1), (name, row.name)


def test_pack_unpack_same_outputs_and_honest_size(compressed, tmp_path):
    name, net = compressed
    randomise_batchnorm(net)
    net.eval()
    path = tmp_path / f"{name}.cnnp"
    written = cnnpress.save(net, path)
    same = cnnpress.load(path)
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        a, b = net(x), same(x)
    assert ((a - b).abs().max() / a.abs().max().clamp_min(1e-12)).item() <= 1e-5, name
    info = read_info(path)
    assert written == os.path.getsize(path) == info["file_bytes"]
    summary = cnnpress.summary(net, (1, 28, 28))
    summary.attach_file(info)
    assert_bits_are_bytes(summary, info, name)


def test_file_is_smaller_than_fp32(compressed, tmp_path):
    name, net = compressed
    cnnpress.save(net, tmp_path / "c.cnnp")
    cnnpress.save(base_model(), tmp_path / "fp32.cnnp")
    assert os.path.getsize(tmp_path / "c.cnnp") < os.path.getsize(tmp_path / "fp32.cnnp"), name


@pytest.mark.parametrize("float_bits", [16, 8])
def test_honest_size_at_every_float_width(compressed, tmp_path, float_bits):
    """float16 and int8 (a float32 scale per row) files: the summary's bits are the bytes
    written, and the loaded model computes nearly the same outputs."""
    name, net = compressed
    randomise_batchnorm(net)
    net.eval()
    path = tmp_path / f"{name}-{float_bits}.cnnp"
    cnnpress.save(net, path, float_bits=float_bits, fold_batchnorm=True)
    info = read_info(path)
    assert info["manifest"]["float_bits"] == float_bits
    summary = cnnpress.summary(net, (1, 28, 28), float_bits=float_bits, fold_batchnorm=True)
    summary.attach_file(info)
    assert_bits_are_bytes(summary, info, name)
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        a, b = net(x), cnnpress.load(path)(x)
    err = ((a - b).norm() / a.norm()).item()
    # XNOR-Net binarises x - beta: a rounded threshold flips some input signs outright
    assert err < (0.1 if float_bits == 8 or name == "xnor" else 0.01), (name, err)


NOTHING_TO_COMPRESS = {
    "only Linear layers": torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(12, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)
    ),
    "only a first conv": torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8, 3)
    ),
}


@pytest.mark.parametrize("model", list(NOTHING_TO_COMPRESS))
@pytest.mark.parametrize("name", METHODS)
def test_nothing_to_compress_is_one_error_naming_the_candidates(name, model):
    """A model where the default rule selects no layer is refused, not returned unchanged."""
    net = NOTHING_TO_COMPRESS[model]
    with pytest.raises(cnnpress.CnnpressError, match="nothing to compress") as info:
        cnnpress.compress(net, name)
    message = str(info.value)
    assert "\n" not in message and name in message
    has_conv = any(isinstance(m, torch.nn.Conv2d) for m in net.modules())
    if name == "filter_prune" and not has_conv:
        assert "it has no Conv2d layer" in message, message
        return
    if has_conv:
        assert "0 (Conv2d: the first conv, include_first)" in message, message
        assert "include_first: true" in message
    if name != "filter_prune":  # filter pruning removes conv channels only
        assert "3 (Linear: include_linear)" in message, message
        assert "include_linear: true" in message
    assert "layers: {NAME: {include: true}}" in message


def small_model() -> torch.nn.Module:
    """A width-8 ResNet-20 whose BatchNorm statistics fit its outputs (so that no activation
    overflows float16 in eval mode)."""
    torch.manual_seed(0)
    return cnnpress.models.create("resnet20", 1, 10, width=8)


def calibrate(net: torch.nn.Module, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Running BatchNorm statistics from one batch (as a trained model has), then eval mode."""
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    net.train()
    with torch.no_grad():
        net(torch.randn(16, 1, 28, 28, dtype=dtype))
    return net.eval()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", METHODS)
def test_half_precision_on_the_cpu(name, dtype):
    """A compressed model moved to float16/bfloat16 computes in that dtype, close to float32,
    trains a step in it, and packs its layers for the file (as float32 arrays)."""
    net = calibrate(cnnpress.compress(small_model(), name))
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        ref = net(x)
        half = copy.deepcopy(net).to(dtype)
        y = half(x.to(dtype))
    assert y.dtype == dtype and torch.isfinite(y).all(), name
    err = ((y.float() - ref).norm() / ref.norm()).item()
    # XNOR-Net binarises every layer's input: 1e-3 of noise on the input alone moves this
    # model's float32 output by 13%, and float16 rounds at 5e-4
    assert err < (0.3 if name == "xnor" else 0.1), (name, err)
    half.train()
    half(x.to(dtype)).float().logsumexp(1).sum().backward()
    grads = [p.grad for p in half.parameters() if p.grad is not None]
    assert grads and all(g.dtype == dtype and torch.isfinite(g).all() for g in grads), name
    for module in half.modules():
        method = method_for(module)
        if method is not None:
            for encoding, values in method.pack(module).values():
                assert values.dtype != "float16" or encoding == "f2", (name, encoding)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", METHODS)
def test_compressing_a_half_precision_model_keeps_its_dtype(name, dtype):
    """Every compressed layer of a float16/bfloat16 model is in that dtype, so it runs."""
    net = calibrate(cnnpress.compress(small_model().to(dtype), name), dtype)
    floats = {p.dtype for p in net.parameters()} | {
        b.dtype for b in net.buffers() if b.is_floating_point()
    }
    assert floats == {dtype}, (name, floats)
    with torch.no_grad():
        y = net(torch.randn(2, 1, 28, 28, dtype=dtype))
    assert y.dtype == dtype and torch.isfinite(y).all(), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", METHODS)
def test_compress_save_load_and_forward_on_cuda(name, tmp_path):
    """Converted, planned and packed from CUDA tensors; the file loads and runs on CUDA."""
    net = cnnpress.compress(calibrate(small_model()).cuda(), name).eval()
    x = torch.randn(3, 1, 28, 28, device="cuda")
    with torch.no_grad():
        y = net(x)
    path = tmp_path / f"{name}.cnnp"
    cnnpress.save(net, path)
    loaded = cnnpress.load(path).cuda()
    with torch.no_grad():
        again = loaded(x)
    assert again.device.type == "cuda"
    assert ((again - y).norm() / y.norm()).item() < 1e-4, name


@pytest.mark.parametrize("name", METHODS)
def test_no_compressed_layer_stores_more_than_its_fp32_layer(name):
    """At default settings on a small model (a width-8 ResNet-20's 8x8-channel convs) every
    compressed layer is smaller than the float32 layer it replaces."""
    net = cnnpress.compress(small_model(), name)
    rows = [r for r in cnnpress.summary(net, (1, 28, 28)).rows if r.compressed]
    assert rows or name == "filter_prune"  # filter pruning leaves plain, smaller layers
    too_big = [(r.name, r.stored_bits, r.fp32_bits) for r in rows if r.stored_bits >= r.fp32_bits]
    assert not too_big, (name, too_big)
