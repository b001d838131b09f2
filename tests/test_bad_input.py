"""Bad input a user can give: every case is one line and exit status 2, never a traceback."""

from __future__ import annotations

import functools
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import cnnpress
from cnnpress.cli.main import main
from cnnpress.data import load_dataset
from cnnpress.errors import ConfigError
from cnnpress.format import FORMAT_VERSION, FormatError, read_info
from cnnpress.format.container import _assemble
from cnnpress.models.registry import MODELS
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


# --- 5. manifests with absurd values: refused before anything is built -----------------------


def _parts(path):
    """Manifest, payload, per-array checksum block and version of a ``.cnnp`` file."""
    data = Path(path).read_bytes()
    version, length = struct.unpack_from("<HI", data, 8)
    manifest = json.loads(zlib.decompress(data[14 : 14 + length]))
    body = data[14 + length : -4]
    block = 2 * manifest["count"] if version >= 3 else 0
    return manifest, body[: len(body) - block], body[len(body) - block :], version


def _write(path, manifest, payload, block=b"", version=FORMAT_VERSION):
    Path(path).write_bytes(_assemble(manifest, payload + block, version))
    return path


@pytest.fixture(scope="module")
def small_files(tmp_path_factory):
    """An fp32 ResNet-20 (width 8) and SLBF, k-means and PQ compressions of it."""
    folder = tmp_path_factory.mktemp("small")
    torch.manual_seed(0)
    net = cnnpress.models.create("resnet20", 1, 10, width=8)
    files = {"fp32": folder / "fp32.cnnp"}
    cnnpress.save(net, files["fp32"])
    for method, settings in [
        ("slbf", {"slice_channels": 8, "num_filters": 4}),
        ("kmeans", {"bits": 2, "iterations": 1}),
        ("pq", {"bits": 2, "iterations": 1}),
    ]:
        files[method] = folder / f"{method}.cnnp"
        cnnpress.save(cnnpress.compress(net, method, **settings), files[method])
    return files


@pytest.fixture
def nothing_built(monkeypatch):
    """Fail the test if a model is built anywhere but on the meta device (where nothing is
    allocated: the parameter count of ``format.validate``)."""
    for name in cnnpress.models.names():
        factory = MODELS.get(name)

        @functools.wraps(factory)
        def guarded(*args, _factory=factory, **kwargs):
            assert torch.get_default_device().type == "meta", "a model was built"
            return _factory(*args, **kwargs)

        monkeypatch.setitem(MODELS._items, name, guarded)


def _set(*keys):
    def edit(value):
        def apply(m):
            target = m
            for k in keys[:-1]:
                target = target[k]
            target[keys[-1]] = value

        return apply

    return edit


ABSURD = [
    ("fp32", _set("arch", "width")(-3), "width must be positive"),
    ("fp32", _set("arch", "width")("wide"), "width must be an integer"),
    ("fp32", _set("arch", "num_classes")(5_000_000), "num_classes 5000000 is beyond"),
    ("fp32", _set("arch", "in_channels")(100_000), "in_channels 100000 is beyond"),
    ("fp32", _set("arch", "width")(2000), "parameters, more than what a"),
    ("kmeans", _set("arch", "width")(60_000), "parameters, more than the absolute limit"),
    ("fp32", _set("arch", "name")(["resnet20"]), "unknown model"),
    ("fp32", _set("arch", "depth")(1000), "takes no argument(s) depth"),
    ("fp32", _set("float_bits")(True), "unsupported float width"),
    ("fp32", _set("fold_batchnorm")("yes"), "fold_batchnorm must be true or false"),
    ("fp32", _set("dataset")("fashion-mnist"), "dataset must be a mapping"),
    ("fp32", _set("method")("slbf"), "method must be a mapping"),
    ("fp32", _set("count")(10**9), "count must be an integer from 0 to"),
    ("fp32", _set("provenance")({"note": "x" * (9 << 20)}), "inflates to more than"),
    ("slbf", _set("method", "config", "num_filters")(65536), "needs at least"),
    ("slbf", _set("method", "config", "layers", "layer3.0.conv1")({"num_filters": 60000}),
     "needs at least"),
    ("slbf", _set("method", "config", "slice_channels")(True), "slice_channels"),
    ("slbf", _set("method", "config", "target_size")(20_000), "not target_size"),
    ("slbf", _set("method", "config")([1]), "has no config mapping"),
    ("slbf", _set("method", "name")("slbf2"), "unknown method 'slbf2'"),
    ("kmeans", _set("method", "config", "bits")(16), "a codebook of 65,536 values"),
    ("kmeans", _set("method", "config", "iterations")(10**7), "iterations 10000000 is beyond"),
    ("pq", _set("method", "config", "iterations")(10**7), "iterations 10000000 is beyond"),
    ("pq", _set("method", "config", "seed")("x"), "seed must be an integer"),
    ("slbf", _set("coded", "3")(10**9), "the size 1000000000"),
]  # fmt: skip


