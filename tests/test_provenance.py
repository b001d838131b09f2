"""Results come from a clean tree: a dirty one is refused unless --allow-dirty (recorded)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from cnnpress import provenance
from cnnpress.cli.main import main
from cnnpress.errors import CnnpressError
from helpers import load_benchmark

CLEAN = "0123456789abcdef0123456789abcdef01234567"
DIRTY = CLEAN + "+dirty"
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def tree(monkeypatch):
    """Set the commit the working tree reports."""

    def set_commit(commit):
        monkeypatch.setattr(provenance, "git_commit", lambda: commit)

    return set_commit


def test_a_dirty_tree_is_refused_and_allowed_with_the_flag(tree):
    tree(DIRTY)
    with pytest.raises(CnnpressError, match=r"uncommitted changes .*\+dirty.*--allow-dirty"):
        provenance.require_clean(False)
    with pytest.raises(CnnpressError, match="uncommitted changes"):
        provenance.result_provenance(["cnnpress", "compare"])
    assert provenance.require_clean(True) == DIRTY
    allowed = provenance.result_provenance(["cnnpress", "compare"], allow_dirty=True)
    assert allowed["commit"] == DIRTY and allowed["dirty"] is True
    assert allowed["command"] == "cnnpress compare" and "cores" in allowed["machine"]


def test_a_clean_tree_records_dirty_false_and_no_git_records_none(tree):
    tree(CLEAN)
    assert provenance.require_clean(False) == CLEAN
    assert provenance.result_provenance(["x"])["dirty"] is False
    tree(None)  # not in git (an installed package): nothing to check, nothing claimed
    assert provenance.require_clean(False) is None
    assert provenance.result_provenance(["x"])["dirty"] is None


def test_a_script_result_records_its_command_and_needs_a_clean_tree_only_for_a_file(tree, tmp_path):
    tree(DIRTY)
    argv = ["benchmarks/x.py", "--out", "r.json"]
    with pytest.raises(CnnpressError, match="uncommitted changes"):
        provenance.script_provenance("r.json", False, argv)
    printed = provenance.script_provenance(None, False, argv)  # printed only: not refused
    assert printed["command"] == "python benchmarks/x.py --out r.json" and printed["dirty"]
    out = tmp_path / "deep" / "r.json"
    provenance.write_result(out, {"rows": [1, 2]})
    assert json.loads(out.read_text()) == {"rows": [1, 2]}
    provenance.write_result(None, {"rows": []})  # no file asked for: nothing written


def test_git_commit_reports_this_checkout():
    commit = provenance.git_commit()
    assert commit is None or len(commit.removesuffix("+dirty")) == 40


def _recipe(tmp_path: Path) -> str:
    recipe = {
        "name": "one",
        "model": "resnet20",
        "model_args": {"width": 2},
        "data": "synthetic",
        "data_options": {"num_samples": 32},
        "train": {"epochs": 1, "batch_size": 16, "lr": 0.05},
        "out": str(tmp_path / "runs"),
        "runs": [{"name": "fp32"}],
    }
    path = tmp_path / "one.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def test_compare_refuses_a_dirty_tree_before_any_work_in_one_line(tree, tmp_path, capsys):
    tree(DIRTY)
    recipe, report = _recipe(tmp_path), tmp_path / "report"
    assert main(["compare", recipe, "--threads", "1", "--report", str(report)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cnnpress: error: the git working tree has uncommitted changes")
    assert "--allow-dirty" in err and len(err.splitlines()) == 1
    assert not report.exists() and not (tmp_path / "runs").exists()  # nothing trained


def test_compare_with_allow_dirty_writes_the_report_marked_dirty(tree, tmp_path):
    tree(DIRTY)
    recipe, report = _recipe(tmp_path), tmp_path / "report"
    args = ["compare", recipe, "--threads", "1", "--report", str(report), "--json"]
    assert main([*args, "--allow-dirty"]) == 0
    prov = json.loads((report / "results.json").read_text())["provenance"]
    assert prov["commit"] == DIRTY and prov["dirty"] is True
    # Training alone writes no report and is not refused; a clean tree needs no flag.
    assert main(["compare", recipe, "--train-only", "--threads", "1"]) == 0
    tree(CLEAN)
    assert main(args) == 0
    prov = json.loads((report / "results.json").read_text())["provenance"]
    assert prov["commit"] == CLEAN and prov["dirty"] is False


SCRIPTS = sorted(p.name for p in BENCHMARKS.glob("*.py"))
#: Positional arguments each script needs before it gets to the check.
POSITIONAL = {"collect_runs.py": ["runs/none"], "file_breakdown.py": ["none.cnnp"]}


def test_every_benchmark_script_has_the_check():
    for name in SCRIPTS:
        text = (BENCHMARKS / name).read_text()
        assert "require_clean_or_exit(" in text and "--allow-dirty" in text, name
        assert "script_provenance(" in text and "write_result(" in text, name


@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_scripts_refuse_to_write_results_from_a_dirty_tree(
    name, tree, tmp_path, monkeypatch, capsys
):
    module = load_benchmark(name[:-3])
    tree(DIRTY)
    out = tmp_path / "result.json"
    monkeypatch.setattr(sys, "argv", [name, *POSITIONAL.get(name, []), "--out", str(out)])
    with pytest.raises(SystemExit) as exc:
        module.main()
    assert exc.value.code == 2 and not out.exists()
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: the git working tree has uncommitted changes")
    assert len(err.splitlines()) == 1
