"""The file holds the network: a user's own CNN compresses with every method, saves, and loads
in a process that does not have its class; every registry model round-trips through the
graph; what cannot be held is refused with one line naming it."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cnnpress
from cnnpress.errors import CnnpressError
from cnnpress.format import read_info
from cnnpress.models.graph import build, trace

METHODS = cnnpress.methods.names()


class UserNet(nn.Module):
    """Not in the registry: a stem, a residual block, pooling and a classifier."""

    def __init__(self, classes: int = 7) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16))
        self.a = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn_a = nn.BatchNorm2d(16)
        self.b = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = F.relu(x + self.bn_a(self.a(x)))
        x = self.pool(F.relu(self.b(x)))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def user_net() -> nn.Module:
    torch.manual_seed(0)
    net = UserNet()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    return net.eval()


LOAD_ELSEWHERE = """
import sys, numpy as np, torch, cnnpress
model = cnnpress.load(sys.argv[1]).eval()
x = torch.from_numpy(np.load(sys.argv[2]))
with torch.no_grad():
    np.save(sys.argv[3], model(x).numpy())
print(type(model).__name__)
"""


def load_in_a_fresh_process(path, x, tmp_path) -> tuple[np.ndarray, str]:
    np.save(tmp_path / "x.npy", x.numpy())
    done = subprocess.run(
        [sys.executable, "-c", LOAD_ELSEWHERE, str(path), str(tmp_path / "x.npy"),
         str(tmp_path / "y.npy")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    return np.load(tmp_path / "y.npy"), done.stdout.strip()


@pytest.mark.parametrize("method", ["fp32", *METHODS])
def test_a_user_cnn_compresses_saves_and_loads_without_its_class(method, tmp_path):
    net = user_net()
    model = net if method == "fp32" else cnnpress.compress(net, method).eval()
    path = tmp_path / "m.cnnp"
    cnnpress.save(model, path)
    assert "graph" in read_info(path)["manifest"]["arch"]
    x = torch.randn(3, 1, 20, 20)
    with torch.no_grad():
        want = model(x).numpy()
    got, kind = load_in_a_fresh_process(path, x, tmp_path)
    assert kind == "GraphNet"  # the fresh process has no UserNet: the file held the network
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_a_user_cnn_gets_a_size_budget_and_a_summary(tmp_path):
    net = user_net()
    small = cnnpress.compress(net, "slbf", target_size=3000, float_bits=8, slice_channels=4)
    size = cnnpress.save(small, tmp_path / "m.cnnp")
    assert size <= 3000
    s = cnnpress.summary(small, input_shape=(1, 20, 20))
    s.attach_file(read_info(tmp_path / "m.cnnp"))
    assert s.file["file_bytes"] == size and s.file["ratio"] > 1


@pytest.mark.parametrize("name", cnnpress.models.names())
def test_every_registry_model_round_trips_through_its_graph(name):
    torch.manual_seed(0)
    model = cnnpress.models.create(name, 1, 10).eval()
    graph = json.loads(json.dumps(trace(model)))  # what a manifest holds
    net = build(graph).eval()
    assert [n for n, _ in net.named_modules()] == [n for n, _ in model.named_modules()]
    net.load_state_dict(model.state_dict())
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(net(x), model(x), rtol=0, atol=0)


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) if x.sum() > 0 else -self.conv(x)


class Sigmoid(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Sequential(nn.Conv2d(1, 4, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.inner(x))


class OwnWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gain


@pytest.mark.parametrize(
    ("model", "words"),
    [
        (Untraceable(), ["Untraceable cannot be traced by torch.fx"]),
        (Sigmoid(), ["the model (Sigmoid) calls sigmoid", "supported:"]),
        (OwnWeight(), ["the model (OwnWeight) holds its own parameters"]),
    ],
)
def test_what_a_file_cannot_hold_is_one_error_naming_it(model, words, tmp_path):
    with pytest.raises(CnnpressError) as err:
        cnnpress.save(model, tmp_path / "m.cnnp")
    assert all(w in str(err.value) for w in words) and "\n" not in str(err.value)
    assert not (tmp_path / "m.cnnp").exists()


def test_an_untraceable_model_still_compresses_in_memory_but_not_to_a_file(tmp_path):
    small = cnnpress.compress(Untraceable(), "bwn", include_first=True)
    assert small(torch.randn(1, 1, 5, 5)).shape == (1, 4, 3, 3)
    with pytest.raises(CnnpressError, match="cannot be traced"):
        cnnpress.save(small, tmp_path / "m.cnnp")


def tampered(tmp_path, change) -> str:
    """Save the user net, change its graph in the manifest, and return the loader's error."""
    from cnnpress.format.container import _assemble, _parse  # the file's own framing

    path = tmp_path / "m.cnnp"
    cnnpress.save(user_net(), path)
    manifest, payload, _ = _parse(path)
    change(manifest["arch"]["graph"])
    path.write_bytes(_assemble(manifest, payload))
    with pytest.raises(CnnpressError) as err:
        cnnpress.load(path)
    return str(err.value)


