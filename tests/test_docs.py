"""The documentation: a README of at most 8 KB, and a MkDocs site in docs/ that builds with
``--strict`` (no broken link or anchor, no page missing from the nav)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_the_readme_is_at_most_8000_bytes():
    size = len((ROOT / "README.md").read_bytes())
    assert size <= 8000, f"README.md is {size:,} bytes; move text into docs/"


def nav_pages(nav) -> list[str]:
    """Every page file of mkdocs.yml's nav (a list of pages, titled pages and sections)."""
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, list):
        return [page for item in nav for page in nav_pages(item)]
    if isinstance(nav, dict):
        return [page for value in nav.values() for page in nav_pages(value)]
    raise AssertionError(f"unexpected nav entry {nav!r}")


def test_every_page_of_the_nav_exists():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    docs = ROOT / config.get("docs_dir", "docs")
    pages = nav_pages(config["nav"])
    for page in ("index.md", "guide.md", "concepts.md", "reference.md", "results.md"):
        assert page in pages
    for page in ("architecture.md", "history.md"):
        assert page in pages
    missing = [page for page in pages if not (docs / page).is_file()]
    assert not missing, f"pages in mkdocs.yml's nav but not in {docs}: {missing}"


def test_the_docs_build_strict(tmp_path):
    site = tmp_path / "site"
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert (site / "index.html").is_file()
    assert (site / "results" / "index.html").is_file()
