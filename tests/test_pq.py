"""Product quantization: k-means, codebooks and codes, codeword gradients, settings validation,
and the file (round trip, size equal to the cost model, smaller than fp32)."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cnnpress
import cnnpress.methods.pq  # noqa: F401  (registers the method)
from cnnpress.errors import ConfigError
from cnnpress.format import read_info
from cnnpress.methods.pq import PQ, PQConfig, PQConv2d, PQLinear, capped_bits, kmeans
from cnnpress.runtime.dense import to_dense


def tiny_resnet(**settings) -> nn.Module:
    torch.manual_seed(0)
    net = cnnpress.models.create("resnet20", 1, 10, width=8)
    return cnnpress.compress(net, "pq", **settings)


@pytest.fixture(scope="module")
def default_resnet() -> nn.Module:
    return tiny_resnet()


@pytest.fixture(scope="module")
def pq_resnet() -> nn.Module:
    net = tiny_resnet(layers={"layer3.*": {"bits": 4, "shared_codebook": False}})
    for m in net.modules():  # trained-looking BatchNorm so comparisons are not trivial
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    return net.eval()


def converted(conv: nn.Module, **settings) -> PQConv2d:
    """``conv`` replaced by its PQ layer through the method (the layer is compressed by rule)."""
    model = nn.Sequential(nn.Conv2d(1, conv.in_channels, 1), conv)
    return PQ().convert(model, PQConfig(**settings))[1]


def test_kmeans_recovers_well_separated_clusters():
    gen = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    labels = torch.arange(4).repeat_interleave(25)
    points = centres[labels] + 0.1 * torch.randn(100, 2, generator=gen)
    cents, codes = kmeans(points[None], 4, iterations=10, seed=3)
    assert cents.shape == (1, 4, 2) and codes.shape == (1, 100)
    for c in range(4):  # each true cluster maps to one centroid, near its centre
        members = codes[0, labels == c]
        assert (members == members[0]).all()
        assert torch.dist(cents[0, members[0]], centres[c]) < 0.1
    assert codes[0].unique().numel() == 4


def test_kmeans_codes_are_nearest_centroids_and_seeded():
    data = torch.randn(3, 200, 5, generator=torch.Generator().manual_seed(1))
    cents, codes = kmeans(data, 16, iterations=4, seed=7)
    dist = torch.cdist(data, cents)
    torch.testing.assert_close(dist.gather(2, codes[..., None])[..., 0], dist.min(-1).values)
    again = kmeans(data, 16, iterations=4, seed=7)
    assert torch.equal(cents, again[0]) and torch.equal(codes, again[1])

    def distortion(c: torch.Tensor, q: torch.Tensor) -> float:
        return float((data - c.gather(1, q[..., None].expand(-1, -1, 5))).pow(2).sum())

    # Lloyd iterations never increase the distortion of the seeding
    assert distortion(cents, codes) < distortion(*kmeans(data, 16, iterations=0, seed=7))


@pytest.mark.parametrize("shared", [True, False])
def test_every_subvector_is_a_centroid_of_its_codebook(shared):
    torch.manual_seed(2)
    conv = nn.Conv2d(6, 20, 3, padding=1)
    w = conv.weight.detach().clone()
    layer = converted(conv, subvector=3, bits=3, shared_codebook=shared)
    n, m, s = 20, 6 * 9 // 3, 3
    assert layer.codebooks.shape == ((1 if shared else m), 2**3, s)
    assert layer.codes.shape == (n, m) and int(layer.codes.max()) < 8
    sub = layer.dense_weight().detach().reshape(n, m, s)
    books = layer.codebooks.detach()
    for i in range(n):
        for j in range(m):
            assert torch.equal(sub[i, j], books[0 if shared else j, layer.codes[i, j]])
    # each code picks a centroid nearest to the original sub-vector
    orig = w.reshape(n, m, s)
    for i in range(n):
        for j in range(m):
            dist = (books[0 if shared else j] - orig[i, j]).norm(dim=-1)
            assert dist[layer.codes[i, j]] <= dist.min() + 1e-6
    torch.testing.assert_close(layer.bias, conv.bias)


def test_fewer_subvectors_than_centroids_caps_the_bits():
    """16 centroids for 12 sub-vectors of 9 values would store 16*9 floats for 12*9 weights:
    the bits go down to 3 (8 centroids), the first width that stores less than fp32."""
    torch.manual_seed(3)
    conv = nn.Conv2d(4, 3, 3)  # 3 x 4 = 12 sub-vectors of 9 values
    layer = converted(conv, bits=4)
    assert layer.bits == 3 and layer.codebooks.shape == (1, 8, 9)
    assert layer.stored_bits() < layer.fp32_bits() < 16 * 9 * 32 + 12 * 4
    assert capped_bits(3, 36, 9, 4, True) == 3
    assert capped_bits(3, 36, 9, 4, False) == 1  # a codebook per sub-space: 3 vectors each
    assert capped_bits(64, 576, 9, 8, True) == 8  # 4096 sub-vectors: 256 centroids are fine


def test_capped_bits_are_recorded_in_the_config():
    """The lowered bits are in the recorded config, so the file rebuilds the same shapes."""
    net = tiny_resnet()
    layers = net.cnnpress_method["config"]["layers"]
    first = net.layer1[0].conv1  # 8 filters x 8 channels: 64 sub-vectors of 9 values
    assert first.bits == 5 and layers["layer1.0.conv1"] == {"bits": 5}
    assert "layer3.0.conv2" not in layers and net.layer3[0].conv2.bits == 8
    for name, module in net.named_modules():
        if isinstance(module, PQConv2d):
            assert module.stored_bits() < module.fp32_bits(), name
            assert layers.get(name, {}).get("bits", 8) == module.bits, name


@pytest.mark.parametrize("shared", [True, False])
def test_codeword_gradient_is_the_mean_of_its_members_gradients(shared):
    torch.manual_seed(4)
    layer = converted(nn.Conv2d(4, 8, 3, stride=2, padding=1), bits=2, shared_codebook=shared)
    x, target = torch.randn(2, 4, 7, 7), torch.randn(2, 8, 4, 4)
    ((layer(x) - target) ** 2).sum().backward()
    w = layer.dense_weight().detach().requires_grad_(True)
    y = F.conv2d(x, w, layer.bias.detach(), layer.stride, layer.padding)
    ((y - target) ** 2).sum().backward()
    gw = w.grad.reshape(8, 4, 9)
    expected = torch.zeros_like(layer.codebooks)
    count = torch.zeros(layer.codebooks.shape[:2])
    for i in range(8):
        for j in range(4):
            expected[0 if shared else j, layer.codes[i, j]] += gw[i, j]
            count[0 if shared else j, layer.codes[i, j]] += 1
    expected /= count.clamp(min=1).unsqueeze(-1)
    torch.testing.assert_close(layer.codebooks.grad, expected, rtol=1e-5, atol=1e-5)
    assert layer.bias.grad is not None


def test_linear_rows_are_quantized():
    torch.manual_seed(5)
    lin = nn.Linear(12, 30)
    model = PQ().convert(nn.Sequential(lin), PQConfig(include_linear=True, subvector=4, bits=3))
    layer = model[0]
    assert isinstance(layer, PQLinear) and layer.codebooks.shape == (1, 8, 4)
    x = torch.randn(5, 12)
    torch.testing.assert_close(layer(x), F.linear(x, layer.dense_weight().flatten(1), layer.bias))
    err = (layer.dense_weight().flatten(1) - lin.weight).norm() / lin.weight.norm()
    assert err < 0.9  # 8 centroids fit 90 sub-vectors far better than nothing


def test_resnet_forward_gradients_and_defaults(default_resnet, pq_resnet):
    net = copy.deepcopy(default_resnet)
    pq = [m for m in net.modules() if isinstance(m, PQConv2d)]
    assert len(pq) == 18 and isinstance(net.conv1, nn.Conv2d) and isinstance(net.fc, nn.Linear)
    assert all(m.subvector == 9 and m.codebooks.shape == (1, 2**m.bits, 9) for m in pq)
    assert [m.bits for m in pq] == [5] * 6 + [6] + [7] * 5 + [8] * 6
    net.train()
    out = net(torch.randn(2, 1, 28, 28))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    out.logsumexp(1).sum().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    per_subspace = pq_resnet.layer3[0].conv2
    assert per_subspace.codebooks.shape == (32, 16, 9) and per_subspace.bits == 4


@pytest.mark.parametrize(
    ("settings_", "message"),
    [
        ({"subvector": 5}, "does not divide"),
        ({"subvector": 0}, "positive integer"),
        ({"bits": 0}, "from 1 to 16"),
        ({"bits": 17}, "from 1 to 16"),
        ({"shared_codebook": "yes"}, "true or false"),
        ({"iterations": -1}, "non-negative"),
        ({"codebook": 3}, "unknown setting"),
        ({"layers": {"layer2.*": {"subvector": 7}}}, "layer layer2.0.conv1: subvector 7"),
    ],
)
def test_invalid_settings_raise_one_clear_error(settings_, message):
    net = cnnpress.models.create("resnet20", 1, 10, width=8)
    with pytest.raises(ConfigError, match=message) as info:
        cnnpress.compress(net, "pq", **settings_)
    assert "\n" not in str(info.value)


def test_lenet_round_trip_with_linear_layers(tmp_path):
    torch.manual_seed(6)
    net = cnnpress.compress(
        cnnpress.models.create("lenet5", 1, 10),
        "pq",
        include_linear=True,
        bits=5,
        layers={"fc1": {"subvector": 16, "shared_codebook": False}},
    ).eval()
    assert isinstance(net.fc1, PQLinear) and net.fc1.codebooks.shape == (25, 32, 16)
    cnnpress.save(net, tmp_path / "m.cnnp")
    same = cnnpress.load(tmp_path / "m.cnnp")
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        a, b = net(x), same(x)
    assert ((a - b).abs().max() / a.abs().max()).item() <= 1e-5


def test_round_trip_outputs_are_equal_in_fp32(pq_resnet, tmp_path):
    cnnpress.save(pq_resnet, tmp_path / "m.cnnp")
    same = cnnpress.load(tmp_path / "m.cnnp")
    assert same.cnnpress_method == pq_resnet.cnnpress_method
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        a, b = pq_resnet(x), same(x)
    assert ((a - b).abs().max() / a.abs().max()).item() <= 1e-5


@pytest.mark.parametrize("float_bits", [32, 16])
def test_file_size_equals_the_cost_model(pq_resnet, tmp_path, float_bits):
    path = tmp_path / "m.cnnp"
    cnnpress.save(pq_resnet, path, float16=float_bits == 16)
    info = read_info(path)
    s = cnnpress.summary(pq_resnet, (1, 28, 28), float_bits=float_bits)
    s.attach_file(info)
    arrays_per_row: dict[str, int] = {}
    for a in info["arrays"]:
        arrays_per_row[a["module"]] = arrays_per_row.get(a["module"], 0) + 1
    compressed = 0
    for row in s.rows:  # bytes written == stored bits, rounded up per array
        assert 0 <= 8 * row.file_bytes - row.stored_bits < 8 * arrays_per_row[row.name], row.name
        compressed += row.kind == "PQConv2d"
    assert compressed == 18
    assert sum(r.file_bytes for r in s.rows) == info["payload_bytes"]
    assert os.path.getsize(path) == info["file_bytes"]


def test_file_is_smaller_than_fp32_at_default_settings(default_resnet, tmp_path):
    fp32, small = tmp_path / "fp32.cnnp", tmp_path / "pq.cnnp"
    cnnpress.save(cnnpress.models.create("resnet20", 1, 10, width=8), fp32)
    cnnpress.save(default_resnet, small)
    assert os.path.getsize(small) < os.path.getsize(fp32)


def test_dense_runtime_computes_the_same(pq_resnet):
    dense = to_dense(pq_resnet)
    assert not any(m is not dense and cnnpress.methods.method_for(m) for m in dense.modules())
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(dense(x), pq_resnet(x), rtol=1e-4, atol=1e-5)
