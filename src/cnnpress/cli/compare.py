"""``cnnpress compare``: train a comparison recipe's missing runs, then measure and report."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from cnnpress.cli.commands import _set_threads, resume_config, train_config
from cnnpress.compare import load_recipe, measure_runs, run_comparison, write_report
from cnnpress.provenance import require_clean, result_provenance
from cnnpress.train.config import TrainConfig
from cnnpress.train.distributed import DistContext
from cnnpress.train.loop import PLAIN

__all__ = ["cmd_compare"]


def cmd_compare(args: argparse.Namespace, console: Console, err: Console) -> dict:
    """``cnnpress compare``: train the recipe's missing runs, then measure and report all."""
    _set_threads(args.threads)
    if not args.train_only:  # a report will be written: refuse a dirty tree before any work
        load_recipe(args.recipe)  # (a broken recipe is the first thing to say)
        require_clean(args.allow_dirty)
    ctx = DistContext()  # one process; run shares of the recipe side by side with --runs

    def train_run(cfg: dict[str, Any]) -> dict:
        cfg = {**cfg, "train": TrainConfig.from_dict(cfg["train"]).to_dict()}
        cfg.setdefault("method_config", {})
        out = Path(cfg["out"])
        err.print(f"[bold]{out.name}[/bold]: training in {out}")
        if (out / "config.yaml").is_file():  # started before: resume it
            ns = argparse.Namespace(out=str(out), recipe=None, data_dir=cfg.get("data_dir"))
            cfg, resume, changed = resume_config(ns, ctx, err)
            record = train_config(
                cfg, console, err, ctx, new=False, resume=resume, changed=changed, quiet=True
            )
        else:
            record = train_config(cfg, console, err, ctx, quiet=True)
        assert record is not None  # one process: this is rank 0
        return record

    only = {x.strip() for x in args.runs.split(",") if x.strip()} if args.runs else None
    result = run_comparison(
        args.recipe, train_run, None if args.train_only else measure_runs, only=only
    )
    if args.train_only:
        console.print(f"trained: {', '.join(result['trained']) or 'nothing'}", **PLAIN)
        if result["missing"]:
            console.print(f"not finished: {', '.join(result['missing'])}", **PLAIN)
        return result
    result["provenance"] = result_provenance(allow_dirty=args.allow_dirty)  # checked again
    paths = write_report(result, args.report or result["out"])
    if not args.json:
        _print_comparison(console, result["runs"])
        if result["missing"]:
            console.print(f"not finished, not reported: {', '.join(result['missing'])}", **PLAIN)
        console.print("wrote " + ", ".join(str(p) for p in paths.values()), **PLAIN)
    return result


def _print_comparison(console: Console, runs: list[dict[str, Any]]) -> None:
    base = next((r["accuracy"] for r in runs if r["method"] == "fp32"), None)
    t = Table(title="comparison: test accuracy and file size (.cnnp), CPU latency")
    cols = ("run", "start", "epochs", "test acc.", "vs fp32", "file bytes", "ratio", "b=1", "b=64")
    for col in cols:
        t.add_column(col, justify="left" if col in ("run", "start") else "right")
    for r in runs:
        delta = f"{r['accuracy'] - base:+.2f}" if base is not None else "-"
        t.add_row(
            r["run"],
            r.get("start", ""),
            str(r.get("epochs")),
            f"{r['accuracy']:.2f}%",
            delta,
            f"{r['file_bytes']:,}",
            f"{r['ratio']:.1f}x",
            f"{1e3 * r['latency_b1']:.2f} ms",
            f"{1e3 * r['latency_b64']:.1f} ms",
        )
    console.print(t)
