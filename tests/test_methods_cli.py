"""Every registered method runs end to end through the CLI: compress, train, file, evaluate."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import cnnpress
from cnnpress.cli.main import main

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
    code = main(["evaluate", str(tmp_path / method / "model.cnnp"), "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    # the accuracy measured from the loaded file is the one the run reported
    assert json.loads(out)["accuracy"] == pytest.approx(result["test_accuracy"], abs=0.5)
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
