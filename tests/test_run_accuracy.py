"""A run reports its file's accuracy: ``result.json``'s ``test_accuracy`` and the file's own
provenance are what ``cnnpress evaluate`` measures on the saved ``model.cnnp`` (int8 floats
included); the model in memory's accuracy is kept beside it; the start line of a compression
run says it is the compressed model before fine-tuning."""

from __future__ import annotations

import json

from cnnpress.cli.main import main
from cnnpress.format import read_info


def test_the_run_reports_the_accuracy_of_its_file(tmp_path, capsys):
    fp32 = tmp_path / "fp32"
    argv = ["--model", "lenet5", "--data", "synthetic", "--epochs", "1", "--threads", "1"]
    assert main(["train", *argv, "--out", str(fp32)]) == 0
    out = tmp_path / "bwn"
    code = main(
        ["compress", *argv, "--method", "bwn", "--init", str(fp32), "--int8", "--out", str(out)]
    )
    assert code == 0
    err = capsys.readouterr().err
    assert "as compressed, before fine-tuning  test " in err
    result = json.loads((out / "result.json").read_text())
    assert main(["evaluate", str(out / "model.cnnp"), "--json"]) == 0
    measured = json.loads(capsys.readouterr().out)["accuracy"]
    assert result["test_accuracy"] == measured
    assert read_info(out / "model.cnnp")["manifest"]["provenance"]["test_accuracy"] == measured
    assert isinstance(result["trained_test_accuracy"], float)
