"""Compression to a size budget: the real file fits, an impossible budget names the smallest
reachable size, more bytes buy less error, and the recorded config rebuilds the model."""

from __future__ import annotations

import json
import re

import pytest
import torch
import yaml

import cnnpress
from cnnpress.budget import file_size, fp32_bytes, parse_size, plan
from cnnpress.data import get_spec
from cnnpress.errors import ConfigError
from cnnpress.format import read_info
from cnnpress.methods.slbf import SLBFConfig, SLBFConv2d

FAST = {"float_bits": 16, "budget_max_filters": 8}  # small candidate lists keep tests quick


@pytest.fixture(scope="module")
def net() -> torch.nn.Module:
    torch.manual_seed(0)
    return cnnpress.models.create("resnet20", 1, 10, width=8)


@pytest.fixture(scope="module")
def smallest(net) -> int:
    """The smallest reachable size, read from the impossible-budget error."""
    with pytest.raises(ConfigError, match="cannot be met") as err:
        plan(net, SLBFConfig(target_size=1000, **FAST))
    message = str(err.value)
    assert "\n" not in message
    return int(re.search(r"give a file of ([\d,]+) bytes", message).group(1).replace(",", ""))


def test_the_file_fits_the_budget(net, smallest, tmp_path):
    budget = smallest + 1500
    small = cnnpress.compress(net, "slbf", target_size=budget, **FAST)
    provenance = {
        "command": f"cnnpress compress --method slbf --model resnet20 --target-size {budget}",
        "commit": "0123456789abcdef0123456789abcdef01234567+dirty",
        "accuracy": 91.37,
        "machine": {"cpu": "AMD EPYC 7B13", "cores": 2, "torch": torch.__version__},
    }
    path = tmp_path / "m.cnnp"
    written = cnnpress.save(
        small,
        path,
        float16=True,
        provenance=provenance,
        dataset=get_spec("fashion-mnist").to_dict(),
    )
    assert smallest - 1000 < written <= budget
    recorded = small.cnnpress_method["config"]
    assert recorded["target_size"] is None and recorded["target_ratio"] is None
    layers = [n for n, m in small.named_modules() if isinstance(m, SLBFConv2d)]
    assert sorted(recorded["layers"]) == sorted(layers)
    same = cnnpress.load(path)  # the recorded per-layer settings rebuild the same shapes
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(same(x), small.eval()(x), atol=1e-2, rtol=1e-2)


def test_impossible_budget_names_the_minimum(net, smallest):
    assert plan(net, SLBFConfig(target_size=smallest, **FAST)).file_bytes == smallest
    with pytest.raises(ConfigError, match=f"{smallest:,} bytes"):
        cnnpress.compress(net, "slbf", target_size=smallest - 1, **FAST)
    # float32 floats need more room than float16 ones
    with pytest.raises(ConfigError, match="cannot be met"):
        plan(net, SLBFConfig(target_size=smallest, budget_max_filters=8))


def test_a_larger_budget_buys_lower_error(net, smallest):
    low = plan(net, SLBFConfig(target_size=smallest + 300, **FAST))
    high = plan(net, SLBFConfig(target_size=smallest + 3000, **FAST))
    assert low.file_bytes <= smallest + 300 < high.file_bytes <= smallest + 3000
    assert high.error < low.error
    assert high.error == pytest.approx(sum(c.error**2 for c in high.layers.values()))


def test_ratio_is_a_size(net, smallest):
    ratio = fp32_bytes(net) / (smallest + 800)
    by_ratio = plan(net, SLBFConfig(target_ratio=ratio, **FAST))
    assert by_ratio.budget == int(fp32_bytes(net) / ratio)
    assert by_ratio.file_bytes <= by_ratio.budget
    cfg = SLBFConfig(**FAST, layers=by_ratio.overrides())
    assert file_size(net, cfg) + cfg.header_reserve == by_ratio.file_bytes


def test_pinned_settings_are_kept(net, smallest):
    layers = {"layer3.*": {"num_filters": 4}, "layer1.0.conv1": {"skip": True}}
    chosen = plan(net, SLBFConfig(target_size=smallest + 2500, layers=layers, **FAST))
    assert "layer1.0.conv1" not in chosen.layers
    assert {c.num_filters for n, c in chosen.layers.items() if n.startswith("layer3")} == {4}
    with pytest.raises(ConfigError, match="does not divide"):
        plan(net, SLBFConfig(target_size="1MB", layers={"layer2.*": {"slice_channels": 3}}))


