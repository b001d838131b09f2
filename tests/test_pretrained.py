"""The trained model shipped with the package: loads by name, records how it was made."""

from __future__ import annotations

import pytest
import torch

from cnnpress import pretrained
from cnnpress.api import load_model
from cnnpress.cli.main import main
from cnnpress.errors import CnnpressError


def test_shipped_resnet20_loads_by_name_with_its_provenance():
    assert "resnet20-fmnist" in pretrained.names()
    model, meta = load_model("pretrained:resnet20-fmnist")
    assert meta["arch"]["name"] == "resnet20" and meta["method"] is None
    prov = meta["provenance"]
    assert prov["command"].startswith("cnnpress train") and len(prov["commit"]) >= 40
    assert prov["test_accuracy"] > 93.0 and meta["dataset"]["name"] == "fashion-mnist"
    with torch.no_grad():
        out = model(torch.randn(3, 1, 28, 28))
    assert out.shape == (3, 10) and torch.isfinite(out).all()


def test_unknown_pretrained_name_is_one_line(capsys):
    with pytest.raises(CnnpressError, match="no pretrained model 'nope'; shipped: resnet20"):
        pretrained.path("nope")
    assert main(["summary", "pretrained:nope"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
