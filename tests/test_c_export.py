"""The C99 program of ``cnnpress export --c``: it builds with -Wall -Wextra -Werror, its logits
equal the loaded PyTorch model's within 1e-4 relative with the same classes (random inputs,
real Fashion-MNIST test images) for the registry's models, every method the runtime runs and
users' CNNs; ``size`` of model.o agrees with the flash and RAM figures; what has no kernel is
one line.

Where ``cc`` is installed (here and in CI) a failed build fails the test; without it the
tests that compile are skipped.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cnnpress
from cnnpress.cli.main import main
from cnnpress.data import get_spec, load_dataset, normalize
from cnnpress.errors import CnnpressError
from cnnpress.methods.slbf import SLBFLayer
from cnnpress.runtime import c_lower, c_memory, export_c
from cnnpress.runtime.c_export import RUNTIME_FILES
from helpers import load_benchmark

CC = shutil.which("cc")
SIZE = shutil.which("size")
FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
SHAPE = (1, 28, 28)
needs_cc = pytest.mark.skipif(CC is None, reason="no C compiler (cc) on this machine")


def calibrated(model: nn.Module, seed: int = 0) -> nn.Module:
    """``model`` with BatchNorm statistics and affine values that are not the defaults (so a
    wrong epilogue shows), in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            c = m.num_features
            m.running_mean.copy_(0.2 * torch.randn(c, generator=gen))
            m.running_var.copy_(torch.empty(c).uniform_(0.5, 2.0, generator=gen))
            if m.weight is not None:
                m.weight.data.copy_(1 + 0.3 * torch.randn(c, generator=gen))
                m.bias.data.copy_(0.1 * torch.randn(c, generator=gen))
    return model.eval()


def saved(model: nn.Module, tmp_path: Path, **storage) -> tuple[nn.Module, int]:
    """The model as its ``.cnnp`` file gives it back, and the file's bytes."""
    path = tmp_path / "m.cnnp"
    size = cnnpress.save(model, path, **storage)
    return cnnpress.load(path), size