@pytest.mark.parametrize(("file", "edit", "needle"), ABSURD)
def test_absurd_manifest_values_are_refused_before_building(
    small_files, tmp_path, nothing_built, file, edit, needle
):
    manifest, payload, block, version = _parts(small_files[file])
    edit(manifest)
    if isinstance(manifest.get("count"), int) and manifest["count"] > 1000:
        block = b""  # a count the checksum block cannot match is refused first
    bad = _write(tmp_path / "bad.cnnp", manifest, payload, block, version)
    for read in (cnnpress.load, read_info):
        with pytest.raises(FormatError) as info:
            read(bad)
        message = str(info.value)
        assert needle in message and "\n" not in message, message


def test_a_format_1_array_larger_than_the_payload_is_refused(tmp_path, nothing_built):
    manifest, payload, _, version = _parts(cnnpress.pretrained.path("resnet20-fmnist"))
    assert version == 1
    manifest["arrays"][0][1] = [10**9, 10**9]
    bad = _write(tmp_path / "bad.cnnp", manifest, payload, version=1)
    with pytest.raises(FormatError, match="more elements than the"):
        cnnpress.load(bad)


def test_the_payload_bound_leaves_room_for_the_most_compressed_files(tmp_path):
    """Filter pruning to 1% of VGG-16's filters is the most extreme compression measured
    (532 parameters per payload bit); such a file loads, and so does every small file."""
    from cnnpress.format.validate import PARAMS_PER_BIT, parameter_count

    net = cnnpress.models.create("vgg16", 1, 10)
    pruned = cnnpress.compress(net, "filter_prune", ratio=0.99, float_bits=8, fold_batchnorm=True)
    cnnpress.save(pruned, tmp_path / "p.cnnp")
    info = read_info(tmp_path / "p.cnnp")
    per_bit = parameter_count(info["manifest"]["arch"]) / (8 * info["payload_bytes"])
    assert 100 < per_bit < PARAMS_PER_BIT / 4
    cnnpress.load(tmp_path / "p.cnnp")


# --- 6. a checksum per array ---------------------------------------------------------------


def _flip_a_payload_bit(path, tmp_path, version=None):
    """The file with one payload bit flipped and the file's CRC-32 recomputed."""
    manifest, payload, block, old = _parts(path)
    flipped = payload[:100] + bytes([payload[100] ^ 0x08]) + payload[101:]
    if version is not None and version < 3:
        block = b""
    return _write(tmp_path / "flipped.cnnp", manifest, flipped, block, version or old)


def test_a_flipped_payload_bit_is_caught_when_the_file_checksum_was_recomputed(
    small_files, tmp_path
):
    assert _parts(small_files["slbf"])[3] == 3 and FORMAT_VERSION == 4  # no activations: 3
    bad = _flip_a_payload_bit(small_files["slbf"], tmp_path)
    with pytest.raises(FormatError, match=r"array \d+ \(.+\) does not match its checksum"):
        cnnpress.load(bad)
    with pytest.raises(FormatError, match="does not match its checksum"):
        read_info(bad)


def test_format_2_files_without_array_checksums_still_load(small_files, tmp_path):
    manifest, payload, _, _ = _parts(small_files["slbf"])
    old = _write(tmp_path / "v2.cnnp", manifest, payload, version=2)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(cnnpress.load(old)(x), cnnpress.load(small_files["slbf"])(x))
    assert read_info(old)["checksum_bytes"] == 4
    # what format 3 adds: format 2 has only the file's CRC-32, so this loads (wrongly)
    cnnpress.load(_flip_a_payload_bit(old, tmp_path, version=2))


def test_array_checksums_cost_two_bytes_each_whatever_the_values(small_files, tmp_path):
    net = cnnpress.load(small_files["slbf"])
    sizes = []
    for seed in range(3):  # other values, other checksums: the same file size (budgets)
        torch.manual_seed(seed)
        for p in net.parameters():
            p.data.normal_()
        sizes.append(cnnpress.save(net, tmp_path / f"{seed}.cnnp"))
    info = read_info(tmp_path / "0.cnnp")
    assert len(set(sizes)) == 1 and info["checksum_bytes"] == 4 + 2 * len(info["arrays"])
