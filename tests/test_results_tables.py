"""The README's integer-inference tables are what ``benchmarks/int8.py --table`` makes of the
committed ``benchmarks/results/int8.json``, row for row."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_readme_holds_the_int8_tables_of_the_committed_json():
    spec = importlib.util.spec_from_file_location("int8_bench", ROOT / "benchmarks" / "int8.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tables = module.tables(str(ROOT / "benchmarks" / "results" / "int8.json"))
    assert tables.count("\n| ") >= 5  # two tables (headers, rules), two rows each
    assert tables in (ROOT / "README.md").read_text()