def build(
    model: nn.Module, out: Path, shape: tuple[int, ...] = SHAPE, flags: tuple[str, ...] = ()
) -> tuple[Path, dict]:
    """Export, then compile with the documented command (and ``flags``); a failed build fails
    the test."""
    info = export_c(model, out, shape)
    sources = sorted(str(p) for p in out.glob("*.c"))
    cmd = [
        CC,
        "-std=c99",
        "-O2",
        "-Wall",
        "-Wextra",
        "-Werror",
        *flags,
        *sources,
        "-lm",
        "-o",
        str(out / "prog"),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"the C program does not build:\n{done.stderr[:4000]}"
    return out / "prog", info


def run(prog: Path, x: torch.Tensor) -> np.ndarray:
    done = subprocess.run(
        [str(prog)],
        input=x.numpy().astype("<f4").tobytes(),
        capture_output=True,
        check=True,
        timeout=120,
    )
    return np.frombuffer(done.stdout, dtype="<f4").reshape(len(x), -1)


def check(model: nn.Module, prog: Path, x: torch.Tensor) -> float:
    """Logits within 1e-4 relative of PyTorch's and the same classes; returns the error."""
    with torch.no_grad():
        ref = model(x).numpy()
    got = run(prog, x)
    assert got.shape == ref.shape
    err = float(np.abs(got - ref).max() / np.abs(ref).max())
    assert err <= 1e-4, err
    assert (got.argmax(1) == ref.argmax(1)).all()
    return err


WIDTH = {"resnet20": {"width": 8}, "mobilenetv2": {"width": 0.25}, "shufflenetv2": {"width": 0.5}}
SLBF = {"slice_channels": 4, "num_filters": 8}
CASES = [
    ("resnet20", None, {}),
    ("resnet20", "slbf", {**SLBF, "include_linear": True}),
    (
        "resnet20",
        "slbf",
        {"slice_channels": 8, "num_filters": 16, "float_bits": 8, "fold_batchnorm": True},
    ),
    ("resnet20", "bwn", {"float_bits": 16}),
    ("resnet20", "binaryconnect", {"include_linear": True}),
    ("resnet20", "magnitude_prune", {"sparsity": 0.8}),
    ("resnet20", "magnitude_prune", {"sparsity": 0.97, "float_bits": 8, "include_linear": True}),
    ("resnet20", "kmeans", {"bits": 3}),
    ("resnet20", "filter_prune", {"ratio": 0.5}),  # plain convs with fewer channels
    ("resnet20", "kmeans", {"bits": 4, "sparsity": 0.6, "float_bits": 16}),
    ("resnet20", "kmeans", {"bits": 4, "sparsity": 0.6, "entropy": True}),  # Huffman-coded
    (
        "resnet20",
        "slbf",
        {"slice_channels": 2, "num_filters": 16, "entropy": True, "skew": True},
    ),  # selections that Huffman coding shortens
    ("resnet20", "magnitude_prune", {"sparsity": 0.9, "entropy": True}),
    ("lenet5", None, {"float_bits": 8}),
    ("lenet5", "slbf", {"slice_channels": 3, "num_filters": 4}),
    ("lenet5", "bwn", {"include_linear": True}),
    ("lenet5", "kmeans", {"bits": 2, "include_linear": True, "fold_batchnorm": True}),
    ("mobilenetv2", None, {}),
    ("mobilenetv2", "bwn", {}),
    ("shufflenetv2", None, {"float_bits": 16}),
    ("shufflenetv2", "magnitude_prune", {"sparsity": 0.7}),
    pytest.param("vgg_small", "slbf", {**SLBF, "float_bits": 8}, marks=pytest.mark.slow),
]


def registry_model(name: str, method: str | None, settings: dict) -> tuple[nn.Module, dict]:
    """A small calibrated registry model, compressed by ``method``, and how to save it."""
    torch.manual_seed(0)
    model = calibrated(cnnpress.models.create(name, 1, 10, **WIDTH.get(name, {})))
    storage = {
        k: settings.pop(k) for k in ("float_bits", "fold_batchnorm", "entropy") if k in settings
    }
    skew = settings.pop("skew", False)
    if method is not None:
        model = cnnpress.compress(model, method, **settings, **storage).eval()
    for m in model.modules():
        if skew and isinstance(m, SLBFLayer):  # most selections pick bank filter 0
            m.selection.copy_(torch.where(torch.rand(m.selection.shape) < 0.7, 0, m.selection))
    return model, storage


@needs_cc
@pytest.mark.parametrize(("name", "method", "settings"), CASES)
def test_registry_models_match_pytorch(tmp_path, name, method, settings):
    model, storage = registry_model(name, method, dict(settings))
    loaded, _ = saved(model, tmp_path, **storage)
    prog, _ = build(loaded, tmp_path / "c")
    if storage.get("entropy"):  # the program keeps the file's Huffman coding
        source = (tmp_path / "c" / "model.c").read_text()
        assert re.search(r"\.(indices|positions), h\d+ ", source)
        assert re.search(r"\.huff = [123],", source)
    check(loaded, prog, torch.randn(3, *SHAPE))


#: The cases whose kernels use scratch: SLBF (a tile's patches, responses and sums, decoded
#: selections) and the Huffman decoders' tables.
SCRATCH_CASES = [
    c for c in CASES if not hasattr(c, "marks") and (c[1] == "slbf" or c[2].get("entropy"))
]
SANITIZE = ("-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-g")


@needs_cc
@pytest.mark.parametrize(("name", "method", "settings"), SCRATCH_CASES)
def test_kernels_stay_inside_the_scratch_and_arena_the_export_sizes(
    tmp_path, name, method, settings
):
    """Built with AddressSanitizer and UBSan: a read or write past the static arena or scratch
    (a scratch size in c_lower that is too small for the kernel) aborts the program."""
    model, storage = registry_model(name, method, dict(settings))
    loaded, _ = saved(model, tmp_path, **storage)
    prog, _ = build(loaded, tmp_path / "c", flags=SANITIZE)
    check(loaded, prog, torch.randn(2, *SHAPE))


def test_the_slbf_tile_is_the_same_in_c_and_python():
    header = (Path(c_lower.__file__).parent / "csrc_c" / "cnnpress_rt.h").read_text()
    assert f"#define CNNP_TILE {c_lower.TILE}\n" in header


class MyNet(nn.Module):
    """The guide's user network (docs/guide.md): not in the registry."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16))
        self.a, self.bn = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(x + self.bn(self.a(x)))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class Zoo(nn.Module):
    """Operations the registry's models do not use: strided and dilated and grouped convs,
    chunk, a channel shuffle, cat, pad, pooling with padding and ceil mode, hardtanh, relu6,
    broadcast and scalar arithmetic, a mean, BatchNorm1d and dropout."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.c3 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.act = nn.Hardtanh(-0.5, 1.5)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
        self.fc = nn.Linear(8 * 4, 16)
        self.bn1 = nn.BatchNorm1d(16)
        self.drop = nn.Dropout(0.2)
        self.out = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu6(self.c1(x))  # 8 x 14 x 14
        y = self.bn(self.c2(x))
        n, c, h, w = y.shape
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)  # shuffle
        a, b = y.chunk(2, dim=1)
        scale = b.mean([1, 2, 3]).view(-1, 1, 1, 1)  # per image, as the C program computes
        z = self.act(self.c3(a)) * 0.5 - b.mean([2, 3], keepdim=True).mul(scale)
        z = torch.cat([z, F.pad(b, (1, 1, 0, 0))[:, :, :, 1:-1]], dim=1)  # 8 x 14 x 14
        z = self.pool(F.avg_pool2d(z, 3, stride=2, padding=1, count_include_pad=False))
        z = F.adaptive_max_pool2d(z, (2, 2)).flatten(1)
        return self.out(self.drop(F.relu(self.bn1(self.fc(z)))))


