"""The fused SLBF CPU kernel: equal to the dense conv of the stacked filters on awkward shapes,
with 1 and 2 threads; dispatch from SLBFConv2d; path choice; and the fallback without it."""

from __future__ import annotations

import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cnnpress
from cnnpress.errors import ConfigError
from cnnpress.kernel import fused as kernel
from cnnpress.methods.slbf import PATHS, SLBFConv2d, set_path
from cnnpress.runtime import to_dense


def compiler() -> str | None:
    """The C++ compiler torch's extension builder would use, if this machine has one."""
    return shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


@pytest.fixture(scope="module")
def ext():
    """The compiled kernel (built once and cached). Where a C++ compiler exists (as in CI) a
    failed build fails these tests; only a machine without one skips them, and says why."""
    module = kernel.load()
    if module is None and compiler():
        pytest.fail(f"{compiler()} is here but the SLBF kernel did not build: "
                    f"{kernel.status()['reason']}")
    if module is None:
        pytest.skip(f"no C++ compiler: SLBF kernel not available ({kernel.status()['reason']})")
    return module


@pytest.fixture
def threads():
    """Restore torch's thread count after the test."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def make_layer(c, n, k, d, m, stride, padding, scale, bias, dilation=1, seed=0) -> SLBFConv2d:
    torch.manual_seed(seed)
    layer = SLBFConv2d(c, n, k, stride, padding, dilation, bias, d, m, scale).eval()
    with torch.no_grad():
        if bias:
            layer.bias.normal_()
        if scale:
            layer.scale.uniform_(0.5, 2.0)
    return layer


def assert_matches(y: torch.Tensor, ref: torch.Tensor) -> None:
    assert y.shape == ref.shape
    atol = 1e-4 * max(1.0, ref.abs().max().item())
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=atol)


@settings(max_examples=40, deadline=None)
@given(
    d=st.sampled_from([1, 3, 5, 6, 8, 12]),
    s=st.integers(1, 4),
    n=st.integers(1, 21),
    m=st.integers(2, 19),
    k=st.sampled_from([1, 3, 5]),
    stride=st.sampled_from([1, 2]),
    padding=st.integers(0, 2),
    h=st.integers(5, 13),
    w=st.integers(5, 13),
    batch=st.sampled_from([1, 2, 3]),
    scale=st.booleans(),
    bias=st.booleans(),
    mode=st.sampled_from(["auto", "direct", "packed"]),
    seed=st.integers(0, 2**16),
)
def test_kernel_equals_dense_conv(
    ext, d, s, n, m, k, stride, padding, h, w, batch, scale, bias, mode, seed
):
    layer = make_layer(d * s, n, k, d, m, stride, padding, scale, bias, seed=seed)
    x = torch.randn(batch, d * s, h, w)
    with torch.no_grad():
        ref = layer.forward_dense(x)
    assert_matches(kernel.conv2d(layer, x, mode), ref)


@pytest.mark.parametrize(
    ("c", "n", "m", "k", "stride", "padding", "hw", "batch", "cut"),
    [
        (128, 16, 64, 3, 1, 1, 4, 1, "splits"),  # one tiny image: slices split over threads
        (32, 24, 16, 3, 2, 1, 33, 1, "bands"),  # one image cut into bands of rows
        (40, 8, 6, 5, 1, 2, 7, 3, None),
        (8, 16, 5, 1, 2, 0, 11, 5, None),
    ],
)
def test_one_and_two_threads_agree_with_dense(
    ext, threads, c, n, m, k, stride, padding, hw, batch, cut
):
    layer = make_layer(c, n, k, 8, m, stride, padding, scale=True, bias=True)
    x = torch.randn(batch, c, hw, hw)
    with torch.no_grad():
        ref = layer.forward_dense(x)
    for count in (1, 2):
        torch.set_num_threads(count)
        if cut is not None:
            assert (kernel.plan(layer, tuple(x.shape))[cut] > 1) == (count == 2)
        for mode in ("direct", "packed"):
            assert_matches(kernel.conv2d(layer, x, mode), ref)


def test_dilation_and_channels_last_input(ext):
    layer = make_layer(10, 7, 3, 5, 4, 1, 2, scale=False, bias=True, dilation=2)
    x = torch.randn(2, 10, 9, 8).to(memory_format=torch.channels_last)
    with torch.no_grad():
        assert_matches(kernel.conv2d(layer, x), layer.forward_dense(x))


def test_new_weights_are_seen(ext):
    layer = make_layer(8, 6, 3, 4, 3, 1, 1, scale=False, bias=False)
    x = torch.randn(1, 8, 6, 6)
    first = kernel.conv2d(layer, x)
    with torch.no_grad():
        layer.binary_bank.neg_()
        layer.selection.random_(0, layer.num_filters)
        ref = layer.forward_dense(x)
    assert not torch.allclose(first, ref)
    assert_matches(kernel.conv2d(layer, x), ref)


@pytest.mark.parametrize("path", ["kernel", "auto", "stm", "dense"])
def test_eval_forward_uses_the_path_and_matches(ext, path):
    layer = make_layer(12, 10, 3, 4, 5, 2, 1, scale=True, bias=True)
    layer.path = path
    x = torch.randn(2, 12, 9, 9)
    with torch.no_grad():
        ref = layer.forward_dense(x)
        assert_matches(layer(x), ref)
    if path == "auto":
        row = kernel.choices()[-1]
        assert row["path"] in kernel.CANDIDATES
        assert set(row["seconds"]) == set(kernel.CANDIDATES)


def test_auto_choice_is_measured_once_per_shape(ext):
    kernel.clear_choices()
    layer = make_layer(8, 8, 3, 8, 2, 1, 1, scale=False, bias=False)
    with torch.no_grad():
        layer(torch.randn(3, 8, 6, 6))
        layer(torch.randn(4, 8, 6, 6))  # same batch bucket (3 and 4 -> 4)
        assert len(kernel.choices()) == 1
        layer(torch.randn(1, 8, 6, 6))
    assert len(kernel.choices()) == 2


def test_gradients_still_flow_in_eval_mode(ext):
    layer = make_layer(8, 4, 3, 4, 3, 1, 1, scale=True, bias=False)
    layer.path = "kernel"
    x = torch.randn(1, 8, 5, 5, requires_grad=True)
    layer(x).sum().backward()  # grad enabled: the dense path runs
    assert x.grad is not None and layer.latent.grad is not None


def test_whole_model_through_the_kernel(ext):
    torch.manual_seed(0)
    net = cnnpress.models.create("resnet20", 1, 10, width=8)
    small = cnnpress.compress(net, "slbf", slice_channels=4, num_filters=4).eval()
    x = torch.randn(2, 1, 12, 12)
    assert set_path(small, "kernel") == 18
    with torch.no_grad():
        assert_matches(small(x), to_dense(small)(x))


def test_set_path_checks_the_name():
    layer = SLBFConv2d(4, 4, 3, slice_channels=2, num_filters=2)
    model = torch.nn.Sequential(layer, torch.nn.ReLU())
    assert set_path(model, "stm") == 1 and layer.path == "stm"
    assert "kernel" in PATHS
    with pytest.raises(ConfigError, match="path must be one of"):
        set_path(model, "fast")


def test_without_the_kernel_the_pytorch_paths_run(monkeypatch):
    monkeypatch.setattr(kernel, "_RT", kernel._Runtime())
    monkeypatch.setenv(kernel.DISABLE_ENV, "0")
    info = kernel.status()
    assert info["available"] is False and info["path"] == "pytorch"
    assert kernel.DISABLE_ENV in info["reason"]
    layer = make_layer(6, 5, 3, 3, 4, 1, 1, scale=True, bias=True)
    x = torch.randn(1, 6, 7, 7)
    with torch.no_grad():
        ref = layer.forward_dense(x)
        for path in ("kernel", "auto"):
            layer.path = path
            assert_matches(layer(x), ref)
    assert all(row["path"] != "kernel" for row in kernel.choices())
    with pytest.raises(RuntimeError, match="not available"):
        kernel.conv2d(layer, x)


def test_a_failed_build_is_reported(monkeypatch, tmp_path, capfd):
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(kernel, "_RT", kernel._Runtime())
    monkeypatch.setattr(kernel, "SOURCE", broken)
    monkeypatch.setenv(kernel.BUILD_DIR_ENV, str(tmp_path / "build"))
    monkeypatch.delenv(kernel.DISABLE_ENV, raising=False)
    with pytest.warns(RuntimeWarning, match="could not build"):
        assert kernel.load() is None
    info = kernel.status()
    assert info["path"] == "pytorch" and "could not build" in info["reason"]
    # a build (no cached one in the new folder) is announced in one line that says how to skip
    err = capfd.readouterr().err
    assert err.count(kernel.BUILD_NOTICE) == 1 and f"{kernel.DISABLE_ENV}=0" in err


def test_a_cached_build_loads_without_a_word(ext, capfd):
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(kernel, "_RT", kernel._Runtime())
    try:
        capfd.readouterr()
        assert kernel.load() is not None
        assert kernel.BUILD_NOTICE not in capfd.readouterr().err
    finally:
        monkeypatch.undo()
