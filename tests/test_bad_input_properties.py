"""Property tests: recipes, method settings and manifests with values of any type and range
give cnnpress's own one-line errors (``CnnpressError``) or work, never another exception."""

from __future__ import annotations

import dataclasses
import json
import struct
import zlib

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cnnpress
from cnnpress import methods
from cnnpress.cli.commands import resolve_config
from cnnpress.cli.main import build_parser
from cnnpress.errors import CnnpressError
from cnnpress.format.container import _assemble
from cnnpress.methods.base import config_from_dict
from cnnpress.train.config import TrainConfig

FAST = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

# Values of every JSON/YAML kind, ranges included that no setting allows. Integers stay small
# or absurdly large: a valid mid-sized one (a width of 300) is allowed and merely slow.
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 40),
    st.sampled_from([10**6, 2**31, 10**12, 2**63, -(10**9)]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
)
values = st.one_of(
    scalars,
    st.lists(scalars, max_size=3),
    st.dictionaries(st.text(max_size=6), scalars, max_size=3),
)


def settings_of(cls: type) -> st.SearchStrategy[dict]:
    """Dicts of ``cls``'s fields (and now and then an unknown key) set to any values."""
    keys = st.one_of(
        st.sampled_from([f.name for f in dataclasses.fields(cls)]), st.text(max_size=4)
    )
    return st.dictionaries(keys, values, max_size=4)


def only_cnnpress_errors(call, *args, **kwargs):
    try:
        call(*args, **kwargs)
    except CnnpressError as err:
        assert "\n" not in str(err)


@FAST
@given(train=settings_of(TrainConfig))
def test_train_settings_of_any_type_give_cnnpress_errors_only(train):
    only_cnnpress_errors(TrainConfig.from_dict, train)


@FAST
@given(data=st.data())
def test_method_settings_of_any_type_give_cnnpress_errors_only(data):
    name = data.draw(st.sampled_from(methods.names()))
    config = methods.get(name).Config
    only_cnnpress_errors(config_from_dict, config, data.draw(settings_of(config)))


@pytest.fixture(scope="module")
def tiny_net():
    return cnnpress.models.create("resnet20", 1, 10, width=2)


@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_compress_with_settings_of_any_type_gives_cnnpress_errors_only(tiny_net, data):
    name = data.draw(st.sampled_from(methods.names()))
    config = methods.get(name).Config
    chosen = data.draw(settings_of(config))
    if data.draw(st.booleans()):  # and per-layer overrides
        chosen["layers"] = {data.draw(st.sampled_from(["layer1.*", "*", "fc", "x"])): chosen.copy()}
    if chosen.get("target_size") is not None or chosen.get("target_ratio") is not None:
        chosen.pop("target_size", None), chosen.pop("target_ratio", None)  # the planner is slow
    only_cnnpress_errors(cnnpress.compress, tiny_net, name, **chosen)


RECIPE_KEYS = ["model", "model_args", "data", "data_dir", "data_options", "train", "method",
               "method_config", "distill", "init", "out"]  # fmt: skip


@settings(max_examples=40, deadline=None)
@given(recipe=st.dictionaries(st.sampled_from(RECIPE_KEYS), values, max_size=5))
def test_recipes_of_any_type_give_cnnpress_errors_only(tmp_path_factory, recipe):
    path = tmp_path_factory.mktemp("recipe") / "r.yaml"
    path.write_text(yaml.safe_dump({"model": "resnet20", "data": "synthetic", **recipe}))
    for command, with_method in (("train", False), ("compress", True)):
        args = build_parser().parse_args([command, "--recipe", str(path)])
        try:
            cfg = resolve_config(args, with_method)
            model = cfg["model"]
            if model in cnnpress.models.names():
                cnnpress.models.check_args(model, cfg.get("model_args") or {})
        except CnnpressError as err:
            assert "\n" not in str(err)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    torch.manual_seed(0)
    net = cnnpress.models.create("resnet20", 1, 10, width=4)
    out = {"fp32": folder / "fp32.cnnp", "slbf": folder / "slbf.cnnp"}
    out["format 1"] = cnnpress.pretrained.path("resnet20-fmnist")
    cnnpress.save(net, out["fp32"])
    cnnpress.save(cnnpress.compress(net, "slbf", slice_channels=4, num_filters=4), out["slbf"])
    return out


def _parts(path):
    data = path.read_bytes()
    version, length = struct.unpack_from("<HI", data, 8)
    manifest = json.loads(zlib.decompress(data[14 : 14 + length]))
    return manifest, data[14 + length : -4], version


def _places(manifest):
    """Where a value may be changed: the top level, the architecture, the method and its
    config (those of them that are still mappings)."""
    method = manifest.get("method")
    config = method.get("config") if isinstance(method, dict) else None
    mappings = [manifest, manifest.get("arch"), method, config]
    return [(m, k) for m in mappings if isinstance(m, dict) for k in [*m, None]]


@FAST
@given(data=st.data())
def test_manifests_with_values_of_any_type_give_format_errors_only(files, tmp_path, data):
    manifest, body, version = _parts(files[data.draw(st.sampled_from(sorted(files)))])
    for _ in range(data.draw(st.integers(1, 3))):
        places = _places(manifest)
        target, key = places[data.draw(st.integers(0, len(places) - 1))]
        if key is None:  # a key of its own
            key = data.draw(st.text(max_size=5))
        target[key] = data.draw(values)
    bad = tmp_path / "bad.cnnp"
    bad.write_bytes(_assemble(manifest, body, version))
    only_cnnpress_errors(cnnpress.load, bad)
    only_cnnpress_errors(cnnpress.format.read_info, bad)
