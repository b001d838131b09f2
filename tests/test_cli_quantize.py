"""``cnnpress quantize`` end to end on the synthetic data set: the file it writes loads as the
integer model with the activations asked for, its reported sizes and accuracies are the
files' own; ``summary`` shows the activations' width; ``export --c`` of the file is the int8
program, bit-equal to the loaded model; bad input is one line and exit code 2."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import cnnpress
from cnnpress.api import load_model
from cnnpress.cli.main import main
from cnnpress.data import Loader, get_spec, load_dataset
from cnnpress.runtime.quant import QuantizedModel
from test_c_export import CC, needs_cc, run

SHAPE = (1, 16, 16)  # the synthetic data set's images (4 classes)


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def model_file(tmp_path: Path, method: str | None = None) -> Path:
    """A lenet5 for the synthetic data set (``method`` applied), saved with its data set."""
    torch.manual_seed(0)
    model = cnnpress.models.create("lenet5", 1, 4)
    if method is not None:
        model = cnnpress.compress(model, method)
    path = tmp_path / "float.cnnp"
    cnnpress.save(model, path, dataset=get_spec("synthetic").to_dict())
    return path


def accuracy(model: nn.Module) -> float:
    """Top-1 accuracy (%) on the synthetic test split, counted here."""
    correct = total = 0
    with torch.no_grad():
        for x, y in Loader(load_dataset("synthetic", "test"), 100, train=False):
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    return 100.0 * correct / total


@pytest.mark.parametrize(("bits", "observer"), [(8, "mse"), (4, "minmax")])
def test_quantize_writes_the_integer_model(tmp_path, capsys, bits, observer):
    src, out = model_file(tmp_path), tmp_path / "q.cnnp"
    code, stdout, err = cli(
        capsys, "quantize", str(src), "--data", "synthetic", "--bits", str(bits),
        "--observer", observer, "--calibration", "64", "--out", str(out), "--json",
    )  # fmt: skip
    assert code == 0, err
    r = json.loads(stdout)
    q = cnnpress.load(out)
    assert isinstance(q, QuantizedModel) and not q.training
    assert {k: q.cnnpress_activations[k] for k in ("bits", "observer")} == {
        "bits": bits,
        "observer": observer,
    }
    assert isinstance(load_model(out)[0], QuantizedModel)
    assert r["calibration_images"] == 64 and r["after"]["activations"] == f"int{bits}"
    assert r["before"]["file_bytes"] == src.stat().st_size
    assert r["after"]["file_bytes"] == out.stat().st_size < src.stat().st_size
    assert r["before"]["test_accuracy"] == pytest.approx(accuracy(cnnpress.load(src)))
    assert r["after"]["test_accuracy"] == pytest.approx(accuracy(q))
    x = torch.randn(3, *SHAPE)
    with torch.no_grad():  # the integer program: logits on its grid, not the float model's
        assert not torch.equal(q(x), q.float_model(x))

    code, stdout, _ = cli(capsys, "quantize", str(src), "--out", str(out), "--calibration", "8")
    assert code == 0  # --data defaults to the file's; the table names both files
    assert "before:" in stdout and "after:" in stdout and f"int{8}" in stdout


def test_summary_shows_the_activation_width(tmp_path, capsys):
    src, out = model_file(tmp_path), tmp_path / "q.cnnp"
    code, stdout, _ = cli(
        capsys, "quantize", str(src), "--calibration", "32", "--no-eval", "--out", str(out),
        "--json",
    )  # fmt: skip
    assert code == 0 and "test_accuracy" not in json.loads(stdout)["after"]

    code, stdout, _ = cli(capsys, "summary", str(out))
    assert code == 0 and "activations: int8 per tensor (mse observer)" in stdout
    code, stdout, _ = cli(capsys, "summary", str(src))
    assert code == 0 and "activations: float32" in stdout

    code, stdout, _ = cli(capsys, "summary", str(out), "--json")
    q = json.loads(stdout)
    code, stdout, _ = cli(capsys, "summary", str(src), "--json")
    f = json.loads(stdout)
    assert q["activations"] == {"bits": 8, "observer": "mse"} and f["activations"] is None
    # the layers are the float model's, costed as such; the C figures are the int8 program's
    assert [r["name"] for r in q["rows"]] == [r["name"] for r in f["rows"]]
    assert q["totals"]["macs"] == f["totals"]["macs"] > 0
    assert all(r["file_bytes"] > 0 for r in q["rows"])
    assert q["device"]["activations"] == "int8" and f["device"]["activations"] == "float32"
    assert q["device"]["ram_bytes"] < f["device"]["ram_bytes"]


def compile_dir(folder: Path) -> Path:
    """Build the exported sources with the documented command; a failed build fails."""
    sources = sorted(str(p) for p in folder.glob("*.c"))
    prog = folder / "prog"
    cmd = [CC, "-std=c99", "-O2", "-Wall", "-Wextra", "-Werror", *sources, "-lm", "-o", str(prog)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"the C program does not build:\n{done.stderr[:4000]}"
    return prog


@needs_cc
@pytest.mark.parametrize("bits", [8, 4])
def test_export_c_of_a_quantized_file_is_the_integer_program(tmp_path, capsys, bits):
    src, out, c_dir = model_file(tmp_path), tmp_path / "q.cnnp", tmp_path / "c"
    code, _, err = cli(
        capsys, "quantize", str(src), "--bits", str(bits), "--calibration", "64", "--no-eval",
        "--out", str(out),
    )  # fmt: skip
    assert code == 0, err
    code, stdout, err = cli(capsys, "export", str(out), "--c", str(c_dir), "--json")
    assert code == 0, err
    assert json.loads(stdout)["activations"] == f"int{bits}"
    prog = compile_dir(c_dir)
    q = cnnpress.load(out)
    x = torch.randn(5, *SHAPE, generator=torch.Generator().manual_seed(bits))
    with torch.no_grad():
        ref = q(x).numpy()
    got = run(prog, x)
    assert got.shape == (5, 4)
    assert np.array_equal(got, ref)  # bit for bit


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--bits", "3"], "argument --bits: invalid choice: 3"),
        (["--bits", "16"], "argument --bits: invalid choice: 16"),
        (["--observer", "max"], "argument --observer: invalid choice: 'max'"),
        (["--calibration", "0"], "argument --calibration: must be a positive integer"),
        (["--data", "fashion-mnist"], "but fashion-mnist has 1x28x28 images"),
        (["--data", "imagenet"], "unknown dataset 'imagenet'"),
    ],
)
def test_bad_input_is_one_line(tmp_path, capsys, argv, needle):
    src, out = model_file(tmp_path), tmp_path / "q.cnnp"
    code, stdout, err = cli(capsys, "quantize", str(src), *argv, "--out", str(out))
    assert code == 2 and stdout == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("cnnpress: error:")
    assert needle in err and not out.exists()


def test_what_cannot_be_quantized_is_one_line(tmp_path, capsys):
    out = tmp_path / "q.cnnp"
    code, _, err = cli(capsys, "quantize", str(tmp_path / "none.cnnp"), "--out", str(out))
    assert code == 2 and "no such file" in err and len(err.strip().splitlines()) == 1
    src = model_file(tmp_path, "lowrank")  # its layers have no integer kernel
    code, _, err = cli(capsys, "quantize", str(src), "--calibration", "8", "--out", str(out))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith(f"cnnpress: error: cannot quantize {src}: layer conv2")
    assert not out.exists()


def test_quantize_fine_tunes_with_fake_quantized_activations(tmp_path, capsys):
    """``--finetune-epochs 1``: the weights move (the file differs from the one calibrated
    only), progress lines are printed, and the result is still the integer model."""
    src = model_file(tmp_path)
    plain, tuned = tmp_path / "plain.cnnp", tmp_path / "tuned.cnnp"
    base = ("quantize", str(src), "--data", "synthetic", "--bits", "4", "--calibration", "64")
    assert cli(capsys, *base, "--no-eval", "--out", str(plain))[0] == 0
    code, _, err = cli(
        capsys, *base, "--no-eval", "--finetune-epochs", "1", "--lr", "0.01", "--out", str(tuned)
    )
    assert code == 0, err
    assert "fine-tuning step" in err
    q = cnnpress.load(tuned)
    assert isinstance(q, QuantizedModel) and q.cnnpress_activations["bits"] == 4
    assert plain.read_bytes() != tuned.read_bytes()
    code, _, err = cli(capsys, *base, "--finetune-epochs", "-1", "--out", str(tuned))
    assert code == 2 and len(err.strip().splitlines()) == 1


def test_compress_saves_the_run_with_integer_activations(tmp_path, capsys):
    """``compress --activation-bits 8 --qat-epochs 1``: the run's file is the integer model,
    its record holds the file's own (integer) accuracy, and bad settings are one line."""
    out = tmp_path / "run"
    base = ["compress", "--method", "bwn", "--model", "lenet5", "--data", "synthetic"]
    code, stdout, err = cli(
        capsys, *base, "--epochs", "1", "--threads", "1", "--activation-bits", "8",
        "--qat-epochs", "1", "--out", str(out), "--json",
    )  # fmt: skip
    assert code == 0, err
    record = json.loads(stdout)
    q = cnnpress.load(out / "model.cnnp")
    assert isinstance(q, QuantizedModel) and q.cnnpress_activations["bits"] == 8
    assert record["activations"] == {"bits": 8, "observer": "mse", "finetune_epochs": 1}
    assert record["int_test_accuracy"] == pytest.approx(accuracy(q))
    assert "quantization-aware fine-tuning" in err
    code, _, err = cli(capsys, *base, "--activation-bits", "6", "--out", str(tmp_path / "b"))
    assert code == 2 and len(err.strip().splitlines()) == 1
    code, _, err = cli(capsys, *base, "--qat-epochs", "-1", "--out", str(tmp_path / "c"))
    assert code == 2 and "finetune_epochs" in err
