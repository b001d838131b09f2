"""Every registered method runs end to end through the CLI: compress, train, file, evaluate."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

import cnnpress
from cnnpress.cli.main import main
from cnnpress.data import Loader, load_dataset
from cnnpress.train.loop import evaluate

FMNIST = Path(os.environ.get("CNNPRESS_DATA_DIR", "/usr/share/datasets/fashion-mnist"))


def _compress(tmp_path: Path, capsys, method: str, recipe: str) -> dict:
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe)
    code = main(["compress", "--recipe", str(path), "--method", method, "--out",
                 str(tmp_path / method), "--json", "--threads", "1"])
    out, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads(out)
    model = cnnpress.load(tmp_path / method / "model.cnnp")
    assert model.cnnpress_method["name"] == method
    # the accuracy measured from the loaded file, on the run's own test data, is the one the
    # run reported
    options = yaml.safe_load(recipe).get("data_options") or {}
    test = load_dataset(result["data"], "test", **options)
    accuracy = evaluate(model, Loader(test, 256, train=False))["accuracy"]
    assert accuracy == pytest.approx(result["test_accuracy"], abs=0.5)
    code = main(["evaluate", str(tmp_path / method / "model.cnnp"), "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert 0.0 <= json.loads(out)["accuracy"] <= 100.0  # the CLI reads the file alone
    return result


@pytest.mark.parametrize("method", cnnpress.methods.names())
def test_method_end_to_end_on_synthetic(tmp_path, capsys, method):
    recipe = (
        "model: resnet20\nmodel_args: {width: 8}\ndata: synthetic\n"
        "data_options: {num_samples: 128}\ntrain: {epochs: 1, batch_size: 32, lr: 0.05}\n"
    )
    result = _compress(tmp_path, capsys, method, recipe)
    assert result["method"] == method and result["ratio_payload"] > 1.0


@pytest.mark.slow
@pytest.mark.skipif(not FMNIST.is_dir(), reason="Fashion-MNIST files not installed")
@pytest.mark.parametrize("method", cnnpress.methods.names())
def test_method_end_to_end_on_fashion_mnist(tmp_path, capsys, method):
    # small settings: the first 512 training and test images, one epoch (a smoke test of the
    # real data path, not an accuracy measurement)
    recipe = (
        "model: resnet20\nmodel_args: {width: 8}\ndata: fashion-mnist\n"
        "data_options: {limit: 512}\ntrain: {epochs: 1, batch_size: 64, lr: 0.05}\n"
    )
    result = _compress(tmp_path, capsys, method, recipe)
    assert result["data"] == "fashion-mnist" and 0.0 <= result["test_accuracy"] <= 100.0


def test_network_slimming_pipeline_through_the_cli(tmp_path, capsys):
    # sparsity training (--slimming-l1) shrinks the BatchNorm scales; filter_prune with one
    # global threshold on them (--set ...) then removes the channels
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "model: resnet20\nmodel_args: {width: 8}\ndata: synthetic\n"
        "data_options: {num_samples: 128}\ntrain: {epochs: 1, batch_size: 32, lr: 0.05}\n"
    )
    base = ["--recipe", str(recipe), "--threads", "1", "--json"]

    def gamma_sum(run: Path) -> float:
        net = cnnpress.load(run / "model.cnnp")
        return sum(m.weight.abs().sum().item() for m in net.modules() if hasattr(m, "running_var"))

    for name, extra in (("plain", []), ("slim", ["--slimming-l1", "2.0"])):
        assert main(["train", *base, "--out", str(tmp_path / name), *extra]) == 0
        capsys.readouterr()
    assert gamma_sum(tmp_path / "slim") < 0.8 * gamma_sum(tmp_path / "plain")
    settings = ["--set", "criterion=bn", "--set", "scope=global", "--set", "ratio=0.5"]
    out = str(tmp_path / "pruned")
    code = main(["compress", *base, "--method", "filter_prune", "--init",
                 str(tmp_path / "slim"), *settings, "--out", out])  # fmt: skip
    printed, err = capsys.readouterr()
    assert code == 0, err
    config = cnnpress.load(Path(out) / "model.cnnp").cnnpress_method["config"]
    assert (config["criterion"], config["scope"], config["ratio"]) == ("bn", "global", 0.5)
    total = 3 * (8 + 16 + 32)  # the width-8 ResNet-20's block-internal channels
    assert sum(config["channels"].values()) >= total - round(0.5 * total)
    assert json.loads(printed)["ratio_payload"] > 1.0
    code = main(["compress", "--method", "filter_prune", "--resume", "--out", out,
                 "--set", "ratio=0.3"])  # fmt: skip
    _, err = capsys.readouterr()
    assert code == 2 and "cannot change on --resume" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("bad", ["ratio", "=0.5", "ratio=[0.5"])
def test_set_needs_key_equals_yaml_value(tmp_path, capsys, bad):
    code = main(["compress", "--model", "lenet5", "--data", "synthetic", "--method", "bwn",
                 "--set", bad, "--out", str(tmp_path / "r")])  # fmt: skip
    _, err = capsys.readouterr()
    assert code == 2 and "--set" in err and len(err.strip().splitlines()) == 1
