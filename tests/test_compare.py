"""`cnnpress compare`: cached and resumable runs, measured from their files, one report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from matplotlib.figure import Figure

import cnnpress
from cnnpress.cli.main import main
from cnnpress.compare import _plot_curves, load_recipe, pareto_front, run_comparison, table
from cnnpress.errors import ConfigError
from cnnpress.format import read_info

RECIPE = {
    "name": "tiny",
    "description": "Two epochs on synthetic data.",
    "model": "resnet20",
    "model_args": {"width": 4},
    "data": "synthetic",
    "data_options": {"num_samples": 64},
    "save": {"float_bits": 16, "fold_batchnorm": True, "entropy": True},
    "train": {"epochs": 1, "batch_size": 32, "lr": 0.05},
    "runs": [
        {"name": "fp32"},
        {
            "name": "slbf",
            "method": "slbf",
            "method_config": {"slice_channels": 4, "num_filters": 4},
            "init": "fp32",
        },
        {"name": "bwn", "method": "bwn", "init": "fp32", "distill": {"teacher": "fp32"}},
        {"name": "thin", "model_args": {"width": 2}},
        {"name": "bwn-int8", "method": "bwn", "init": "fp32", "activations": {"bits": 8}},
    ],
}


def write(tmp_path: Path, recipe: dict) -> str:
    recipe = {**recipe, "out": str(tmp_path / "runs")}
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compare")
    recipe = write(tmp, RECIPE)
    report = tmp / "report"
    # --allow-dirty: the suite also runs on a developer's tree with uncommitted changes
    argv = ["compare", recipe, "--threads", "1", "--report", str(report), "--json"]
    assert main([*argv, "--allow-dirty"]) == 0
    return tmp, recipe, report


def test_report_holds_one_record_per_run_measured_from_its_file(compared):
    tmp, _, report = compared
    result = json.loads((report / "results.json").read_text())
    runs = {r["run"]: r for r in result["runs"]}
    assert list(runs) == ["fp32", "slbf", "bwn", "thin", "bwn-int8"]
    for name, r in runs.items():
        info = read_info(tmp / "runs" / name / "model.cnnp")
        assert r["file_bytes"] == info["file_bytes"]
        # one yardstick: the fp32 baseline's parameter bytes over this file's bytes
        assert r["ratio"] == pytest.approx(runs["fp32"]["fp32_bytes"] / r["file_bytes"])
        assert 0.0 <= r["accuracy"] <= 100.0
        assert r["latency_b1"] > 0 and r["latency_b64"] > 0
    assert runs["fp32"]["ratio"] < 1.1 < runs["bwn"]["ratio"]
    assert runs["thin"]["ratio_own_fp32"] < 1.1 < runs["thin"]["ratio"]  # smaller than fp32
    # The recipe's `save:` applies to every compressed run, and the file says so.
    manifest = read_info(tmp / "runs" / "slbf" / "model.cnnp")["manifest"]
    assert manifest["float_bits"] == 16 and manifest["fold_batchnorm"] is True
    assert runs["slbf"]["start"] == "trained weights" and runs["bwn"]["start"].endswith("+ KD")
    assert runs["slbf"]["init_accuracy"] is not None  # measured before fine-tuning
    assert [e for e, _ in runs["slbf"]["curve"]] == [-1, 0]
    assert [e for e, _ in runs["slbf"]["train_curve"]] == [0]
    # SLBF reports what training changed in its bank and selections; BWN reports nothing
    (learned,) = runs["slbf"]["learning"]
    assert learned["epoch"] == 0 and len(learned["layers"]) == 18
    assert learned["bits_flipped"] == sum(v["bits_flipped"] for v in learned["layers"].values())
    assert runs["bwn"]["learning"] == []
    # a run with integer activations is measured as its file runs: the integer program
    assert runs["bwn-int8"]["activations"] == "int8" and runs["bwn"]["activations"] == "float32"
    q = cnnpress.load(tmp / "runs" / "bwn-int8" / "model.cnnp")
    assert q.cnnpress_activations["bits"] == 8
    md = (report / "results.md").read_text()
    assert "Two epochs on synthetic data." in md and md.count("\n| ") == 6
    assert (report / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_finished_runs_are_not_trained_again(compared):
    _, recipe, _ = compared

    def train_run(cfg):
        raise AssertionError(f"trained {cfg['out']} again")

    result = run_comparison(recipe, train_run, measure=lambda done: [d[0] for d in done])
    assert result["runs"] == ["fp32", "slbf", "bwn", "thin", "bwn-int8"]


def test_changed_settings_of_a_finished_run_are_refused(compared, tmp_path):
    tmp, _, _ = compared
    changed = json.loads(json.dumps(RECIPE))
    changed["runs"][1]["method_config"] = {"slice_channels": 4, "num_filters": 8}
    recipe = {**changed, "out": str(tmp / "runs")}
    path = tmp_path / "changed.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(ConfigError, match="'slbf' .* other settings"):
        run_comparison(path, lambda cfg: {}, measure=None)


def test_an_interrupted_run_resumes_and_train_only_shares_split_the_work(tmp_path, capsys):
    recipe = write(tmp_path, {**RECIPE, "runs": RECIPE["runs"][:2]})
    assert main(["compare", recipe, "--runs", "fp32", "--train-only", "--threads", "1"]) == 0
    runs = tmp_path / "runs"
    assert (runs / "fp32" / "result.json").is_file() and not (runs / "slbf").exists()
    # A partial comparison reports the finished runs and names the rest.
    argv = ["compare", recipe, "--runs", "fp32", "--threads", "1", "--allow-dirty"]
    assert main([*argv, "--report", str(tmp_path / "part")]) == 0
    assert "not finished, not reported: slbf" in capsys.readouterr().out
    part = json.loads((tmp_path / "part" / "results.json").read_text())
    assert [r["run"] for r in part["runs"]] == ["fp32"] and part["missing"] == ["slbf"]
    assert (
        "Not finished, so not in this report: slbf."
        in (tmp_path / "part" / "results.md").read_text()
    )
    # Interrupt the slbf run after its checkpoint (drop what a finished run leaves).
    assert main(["compare", recipe, "--runs", "slbf", "--train-only", "--threads", "1"]) == 0
    first = json.loads((runs / "slbf" / "result.json").read_text())
    for name in ("result.json", "model.cnnp"):
        (runs / "slbf" / name).unlink()
    assert main(["compare", recipe, "--threads", "1", "--json", "--allow-dirty"]) == 0
    again = json.loads((runs / "slbf" / "result.json").read_text())
    assert again["test_accuracy"] == first["test_accuracy"]  # resumed: nothing retrained
    assert (runs / "results.json").is_file()


def test_unknown_run_names_and_bad_recipes_get_one_line(tmp_path, capsys):
    recipe = write(tmp_path, RECIPE)
    assert main(["compare", recipe, "--runs", "nope", "--train-only"]) == 2
    assert "no run named nope" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**RECIPE, "out": "x", "runs": [{"name": "a", "methd": "slbf"}]}))
    assert main(["compare", str(bad)]) == 2
    assert "unknown key(s) ['methd']" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="not found"):
        load_recipe(tmp_path / "missing.yaml")


def test_pareto_front_and_table():
    points = [(1.0, 93.0), (10.0, 92.0), (10.0, 90.0), (100.0, 91.0), (50.0, 85.0)]
    assert pareto_front(points) == [0, 1, 3]
    records = [
        {"run": "a", "method": "fp32", "accuracy": 93.0, "file_bytes": 1000, "ratio": 1.0,
         "macs": 4e7, "binary_macs": 0, "latency_b1": 1e-3, "latency_b64": 2e-2},
        {"run": "b", "method": "slbf", "accuracy": 91.5, "file_bytes": 10, "ratio": 100.0,
         "macs": 4e7, "binary_macs": 3e7, "latency_b1": 1e-3, "latency_b64": 2e-2},
    ]  # fmt: skip
    text = table(records)
    assert "| b | slbf |" in text and "-1.50" in text and "100.0x" in text


def test_a_run_from_a_file_is_measured_not_trained_and_serves_as_init(compared, tmp_path):
    tmp, _, _ = compared
    recipe = {
        **RECIPE,
        "runs": [
            {"name": "given", "file": str(tmp / "runs" / "fp32" / "model.cnnp")},
            {"name": "bwn", "method": "bwn", "init": "given", "distill": {"teacher": "given"}},
        ],
    }
    path = write(tmp_path, recipe)
    resolved = dict(load_recipe(path)["resolved"])
    assert resolved["bwn"]["init"] == resolved["given"]["file"]
    assert resolved["bwn"]["distill"]["teacher"] == resolved["given"]["file"]
    trained = []

    def train_run(cfg):
        trained.append(cfg["out"])
        return {}

    result = run_comparison(path, train_run, measure=lambda done: [d[0] for d in done])
    assert result["runs"] == ["given", "bwn"] and trained == [resolved["bwn"]["out"]]


def test_the_plot_draws_each_trained_runs_test_and_training_curves():
    records = [
        {"run": "fp32", "curve": [[0, 80.0], [1, 90.0]], "train_curve": [[0, 75.0], [1, 92.0]]},
        {"run": "slbf", "curve": [[-1, 10.0], [0, 70.0]], "train_curve": [[0, 60.0]]},
        {"run": "from-a-file", "curve": [], "train_curve": []},  # not trained here: no curve
    ]
    ax = Figure().subplots()
    _plot_curves(ax, records)
    lines = [(list(line.get_xdata()), list(line.get_ydata())) for line in ax.lines]
    assert lines == [
        ([1, 2], [80.0, 90.0]),
        ([1, 2], [75.0, 92.0]),
        ([0, 1], [10.0, 70.0]),  # epoch 0: before training
        ([1], [60.0]),
    ]
