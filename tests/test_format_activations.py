"""Activation quantization in the .cnnp file (format 4): it round-trips, older files still
load without it, and a malformed record (or a data set's mean/std) is refused in one line."""

from __future__ import annotations

import json
import struct
import sys
import zlib
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cnnpress
from cnnpress.data import get_spec
from cnnpress.format import FORMAT_VERSION, FormatError, load, read_info, save
from cnnpress.format.container import _assemble
from cnnpress.format.validate import MAX_ACTIVATION_TENSORS


def _lenet() -> torch.nn.Module:
    torch.manual_seed(0)
    return cnnpress.models.create("lenet5", 1, 10).eval()


def _node_names(model: torch.nn.Module) -> list[str]:
    return [n.name for n in torch.fx.symbolic_trace(model).graph.nodes]


def _activations(model: torch.nn.Module, bits: int = 8) -> dict:
    names = _node_names(model)
    top = 2 ** (bits - 1) - 1
    return {
        "bits": bits,
        "observer": "minmax",
        "tensors": {n: [0.01 * (i + 1), (i * 37) % (2 * top + 2) - top - 1]
                    for i, n in enumerate(names)},
    }  # fmt: skip


def _parts(path: Path) -> tuple[dict, bytes, int]:
    """Manifest, what follows it (payload and checksum block) and version of a file."""
    data = path.read_bytes()
    version, length = struct.unpack_from("<HI", data, 8)
    return json.loads(zlib.decompress(data[14 : 14 + length])), data[14 + length : -4], version


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A LeNet-5 saved with 8-bit activations and one saved with none (plus its data set)."""
    folder = tmp_path_factory.mktemp("act")
    net = _lenet()
    paths = {"act": folder / "act.cnnp", "plain": folder / "plain.cnnp"}
    save(net, paths["act"], activations=_activations(net))
    save(net, paths["plain"], dataset=get_spec("mnist").to_dict())
    return paths


def _edited(files, tmp_path, edit, source="act", version=None) -> Path:
    manifest, body, old = _parts(files[source])
    edit(manifest)
    bad = tmp_path / "bad.cnnp"
    bad.write_bytes(_assemble(manifest, body, old if version is None else version))
    return bad


def test_activations_round_trip_and_make_a_format_4_file(files):
    net = _lenet()
    model = load(files["act"])
    assert model.cnnpress_activations == _activations(net)
    assert read_info(files["act"])["manifest"]["activations"] == _activations(net)
    assert _parts(files["act"])[2] == FORMAT_VERSION == 4
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x), net(x))


def test_the_model_attribute_is_the_default_and_the_keyword_overrides_it(tmp_path):
    net = _lenet()
    net.cnnpress_activations = _activations(net, bits=4)
    save(net, tmp_path / "a.cnnp")
    assert load(tmp_path / "a.cnnp").cnnpress_activations == _activations(net, bits=4)
    save(net, tmp_path / "b.cnnp", activations=_activations(net, bits=8))
    assert load(tmp_path / "b.cnnp").cnnpress_activations["bits"] == 8


def test_a_file_without_activations_stays_format_3_and_loads_with_none(files):
    assert _parts(files["plain"])[2] == 3
    model = load(files["plain"])
    assert model.cnnpress_activations is None
    assert "activations" not in read_info(files["plain"])["manifest"]
    assert model.cnnpress_storage == {"float_bits": 32, "fold_batchnorm": False, "entropy": False}


@pytest.mark.parametrize("version", [2, 3])
def test_older_format_files_still_load_without_activations(files, tmp_path, version):
    manifest, body, _ = _parts(files["plain"])
    if version < 3:  # format 2 has no per-array checksum block
        body = body[: len(body) - 2 * manifest["count"]]
    old = tmp_path / f"v{version}.cnnp"
    old.write_bytes(_assemble(manifest, body, version))
    model = load(old)
    assert model.cnnpress_activations is None
    x = torch.randn(1, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x), _lenet()(x))


def test_a_version_past_4_is_refused(files, tmp_path):
    with pytest.raises(FormatError, match="format version 5 is newer"):
        load(_edited(files, tmp_path, lambda m: None, version=5))


def test_the_zero_point_range_ends_load(files, tmp_path):
    for bits, ends in ((8, (-128, 127)), (4, (-8, 7))):
        acts = {
            "bits": bits,
            "observer": "mse",
            "tensors": {"x": [1, ends[0]], "y": [1e-9, ends[1]]},
        }
        model = load(_edited(files, tmp_path, lambda m, a=acts: m.__setitem__("activations", a)))
        assert model.cnnpress_activations == acts


def _acts(**changes):
    """An edit that records valid 8-bit activations with ``changes`` over them."""
    acts = {"bits": 8, "observer": "minmax", "tensors": {"x": [0.5, 0], "conv1": [0.1, -3]}}
    for key, value in changes.items():
        if value is _DROP:
            del acts[key]
        else:
            acts[key] = value
    return lambda m: m.__setitem__("activations", acts)


def _tensor(pair):
    return _acts(tensors={"x": [0.5, 0], "conv1": pair})


_DROP = object()
_MANY = {f"n{i}": [1.0, 0] for i in range(MAX_ACTIVATION_TENSORS + 1)}

MALFORMED = [
    (lambda m: m.__setitem__("activations", [8, "minmax"]), "activations must be a mapping"),
    (lambda m: m.__setitem__("activations", "int8"), "activations must be a mapping"),
    (_acts(bits=16), "bits must be 8 or 4"),
    (_acts(bits=True), "bits must be 8 or 4"),
    (_acts(bits=8.0), "bits must be 8 or 4"),
    (_acts(bits="8"), "bits must be 8 or 4"),
    (_acts(bits=_DROP), "bits must be 8 or 4"),
    (_acts(observer=3), "observer must be a name"),
    (_acts(observer=""), "observer must be a name"),
    (_acts(observer="x" * 65), "observer must be a name"),
    (_acts(observer=_DROP), "observer must be a name"),
    (_acts(tensors=[["x", 0.5, 0]]), "tensors must be a mapping"),
    (_acts(tensors=None), "tensors must be a mapping"),
    (_acts(tensors=_MANY), "is more than 100,000"),
    (_acts(tensors={"": [0.5, 0]}), "is no node name"),
    (_acts(tensors={"x" * 300: [0.5, 0]}), "is no node name"),
    (_tensor(0.5), "must be [scale, zero_point]"),
    (_tensor([0.5]), "must be [scale, zero_point]"),
    (_tensor([0.5, 0, 1]), "has bits 1, not 8 or 4"),
    (_tensor([0.5, 0, 8, 1]), "must be [scale, zero_point]"),
    (_tensor([0.5, -100, 4]), "not an integer from -8 to 7"),
    (_tensor({"scale": 0.5, "zero_point": 0}), "must be [scale, zero_point]"),
    (_tensor([0.0, 0]), "has scale 0.0"),
    (_tensor([-0.5, 0]), "has scale -0.5"),
    (_tensor([float("nan"), 0]), "has scale nan"),
    (_tensor([float("inf"), 0]), "has scale inf"),
    (_tensor([10**400, 0]), "not a finite number > 0"),
    (_tensor([True, 0]), "has scale True"),
    (_tensor(["0.5", 0]), "has scale '0.5'"),
    (_tensor([None, 0]), "has scale None"),
    (_tensor([0.5, 128]), "zero point 128, not an integer from -128 to 127"),
    (_tensor([0.5, -129]), "zero point -129"),
    (_tensor([0.5, 1.0]), "zero point 1.0"),
    (_tensor([0.5, False]), "zero point False"),
    (_tensor([0.5, "0"]), "zero point '0'"),
    (_acts(bits=4, tensors={"x": [0.5, 8]}), "zero point 8, not an integer from -8 to 7"),
    (_acts(bits=4, tensors={"x": [0.5, -9]}), "zero point -9"),
]


@pytest.mark.parametrize(("edit", "needle"), MALFORMED)
def test_malformed_activations_are_refused_in_one_line(files, tmp_path, edit, needle):
    bad = _edited(files, tmp_path, edit)
    for read in (load, read_info):
        with pytest.raises(FormatError) as info:
            read(bad)
        message = str(info.value)
        assert needle in message and "\n" not in message, message


def test_malformed_activations_are_refused_at_save_and_nothing_is_written(tmp_path):
    net = _lenet()
    with pytest.raises(FormatError, match="zero point 300"):
        save(net, tmp_path / "a.cnnp", activations={"bits": 8, "observer": "minmax",
                                                     "tensors": {"x": [0.5, 300]}})  # fmt: skip
    net.cnnpress_activations = {"bits": 2, "observer": "minmax", "tensors": {}}
    with pytest.raises(FormatError, match="bits must be 8 or 4"):
        save(net, tmp_path / "a.cnnp")
    assert not (tmp_path / "a.cnnp").exists()


def _dataset(key, value):
    def edit(m):
        if value is _DROP:
            del m["dataset"][key]
        else:
            m["dataset"][key] = value

    return edit


BAD_DATASETS = [
    (_dataset("mean", "abc"), "dataset mean must be a list"),
    (_dataset("mean", 0.13), "dataset mean must be a list"),
    (_dataset("mean", []), "dataset mean must be a list"),
    (_dataset("mean", {"0": 0.1}), "dataset mean must be a list"),
    (_dataset("mean", [0.1] * 2000), "dataset mean must be a list"),
    (_dataset("std", None), "dataset std must be a list"),
    (_dataset("std", "0.3"), "dataset std must be a list"),
    (_dataset("mean", ["x"]), "dataset mean value 'x' is not a finite number"),
    (_dataset("mean", [None]), "dataset mean value None"),
    (_dataset("mean", [True]), "dataset mean value True"),
    (_dataset("mean", [float("nan")]), "dataset mean value nan"),
    (_dataset("std", [[0.3]]), "dataset std value [0.3] is not a positive number"),
    (_dataset("std", [0]), "dataset std value 0 is not a positive number"),
    (_dataset("std", [0.0]), "dataset std value 0.0"),
    (_dataset("std", [-0.3]), "dataset std value -0.3"),
    (_dataset("std", [float("inf")]), "dataset std value inf"),
    (_dataset("mean", [0.1, 0.2]), "dataset mean has 2 values for 1 channels"),
    (_dataset("std", [0.3, 0.3, 0.3]), "dataset std has 3 values for 1 channels"),
]


@pytest.mark.parametrize(("edit", "needle"), BAD_DATASETS)
def test_a_dataset_with_a_bad_mean_or_std_is_refused_in_one_line(files, tmp_path, edit, needle):
    bad = _edited(files, tmp_path, edit, source="plain")
    for read in (load, read_info):
        with pytest.raises(FormatError) as info:
            read(bad)
        message = str(info.value)
        assert needle in message and "\n" not in message, message


def test_a_dataset_without_mean_and_std_or_in_channels_still_loads(files, tmp_path):
    def edit(m):
        del m["dataset"]["mean"], m["dataset"]["std"]

    assert "mean" not in load(_edited(files, tmp_path, edit, source="plain")).cnnpress_dataset
    no_channels = _edited(files, tmp_path, _dataset("in_channels", _DROP), source="plain")
    assert load(no_channels).cnnpress_dataset["mean"] == [0.1307]


json_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-300, 300),
        st.sampled_from([2**31, 10**400, -(2**63)]),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=4),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
)
junk_activations = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {
            "bits": st.one_of(st.sampled_from([4, 8]), json_values),
            "observer": json_values,
            "tensors": st.dictionaries(st.text(max_size=4), json_values, max_size=3),
        }  # fmt: skip
    ),
    st.fixed_dictionaries(
        {
            "bits": st.sampled_from([4, 8]),
            "observer": st.sampled_from(["minmax", "mse"]),
            "tensors": st.dictionaries(
                st.text(min_size=1, max_size=4),
                st.tuples(
                    st.one_of(st.floats(), st.integers(-2, 2), json_values),
                    st.one_of(st.integers(-130, 130), json_values),
                ),
                max_size=3,
            ),
        }  # fmt: skip
    ),
)


def _valid(acts) -> bool:
    """Independent of the validator: what a well-formed record is."""
    if acts is None:  # no record: the file loads with none
        return True
    if not isinstance(acts, dict) or acts.get("bits") not in (4, 8):
        return False
    if type(acts["bits"]) is not int or type(acts.get("observer")) is not str:
        return False
    if not 1 <= len(acts["observer"]) <= 64 or not isinstance(acts.get("tensors"), dict):
        return False
    half = 2 ** (acts["bits"] - 1)
    for name, pair in acts["tensors"].items():
        if not name or not isinstance(pair, list) or len(pair) != 2:
            return False
        scale, zero = pair
        if type(scale) not in (int, float) or not 0 < scale <= sys.float_info.max:
            return False
        if type(zero) is not int or not -half <= zero < half:
            return False
    return True


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(acts=junk_activations)
def test_any_activations_record_loads_as_written_or_gives_one_format_error(files, tmp_path, acts):
    acts = json.loads(json.dumps(acts))  # as the manifest holds it (tuples become lists)
    bad = _edited(files, tmp_path, lambda m: m.__setitem__("activations", acts))
    try:
        model = load(bad)
    except FormatError as err:
        assert "\n" not in str(err)
        assert not _valid(acts), f"a valid record was refused: {err}"
    else:
        assert _valid(acts), f"an invalid record loaded: {acts!r}"
        assert json.dumps(model.cnnpress_activations) == json.dumps(acts)
