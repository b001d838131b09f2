"""The command line end to end on the synthetic data set, and its one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cnnpress.cli.main import main


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_train_compress_evaluate_summary(tmp_path, capsys):
    fp32 = str(tmp_path / "fp32")
    code, out, _ = run(
        capsys,
        "train",
        "--model",
        "resnet20",
        "--data",
        "synthetic",
        "--epochs",
        "2",
        "--out",
        fp32,
        "--json",
        "--threads",
        "1",
    )
    assert code == 0
    result = json.loads(out)
    assert result["method"] == "fp32" and result["epochs"] == 2
    assert json.loads((tmp_path / "fp32" / "result.json").read_text()) == result
    assert len((tmp_path / "fp32" / "metrics.jsonl").read_text().splitlines()) == 2

    code, out, _ = run(capsys, "evaluate", fp32, "--json")
    assert code == 0 and json.loads(out)["accuracy"] == pytest.approx(result["test_accuracy"])

    slbf = str(tmp_path / "slbf")
    code, out, _ = run(
        capsys,
        "compress",
        "--method",
        "slbf",
        "--model",
        "resnet20",
        "--data",
        "synthetic",
        "--epochs",
        "1",
        "--init",
        fp32,
        "--slice-channels",
        "4",
        "--num-filters",
        "8",
        "--out",
        slbf,
        "--json",
        "--threads",
        "1",
    )
    assert code == 0
    assert json.loads(out)["method_config"] == {"slice_channels": 4, "num_filters": 8}
    assert json.loads(out)["compressed_layers_ratio"] > 20

    code, out, _ = run(capsys, "summary", slbf, "--json")
    totals = json.loads(out)["totals"]
    assert code == 0 and totals["compressed_layers"] == 18

    # --resume of a finished run trains nothing more and keeps the result
    code, _, err = run(capsys, "compress", "--out", slbf, "--resume", "--threads", "1")
    assert code == 0 and "resuming" in err


def test_recipe_values_are_overridden_by_flags(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "model: lenet5\ndata: synthetic\ntrain: {epochs: 5, lr: 0.01, batch_size: 16}\n"
        "data_options: {num_samples: 64}\n"
    )
    out_dir = tmp_path / "run"
    code, out, _ = run(
        capsys, "train", "--recipe", str(recipe), "--epochs", "1", "--out", str(out_dir), "--json"
    )
    assert code == 0
    r = json.loads(out)
    assert r["train"]["epochs"] == 1 and r["train"]["lr"] == 0.01
    assert "epochs: 1" in (out_dir / "config.yaml").read_text()


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["train", "--model", "resnet21", "--data", "synthetic"], "unknown model 'resnet21'"),
        (
            ["compress", "--method", "zip", "--model", "lenet5", "--data", "synthetic"],
            "unknown method 'zip'",
        ),
        (
            [
                "compress",
                "--method",
                "slbf",
                "--model",
                "resnet20",
                "--data",
                "synthetic",
                "--slice-channels",
                "5",
            ],
            "does not divide",
        ),
        (
            [
                "compress",
                "--method",
                "slbf",
                "--model",
                "resnet20",
                "--data",
                "synthetic",
                "--num-filters",
                "70000",
            ],
            "num_filters",
        ),
        (["train", "--model", "lenet5", "--data", "synthetic", "--epochs", "-1"], "epochs"),
        (
            ["train", "--model", "lenet5", "--data", "fashion-mnist", "--data-dir", "/nonexistent"],
            "/nonexistent",
        ),
        (["train", "--model", "lenet5", "--data", "imagenet"], "imagenet"),
        (["evaluate", "/no/such/run"], "/no/such/run"),
        (
            ["train", "--model", "lenet5", "--data", "synthetic", "--batch-size", "4096"],
            "--batch-size",
        ),
        (["train", "--recipe", "/no/recipe.yaml"], "recipe"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(tmp_path, capsys, argv, needle):
    code, _, err = run(
        capsys, *argv, *([] if argv[0] == "evaluate" else ["--out", str(tmp_path / "x")])
    )
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cnnpress: error:") and needle in lines[0]


def test_existing_run_is_not_overwritten(tmp_path, capsys):
    args = [
        "train",
        "--model",
        "lenet5",
        "--data",
        "synthetic",
        "--epochs",
        "1",
        "--out",
        str(tmp_path / "r"),
    ]
    assert run(capsys, *args)[0] == 0
    before = (tmp_path / "r" / "model.cnnp").read_bytes()
    code, _, err = run(capsys, *args)
    assert code == 2 and "--resume" in err
    assert (tmp_path / "r" / "model.cnnp").read_bytes() == before


def test_python_dash_m_is_the_same_program(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "cnnpress", "train", "--model", "nope", "--data", "synthetic"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("cnnpress: error: unknown model")


def test_file_commands_summary_predict_export(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from cnnpress.data import load_dataset

    run_dir = tmp_path / "run"
    code, out, _ = run(
        capsys,
        "compress",
        "--method",
        "slbf",
        "--model",
        "resnet20",
        "--data",
        "synthetic",
        "--epochs",
        "1",
        "--slice-channels",
        "4",
        "--num-filters",
        "8",
        "--out",
        str(run_dir),
        "--json",
        "--threads",
        "1",
    )
    assert code == 0
    model_file = str(run_dir / "model.cnnp")

    code, out, _ = run(capsys, "summary", model_file, "--json")
    s = json.loads(out)
    assert code == 0 and s["file"]["file_bytes"] == (run_dir / "model.cnnp").stat().st_size
    assert s["file"]["ratio"] == pytest.approx(
        s["totals"]["fp32_bits"] / 8 / s["file"]["file_bytes"]
    )

    test = load_dataset("synthetic", "test")
    np.save(tmp_path / "x.npy", test.images[:5].numpy())
    code, out, _ = run(capsys, "predict", model_file, str(tmp_path / "x.npy"), "--json")
    preds = json.loads(out)["predictions"]
    assert code == 0 and len(preds) == 5 and preds[0]["class"].startswith("class")
    Image.fromarray(test.images[0, 0].numpy()).save(tmp_path / "one.png")
    code, out, _ = run(capsys, "predict", model_file, str(tmp_path / "one.png"), "--json")
    assert code == 0 and json.loads(out)["predictions"][0]["label"] == preds[0]["label"]
    folder = tmp_path / "pngs"  # several inputs, a folder read in name order
    folder.mkdir()
    for i in (2, 0, 1):
        Image.fromarray(test.images[i, 0].numpy()).save(folder / f"img{i}.png")
    npy = str(tmp_path / "x.npy")
    code, out, _ = run(capsys, "predict", model_file, str(folder), npy, "--json")
    many = json.loads(out)["predictions"]
    assert code == 0 and [p["label"] for p in many] == [p["label"] for p in preds[:3] + preds]
    assert [p["file"].rsplit("/", 1)[-1] for p in many[:3]] == ["img0.png", "img1.png", "img2.png"]
    assert [p["index_in_file"] for p in many[3:]] == list(range(5))
    (tmp_path / "empty").mkdir()
    code, _, err = run(capsys, "predict", model_file, str(tmp_path / "empty"))
    assert code == 2 and "no .png" in err and len(err.strip().splitlines()) == 1
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(tmp_path / "big.png")
    code, _, err = run(capsys, "predict", model_file, str(tmp_path / "big.png"))
    assert code == 2 and "1x16x16" in err and len(err.strip().splitlines()) == 1

    onnx_path = tmp_path / "m.onnx"
    code, out, _ = run(capsys, "export", model_file, "--onnx", str(onnx_path), "--json")
    assert code == 0 and onnx_path.stat().st_size == json.loads(out)["bytes"]
    (tmp_path / "junk.cnnp").write_bytes(b"junk")
    code, _, err = run(capsys, "evaluate", str(tmp_path / "junk.cnnp"))
    assert code == 2 and "junk.cnnp" in err


def test_compress_with_a_teacher(tmp_path, capsys):
    base = ["--model", "lenet5", "--data", "synthetic", "--epochs", "1", "--threads", "1"]
    assert run(capsys, "train", *base, "--out", str(tmp_path / "t"))[0] == 0
    code, out, _ = run(capsys, "compress", "--method", "slbf", *base, "--slice-channels", "2",
                       "--teacher", str(tmp_path / "t"), "--kd-alpha", "0.5", "--out",
                       str(tmp_path / "s"), "--json")
    assert code == 0
    assert json.loads(out)["distill"] == {"temperature": 4.0, "alpha": 0.5,
                                         "teacher": str(tmp_path / "t")}
    assert run(capsys, "compress", "--method", "slbf", *base, "--slice-channels", "2", "--out",
               str(tmp_path / "plain"))[0] == 0
    loss = lambda d: json.loads((tmp_path / d / "metrics.jsonl").read_text())["train_loss"]  # noqa: E731
    assert loss("s") != pytest.approx(loss("plain"), rel=1e-3)  # the KD loss was used
    code, _, err = run(capsys, "compress", "--method", "slbf", *base, "--kd-alpha", "0.5",
                       "--out", str(tmp_path / "u"))
    assert code == 2 and "--teacher" in err


def test_slbf_from_trained_weights_distils_from_them_by_default():
    from cnnpress.cli.commands import resolve_config
    from cnnpress.cli.main import build_parser
    from cnnpress.errors import ConfigError

    base = ["compress", "--model", "resnet20", "--data", "synthetic", "--init", "runs/fp32"]

    def cfg(*extra: str) -> dict:
        return resolve_config(build_parser().parse_args([*base, *extra]), with_method=True)

    assert cfg("--method", "slbf")["distill"]["teacher"] == "runs/fp32"
    assert "distill" not in cfg("--method", "slbf", "--no-kd")
    assert cfg("--method", "slbf", "--teacher", "t.cnnp")["distill"]["teacher"] == "t.cnnp"
    assert "distill" not in cfg("--method", "bwn")  # other methods: only when asked
    with pytest.raises(ConfigError, match="--no-kd turns distillation off"):
        cfg("--method", "slbf", "--no-kd", "--teacher", "t.cnnp")