class Tuples(nn.Module):
    """Settings passed as tuples and negative dimensions."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, (3, 5), stride=(1, 2), padding=(1, 2))
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv(x)), (2, 2), (2, 1))
        y = torch.cat((x.mean((2, 3), keepdim=True), F.avg_pool2d(x, (14, 13))), dim=-3)
        return self.fc(torch.flatten(y, -3))


@needs_cc
@pytest.mark.parametrize("net", [MyNet, Zoo, Tuples])
@pytest.mark.parametrize("method", [None, "slbf", "magnitude_prune"])
def test_users_cnns_match_pytorch(tmp_path, net, method):
    torch.manual_seed(1)
    model = calibrated(net())
    if method == "slbf":
        model = cnnpress.compress(
            model,
            method,
            slice_channels=4,
            num_filters=4,
            include_linear=True,
            float_bits=8,
            fold_batchnorm=True,
        )
    elif method:
        model = cnnpress.compress(model, method, sparsity=0.5, include_linear=True)
    loaded, _ = saved(model.eval(), tmp_path)
    prog, _ = build(loaded, tmp_path / "c")
    check(loaded, prog, torch.randn(3, *SHAPE))


def fmnist(count: int) -> tuple[torch.Tensor, torch.Tensor]:
    if not FMNIST_DIR.is_dir():
        pytest.skip("Fashion-MNIST is not installed")
    ds = load_dataset("fashion-mnist", "test", data_dir=FMNIST_DIR, limit=count)
    return normalize(ds.images, ds.spec.mean, ds.spec.std), ds.labels


@needs_cc
@pytest.mark.parametrize("method", [None, "slbf", "bwn"])
def test_trained_model_on_real_images(tmp_path, method):
    x, labels = fmnist(40)
    model = cnnpress.load("pretrained:resnet20-fmnist")
    if method == "slbf":
        model = cnnpress.compress(
            model, "slbf", slice_channels=8, num_filters=16, float_bits=8, fold_batchnorm=True
        )
    elif method:
        model = cnnpress.compress(model, method, float_bits=16)
    if method:
        model, _ = saved(model.eval(), tmp_path)
    prog, _ = build(model, tmp_path / "c")
    check(model, prog, x)
    if method is None:  # the shipped model classifies them, in C as in PyTorch
        assert (run(prog, x).argmax(1) == labels.numpy()).mean() >= 0.9


def sections(obj: Path) -> dict[str, int]:
    done = subprocess.run([SIZE, "-A", str(obj)], capture_output=True, text=True, check=True)
    found = {}
    for line in done.stdout.splitlines():
        m = re.match(r"^(\.\S+)\s+(\d+)\s", line)
        if m:
            found[m.group(1)] = found.get(m.group(1), 0) + int(m.group(2))
    return found


@needs_cc
@pytest.mark.skipif(SIZE is None, reason="no size tool (binutils)")
@pytest.mark.parametrize("method", [None, "slbf"])
def test_flash_and_ram_are_what_model_o_holds(tmp_path, method):
    settings = {"float_bits": 8, "fold_batchnorm": True}
    if method:
        settings.update(slice_channels=8, num_filters=16)
    torch.manual_seed(0)
    model = calibrated(cnnpress.models.create("resnet20", 1, 10))  # ResNet-20 as it is
    storage = {k: settings.pop(k) for k in ("float_bits", "fold_batchnorm")}
    if method:
        model = cnnpress.compress(model, method, **settings, **storage).eval()
    loaded, cnnp_bytes = saved(model, tmp_path, **storage)
    prog, info = build(loaded, tmp_path / "c")
    assert info == {**c_memory(loaded, SHAPE), "files": info["files"]}
    obj = tmp_path / "model.o"
    subprocess.run(
        [CC, "-std=c99", "-O2", "-c", str(tmp_path / "c" / "model.c"), "-o", str(obj)], check=True
    )
    s = sections(obj)
    flash = sum(v for k, v in s.items() if k.startswith((".text", ".rodata", ".data")))
    for key in ("const_bytes", "descriptor_bytes"):
        assert info[key] == sum(row[key] for row in info["layers"])
    # a residual block holds two 16 x 28 x 28 maps: the second conv writes over the residual,
    # with its scratch beside them in the arena (the dense conv: one output channel's sums)
    maps = 2 * 4 * 16 * 28 * 28
    assert info["arena_bytes"] == info["ram_bytes"] <= maps + info["scratch_bytes"]
    if method is None:
        assert info["arena_bytes"] == maps + 4 * 28 * 28
    live = [row["live_bytes"] for row in info["layers"]]  # per layer, as it runs
    assert maps <= max(live) <= info["ram_bytes"]
    # every weight byte and descriptor is in flash, once (each array aligned to 32 bytes)
    assert info["flash_bytes"] <= s[".rodata"] <= info["flash_bytes"] + 32 * 8
    assert flash - s[".rodata"] <= 40 * info["ops"] + 512  # cnnp_predict: a call per op
    assert info["ram_bytes"] <= s[".bss"] <= info["ram_bytes"] + 64  # the arena
    assert s.get(".data", 0) == 0  # nothing to copy to RAM at start
    assert flash <= 1.25 * cnnp_bytes + 2048
    check(loaded, prog, torch.randn(2, *SHAPE))


def test_what_has_no_kernel_is_one_line(tmp_path):
    model = cnnpress.compress(cnnpress.models.create("resnet20", 1, 10, width=8), "xnor")
    with pytest.raises(CnnpressError, match=r"XNOR") as err:
        export_c(model.eval(), tmp_path, SHAPE)
    assert "\n" not in str(err.value)
    lowrank = cnnpress.compress(cnnpress.models.create("lenet5", 1, 10), "lowrank")
    with pytest.raises(CnnpressError, match=r"no C kernel"):
        export_c(lowrank.eval(), tmp_path, SHAPE)
    for shape in [(1, 28), (1, 28, True), None, "1,28,28"]:
        with pytest.raises(CnnpressError, match=r"input_shape"):
            export_c(cnnpress.models.create("lenet5", 1, 10), tmp_path, shape)
    with pytest.raises(CnnpressError, match=r"does not fit"):
        export_c(cnnpress.models.create("lenet5", 1, 10), tmp_path, (3, 28, 28))
    net = cnnpress.load("pretrained:resnet20-fmnist")  # records Fashion-MNIST: 1 x 28 x 28
    assert c_memory(net)["input_floats"] == 784


@needs_cc
def test_command_line_export_and_summary(tmp_path, capsys):
    torch.manual_seed(0)
    model = cnnpress.compress(
        calibrated(cnnpress.models.create("lenet5", 1, 10)),
        "slbf",
        slice_channels=3,
        num_filters=4,
        float_bits=16,
    )
    path = tmp_path / "m.cnnp"
    cnnpress.save(model, path, dataset=get_spec("fashion-mnist").to_dict())
    assert main(["export", str(path), "--c", str(tmp_path / "c"), "--json"]) == 0
    exported = json.loads(capsys.readouterr().out)
    assert exported["cnnp_bytes"] == path.stat().st_size
    assert {Path(f).name for f in exported["files"]} == {"model.c", "model.h", *RUNTIME_FILES}
    assert {"cnnpress_rt.h", "main.c", "cnnp_conv.c"} <= set(RUNTIME_FILES)
    loaded = cnnpress.load(path)
    prog, info = build(loaded, tmp_path / "c")  # the same program again, built
    check(loaded, prog, torch.randn(2, *SHAPE))
    assert main(["summary", str(path), "--json"]) == 0
    device = json.loads(capsys.readouterr().out)["device"]
    assert device == {k: v for k, v in info.items() if k not in ("layers", "files")}
    assert main(["summary", str(path)]) == 0
    assert f"RAM {info['ram_bytes']:,} bytes" in " ".join(capsys.readouterr().out.split())
    assert main(["export", str(path)]) == 2  # --onnx or --c
    capsys.readouterr()


M3_TOOLS = ("arm-none-eabi-gcc", "arm-none-eabi-size", "qemu-system-arm")


@needs_cc
@pytest.mark.slow
@pytest.mark.skipif(
    not all(shutil.which(t) for t in M3_TOOLS),
    reason="no gcc-arm-none-eabi / qemu-system-arm (benchmarks/cortex_m3.py installs them)",
)
def test_emulated_cortex_m3_classifies_as_the_host(tmp_path):
    m3 = load_benchmark("cortex_m3")
    model, storage = registry_model(
        "resnet20", "slbf", {**SLBF, "float_bits": 8, "fold_batchnorm": True}
    )
    loaded, _ = saved(model, tmp_path, **storage)
    export_c(loaded, tmp_path / "c", SHAPE)
    sizes = m3.build_m3(tmp_path / "c")
    assert sizes["model_o"]["text"] >= c_memory(loaded, SHAPE)["flash_bytes"]
    x = torch.randn(4, *SHAPE)
    host = m3.run_host(tmp_path / "c", x)
    got = m3.run_m3(tmp_path / "c", x, timeout=120)
    assert (got.argmax(1) == host.argmax(1)).all()
    assert np.abs(got - host).max() <= 1e-5 * np.abs(host).max()
