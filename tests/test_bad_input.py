"""Bad input a user can give: every case is one line and exit status 2, never a traceback."""

from __future__ import annotations

import numpy as np
import pytest

import cnnpress
from cnnpress.cli.main import main
from cnnpress.data import load_dataset
from cnnpress.errors import ConfigError
from cnnpress.train.config import TrainConfig


def one_line_error(capsys, *argv: str) -> str:
    """Run the CLI; assert it failed as a user error (status 2, one line); that line."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert code == 2, (code, out, err)
    assert err.startswith("cnnpress: error: ") and err.count("\n") == 1, err
    return err


# --- 1. recipe and method settings of the wrong type ---------------------------------------


@pytest.mark.parametrize(
    ("recipe", "needles"),
    [
        ("train: {lr: fast}", ["lr", "'fast'", "a number"]),
        ('train: {epochs: "ten"}', ["epochs", "'ten'", "an integer"]),
        ("train: {epochs: true}", ["epochs", "True", "an integer"]),
        ("train: {momentum: [0.9]}", ["momentum", "[0.9]", "a number"]),
        ("train: {bn_recalibrate: some}", ["bn_recalibrate", "'some'", "an integer"]),
        ("train: many", ["train", "'many'", "a mapping"]),
        ("model_args: {width: many}", ["width", "'many'", "an integer"]),
        ("model_args: {width: -3}", ["width", "-3", "positive"]),
        ("model_args: {num_classes: many}", ["num_classes", "data set"]),
        ("model_args: wide", ["model_args", "'wide'", "a mapping"]),
        ("data_options: {num_classes: many}", ["num_classes", "'many'", "integer"]),
        ("data_options: many", ["data_options", "'many'", "a mapping"]),
        ("data: [synthetic]", ["data", "['synthetic']", "a string"]),
        ("init: 3", ["init", "3", "a string"]),
    ],
)
def test_recipe_value_of_the_wrong_type_is_one_line(tmp_path, capsys, recipe, needles):
    path = tmp_path / "r.yaml"
    body = {"model": "resnet20", "data": "synthetic"}
    lines = [f"{k}: {v}" for k, v in body.items() if not recipe.startswith(f"{k}:")]
    path.write_text("\n".join([*lines, recipe]) + "\n")
    err = one_line_error(capsys, "train", "--recipe", str(path), "--out", str(tmp_path / "o"))
    for needle in needles:
        assert needle in err


@pytest.mark.parametrize(
    ("method", "settings", "needles"),
    [
        ("slbf", {"num_filters": "many"}, ["num_filters", "'many'", "an integer"]),
        ("slbf", {"slice_channels": True}, ["slice_channels", "True", "an integer"]),
        ("slbf", {"include_first": "many"}, ["include_first", "'many'", "true or false"]),
        ("slbf", {"layers": "many"}, ["layers", "'many'", "a mapping"]),
        ("slbf", {"layers": {"layer1.*": {"num_filters": "x"}}}, ["num_filters", "'x'"]),
        ("slbf", {"scale": 1}, ["scale", "true, false or null"]),
        ("kmeans", {"iterations": True}, ["iterations", "True", "an integer"]),
        ("kmeans", {"entropy": "yes"}, ["entropy", "'yes'", "true or false"]),
        ("pq", {"seed": 1.5}, ["seed", "1.5", "an integer"]),
        ("filter_prune", {"channels": {"conv1": "all"}}, ["channels", "'all'"]),
        ("magnitude_prune", {"prune_epochs": True}, ["prune_epochs", "True", "an integer"]),
        ("lowrank", {"ranks": {"layer1.0.conv1": ["a", 2]}}, ["ranks", "'a'"]),
        ("bwn", {"layers": ["conv1"]}, ["layers", "a mapping"]),
    ],
)
def test_method_setting_of_the_wrong_type_names_field_value_and_type(method, settings, needles):
    net = cnnpress.models.create("resnet20", 1, 10, width=8)
    with pytest.raises(ConfigError) as info:
        cnnpress.compress(net, method, **settings)
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message


def test_bad_method_setting_from_the_command_line_is_one_line(tmp_path, capsys):
    err = one_line_error(
        capsys, "compress", "--model", "resnet20", "--data", "synthetic", "--method", "slbf",
        "--set", "layers=many", "--out", str(tmp_path / "o"),
    )  # fmt: skip
    assert "layers must be a mapping" in err


@pytest.mark.parametrize("value", [True, "10", 10.0, None])
def test_bools_and_words_are_not_integers_in_the_training_config(value):
    with pytest.raises(ConfigError, match="epochs must be an integer"):
        TrainConfig(epochs=value)


# --- 2-4. evaluate, predict and summary: data, files and flags that do not fit the model -----


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    """Small untrained ResNet-20 files: for Fashion-MNIST (1x28x28, 10 classes), for the
    default synthetic set (1x16x16, 4 classes) and for 3-channel synthetic images."""
    from cnnpress.data import get_spec
    from cnnpress.data.synthetic import synthetic_spec

    folder = tmp_path_factory.mktemp("models")
    files = {}
    for name, channels, classes, spec in [
        ("fmnist", 1, 10, get_spec("fashion-mnist")),
        ("synthetic", 1, 4, synthetic_spec()),
        ("rgb", 3, 4, synthetic_spec(3, 16, 4)),
    ]:
        net = cnnpress.models.create("resnet20", channels, classes, width=4)
        net.cnnpress_dataset = spec.to_dict()
        files[name] = str(folder / f"{name}.cnnp")
        cnnpress.save(net, files[name])
    return files


@pytest.mark.parametrize(
    ("model", "data", "needles"),
    [
        ("synthetic", "fashion-mnist", ["1x16x16", "4 classes", "1x28x28", "10 classes"]),
        ("fmnist", "synthetic", ["1x28x28", "10 classes", "1x16x16", "4 classes"]),
        ("rgb", "synthetic", ["3x16x16", "1x16x16"]),
        ("fmnist", "cifar10", ["1x28x28", "3x32x32"]),
    ],
)
def test_evaluate_on_data_the_model_does_not_take_names_both_shapes(
    capsys, model_files, model, data, needles
):
    err = one_line_error(capsys, "evaluate", model_files[model], "--data", data)
    for needle in needles:
        assert needle in err


def test_the_data_check_is_in_the_library(model_files):
    from cnnpress.data import get_spec
    from cnnpress.train.fits import DataMismatchError, check_fits

    net = cnnpress.load(model_files["synthetic"])
    check_fits(net, get_spec("synthetic"))
    with pytest.raises(DataMismatchError, match="4 classes.*10 classes"):
        check_fits(net, get_spec("mnist"))


@pytest.mark.parametrize("size", ["0", "-3"])
def test_evaluate_batch_size_below_one_is_one_line(capsys, model_files, size):
    err = one_line_error(capsys, "evaluate", model_files["synthetic"], "--batch-size", size)
    assert "batch size must be a positive integer" in err and size in err


@pytest.mark.parametrize(
    ("array", "needle"),
    [
        (np.full((2, 16, 16), 300, np.int64), "0..255"),
        (np.full((2, 16, 16), -1, np.int16), "0..255"),
        (np.zeros((2, 16, 16), np.complex64), "complex"),
        (np.full((16, 16), "a"), "text"),
        (np.zeros((2, 16, 16), bool), "true/false"),
        (np.zeros((2, 16, 16), "M8[s]"), "dates"),
        (np.full((2, 16, 16), np.nan, np.float32), "NaN"),
        (np.full((2, 16, 16), 200.0), "[0, 1]"),
    ],
)
def test_predict_on_a_npy_of_the_wrong_dtype_is_one_line(
    tmp_path, capsys, model_files, array, needle
):
    np.save(tmp_path / "x.npy", array)
    err = one_line_error(capsys, "predict", model_files["synthetic"], str(tmp_path / "x.npy"))
    assert needle in err


def test_predict_takes_wider_integers_in_pixel_range(tmp_path, capsys, model_files):
    np.save(tmp_path / "x.npy", np.full((2, 16, 16), 255, np.int64))
    assert main(["predict", model_files["synthetic"], str(tmp_path / "x.npy"), "--json"]) == 0


@pytest.mark.parametrize(
    ("shape", "needle"),
    [
        ("1,x,28", "three positive integers"),
        ("0,28,28", "three positive integers"),
        ("28", "three positive integers"),
        ("1,28,28,1", "three positive integers"),
        ("3,28,28", "1-channel"),
        ("1,100000,100000", "too large"),
    ],
)
def test_summary_with_a_malformed_input_shape_is_one_line(capsys, model_files, shape, needle):
    err = one_line_error(capsys, "summary", model_files["fmnist"], f"--input-shape={shape}")
    assert needle in err


@pytest.mark.parametrize("command", [["evaluate"], ["summary"], ["export", "--onnx", "x.onnx"]])
def test_a_folder_without_a_model_says_so(tmp_path, capsys, command):
    folder = tmp_path / "some_dir"
    folder.mkdir()
    err = one_line_error(capsys, command[0], f"{folder}/", *command[1:])
    assert "is a folder with no model.cnnp or checkpoint.safetensors" in err


@pytest.mark.parametrize("data", ["fashion-mnist", "cifar10"])
def test_a_plain_file_as_data_dir_says_so(tmp_path, capsys, model_files, data):
    plain = tmp_path / "plain"
    plain.write_text("not a folder")
    with pytest.raises(cnnpress.CnnpressError, match="is a file, not a folder"):
        load_dataset(data, "test", plain)
    err = one_line_error(capsys, "evaluate", model_files["fmnist"], "--data-dir", str(plain))
    assert f"{plain} is a file, not a folder" in err
