"""Bad input a user can give: every case is one line and exit status 2, never a traceback."""

from __future__ import annotations

import pytest

import cnnpress
from cnnpress.cli.main import main
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
