"""The integer-inference tables of the results page (docs/results.md) are what
``benchmarks/int8.py --table`` makes of the committed ``benchmarks/results/int8.json``, row for
row; its boards tables, after their marker comment, what ``benchmarks/boards.py --table`` makes
of ``benchmarks/results/boards.json`` (once it is committed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import load_benchmark

ROOT = Path(__file__).resolve().parents[1]
RESULTS_PAGE = ROOT / "docs" / "results.md"


def test_the_results_page_holds_the_int8_tables_of_the_committed_json():
    tables = load_benchmark("int8").tables(str(ROOT / "benchmarks" / "results" / "int8.json"))
    assert tables.count("\n| ") >= 5  # two tables (headers, rules), two rows each
    assert tables in RESULTS_PAGE.read_text()


BOARDS_JSON = ROOT / "benchmarks" / "results" / "boards.json"


@pytest.mark.skipif(not BOARDS_JSON.exists(), reason="no boards results committed yet")
def test_the_results_page_holds_the_boards_tables_of_the_committed_json():
    boards = load_benchmark("boards")
    tables = boards.tables(str(BOARDS_JSON))
    page = RESULTS_PAGE.read_text()
    assert boards.MARKER in page
    assert tables in page.split(boards.MARKER, 1)[1]


def test_the_boards_tables_show_the_overflow_and_the_layers_of_the_synthetic_m3(tmp_path):
    boards = load_benchmark("boards")
    common = {"method": "fp32", "activations": "int8", "flash_bytes": 290_000, "accuracy": 93.8}
    layers = [{"layer": "conv1", "instructions": 1000}, {"layer": "fc", "instructions": 20}]
    rows = [
        {"board": "lm3s6965evb", "real_part": True, "model": "fp32", **common, "fits": False,
         "overflow_bytes": {"FLASH": 27_856}, "ram_linked_bytes": 30_000},
        {"board": "mps2-an385", "real_part": False, "model": "fp32", **common, "fits": True,
         "ram_bytes": 29_000, "instructions": 1_030, "instructions_per_mac": 0.5,
         "per_layer": layers, "per_layer_sum": 1_020},
        {"board": "mps2-an385", "real_part": False, "model": "slbf-50x-kd", **common,
         "method": "slbf", "fits": True, "ram_bytes": 9_000, "instructions": 530,
         "instructions_per_mac": 0.25, "per_layer": layers[1:], "per_layer_sum": 20},
    ]  # fmt: skip
    (tmp_path / "boards.json").write_text(json.dumps({"rows": rows}))
    tables = boards.tables(str(tmp_path / "boards.json")).splitlines()
    assert tables[2] == (
        "| lm3s6965evb | fp32 | fp32 | int8 | no: FLASH +27,856 | 290,000 | 30,000 linked | - "
        "| - | 93.80% |"
    )
    assert tables[3].startswith("| mps2-an385 (not a real part) | fp32 | fp32 | int8 | yes |")
    assert tables[3].endswith("| 290,000 | 29,000 | 1,030 | 0.50 | 93.80% |")
    assert (
        tables[6]
        == "| layer (int8, instructions on mps2-an385) | fp32 (dense) | slbf-50x-kd (slbf) |"
    )
    assert tables[8:] == [
        "| conv1 | 1,000 | - |",
        "| fc | 20 | 20 |",
        "| sum of the layers | 1,020 | 20 |",
        "| per inference (built without the hook) | 1,030 | 530 |",
    ]


def test_the_results_page_states_the_demo_figures_of_the_committed_json():
    demo = json.loads((ROOT / "benchmarks" / "results" / "demo.json").read_text())
    page = (ROOT / "docs" / "results.md").read_text()
    fp32, small = demo["fp32"], demo["compressed"]
    assert f"{fp32['test_accuracy']:.2f}% -> {small['test_accuracy']:.2f}% test accuracy" in page
    assert f"{fp32['file_bytes']:,} -> {small['file_bytes']:,} bytes ({small['ratio']:.1f}x" in page
    assert f"{demo['wall_seconds']['total']:.0f} s in all" in page