@pytest.mark.parametrize(
    ("text", "size"),
    [
        (12000, 12000),
        ("12KB", 12000),
        ("12kb", 12000),
        ("12KiB", 12288),
        ("1.5MB", 1500000),
        (" 300 B", 300),
        ("2MiB", 2097152),
    ],
)
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize(
    "settings",
    [
        {"target_size": "12 parsecs"},
        {"target_size": 0},
        {"target_size": True},
        {"target_ratio": -3},
        {"target_size": "1KB", "target_ratio": 10},
        {"float_bits": 12},
        {"header_reserve": -1},
        {"budget_max_filters": 1},
    ],
)
def test_bad_budget_settings(settings):
    with pytest.raises(ConfigError):
        SLBFConfig(**settings)


def test_a_user_model_gets_a_budget_and_an_untraceable_one_an_error(net):
    bare = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.Conv2d(8, 8, 3))
    small = cnnpress.compress(bare, "slbf", target_size=2000, slice_channels=4)
    assert small.cnnpress_arch["graph"]["modules"][1][0] == "1"  # the file will hold its graph

    class Branchy(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Conv2d(1, 8, 3), torch.nn.Conv2d(8, 8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(x)) if x.mean() > 0 else x

    with pytest.raises(ConfigError, match="cannot be traced"):
        cnnpress.compress(Branchy(), "slbf", target_size="100KB")


def test_storage_settings_are_how_save_writes_and_what_the_budget_sizes(net, smallest, tmp_path):
    stored = {"fold_batchnorm": True, "entropy": True}
    # Folding BatchNorm frees bytes: the same budget now buys lower error than without it.
    plain = plan(net, SLBFConfig(target_size=smallest + 300, **FAST))
    folded = plan(net, SLBFConfig(target_size=smallest + 300, **FAST, **stored))
    assert folded.minimum_bytes < plain.minimum_bytes
    assert folded.error < plain.error
    small = cnnpress.compress(net, "slbf", target_size=smallest + 300, **FAST, **stored)
    path = tmp_path / "m.cnnp"
    written = cnnpress.save(small, path, dataset=get_spec("fashion-mnist").to_dict())
    assert written <= smallest + 300
    manifest = cnnpress.format.read_info(path)["manifest"]
    assert manifest["float_bits"] == 16 and manifest["fold_batchnorm"] is True
    # An argument of save still wins over the recorded settings.
    bigger = cnnpress.save(small, tmp_path / "f32.cnnp", float16=False, fold_batchnorm=False)
    assert bigger > written
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(cnnpress.load(path)(x), small.eval()(x), atol=2e-2, rtol=2e-2)


def test_cli_budget_flags(tmp_path, capsys):
    from cnnpress.cli.main import main

    out, recipe = tmp_path / "run", tmp_path / "tiny.yaml"
    recipe.write_text(
        "model: resnet20\nmodel_args: {width: 4}\ndata: synthetic\n"
        "data_options: {num_samples: 64}\nmethod: slbf\nmethod_config: {budget_max_filters: 8}\n"
        "train: {epochs: 1, batch_size: 32}\n"
    )
    argv = ["compress", "--recipe", str(recipe), "--threads", "1", "--json"]
    assert main([*argv, "--out", str(out), "--target-ratio", "100000"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cnnpress: error: the budget of") and "\n" not in err
    assert "float_bits=8, fold_batchnorm, entropy" in err
    flags = ["--target-size", "6KB", "--int8", "--fold-batchnorm", "--entropy"]
    assert main([*argv, "--out", str(out), *flags]) == 0
    assert (out / "model.cnnp").stat().st_size <= 6_000
    assert read_info(out / "model.cnnp")["manifest"]["float_bits"] == 8
    result = json.loads(capsys.readouterr().out)
    assert result["budget"] == {"target_size": "6KB", "target_ratio": None}
    saved = yaml.safe_load((out / "config.yaml").read_text())["method_config"]
    assert saved["target_size"] is None and saved["layers"]  # resume rebuilds these shapes
    for name in ("model.cnnp", "result.json"):
        (out / name).unlink()
    assert main(["compress", "--out", str(out), "--resume", "--threads", "1", "--json"]) == 0