def test_a_graph_with_an_unknown_function_is_refused(tmp_path):
    def evil(graph):
        graph["nodes"][2][1:3] = ["function", "os.system"]

    assert "os.system" in tampered(tmp_path, evil)


def test_a_graph_with_an_unknown_module_type_is_refused(tmp_path):
    def evil(graph):
        graph["modules"][0][1] = "Transformer"

    assert "Transformer" in tampered(tmp_path, evil)


def test_a_graph_whose_node_uses_a_later_value_is_refused(tmp_path):
    def evil(graph):
        graph["nodes"][1][3] = [{"node": graph["nodes"][-2][0]}]

    assert "before they exist" in tampered(tmp_path, evil)


@pytest.mark.parametrize("mode", ["dense", "stm"])
def test_a_user_cnn_exports_to_onnx(mode, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from cnnpress.runtime import export_onnx

    path = tmp_path / "m.cnnp"
    cnnpress.save(cnnpress.compress(user_net(), "slbf"), path, float_bits=16)
    model = cnnpress.load(path).eval()  # a GraphNet: the class is not needed to export
    onnx_path = export_onnx(model, tmp_path / "m.onnx", (1, 20, 20), mode=mode)
    x = torch.randn(2, 1, 20, 20)
    got = ort.InferenceSession(str(onnx_path)).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), model(x), rtol=1e-4, atol=1e-4)


def test_a_user_student_distils_from_a_user_teacher(tmp_path):
    from cnnpress.data import Loader, load_dataset
    from cnnpress.methods.distill import make_kd_loss
    from cnnpress.train.config import TrainConfig
    from cnnpress.train.loop import fit

    data = load_dataset("synthetic", "train", num_samples=64, num_classes=7)
    loader = Loader(data, 16, train=True, seed=0)
    teacher, student = user_net(), cnnpress.compress(user_net(), "bwn")
    before = [p.detach().clone() for p in student.parameters()]
    result = fit(student, loader, Loader(data, 32, train=False), TrainConfig(epochs=1, lr=0.05),
                 tmp_path, loss_fn=make_kd_loss(teacher, 4.0, 0.9))
    assert result["test_accuracy"] is not None
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters(), strict=True))


def test_the_command_line_takes_a_user_model_file(tmp_path, capsys):
    from cnnpress.cli.main import main

    path = tmp_path / "m.cnnp"
    cnnpress.save(cnnpress.compress(user_net(), "slbf"), path)  # no dataset recorded
    assert main(["summary", str(path), "--input-shape", "1,20,20", "--json"]) == 0
    onnx_path = tmp_path / "m.onnx"
    argv = ["export", str(path), "--onnx", str(onnx_path), "--input-shape", "1,20,20"]
    assert main([*argv, "--mode", "stm"]) == 0 and onnx_path.is_file()
    capsys.readouterr()
    assert main(["export", str(path), "--onnx", str(onnx_path)]) == 2
    err = capsys.readouterr().err
    assert "records no dataset" in err and "--input-shape" in err and err.count("\n") == 1
