"""Collect finished training runs into one results JSON and a markdown table.

For each run folder: writes ``model.cnnp`` from its last checkpoint if the run predates the
.cnnp writer, measures test accuracy FROM THE LOADED FILE, and reads sizes from the real file.

    python benchmarks/collect_runs.py runs/fmnist-resnet20-fp32 runs/fmnist-resnet20-slbf-a \
        --out benchmarks/results/fmnist-resnet20.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

import cnnpress
from cnnpress.api import load_model
from cnnpress.data import DatasetSpec, Loader, load_dataset
from cnnpress.format import read_info
from cnnpress.provenance import (
    ALLOW_DIRTY_HELP,
    require_clean_or_exit,
    script_provenance,
    write_result,
)
from cnnpress.train.loop import evaluate


def collect(run: Path) -> dict:
    result = json.loads((run / "result.json").read_text())
    history = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x]
    cnnp = run / "model.cnnp"
    if not cnnp.exists():
        model, meta = load_model(run / "checkpoint.safetensors")
        prov = {k: result[k] for k in ("command", "commit", "machine")}
        prov["test_accuracy"] = result["test_accuracy"]
        cnnpress.save(model, cnnp, dataset=meta["dataset"], provenance=prov)
    model = cnnpress.load(cnnp)
    spec = DatasetSpec.from_dict(model.cnnpress_dataset)
    test = load_dataset(spec.name, "test")
    accuracy = evaluate(model, Loader(test, 500, train=False))["accuracy"]
    info = read_info(cnnp)
    summary = cnnpress.summary(model, (spec.in_channels, *spec.image_size))
    summary.attach_file(info)
    record = {
        "run": run.name,
        "command": result["command"],
        "commit": result["commit"],
        "machine": result["machine"],
        "model": result["model"],
        "method": result["method"],
        "method_config": result.get("method_config"),
        "epochs": result["epochs"],
        "train_minutes": sum(h.get("epoch_seconds", 0) for h in history) / 60,  # not epoch -1
        "test_accuracy_in_run": result["test_accuracy"],
        "test_accuracy_from_file": accuracy,
        "test_accuracy_by_epoch": [h.get("test_accuracy") for h in history],
        "fp32_bytes": summary.file["fp32_bytes"],
        "file_bytes": info["file_bytes"],
        "header_bytes": info["header_bytes"],
        "header_share": summary.file["header_share"],
        "ratio_file": summary.file["ratio"],
        "ratio_payload": summary.file["payload_ratio"],
        "compressed_layers_ratio": summary.totals["compressed_ratio"],
    }
    if result["method"] == "slbf":
        from cnnpress.methods.slbf import describe

        record["bank_usage"] = describe(model)
    return record


def table(records: list[dict]) -> str:
    fp32 = next((r for r in records if r["method"] == "fp32"), None)
    lines = [
        "| run | test acc. (file) | vs fp32 | epochs | train time | file bytes | header | "
        "ratio (file) | compressed convs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        delta = r["test_accuracy_from_file"] - fp32["test_accuracy_from_file"] if fp32 else 0.0
        lines.append(
            f"| {r['run']} | {r['test_accuracy_from_file']:.2f}% | {delta:+.2f} | {r['epochs']} "
            f"| {r['train_minutes']:.0f} min | {r['file_bytes']:,} | "
            f"{100 * r['header_share']:.1f}% | {r['ratio_file']:.1f}x | "
            f"{r['compressed_layers_ratio']:.1f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--out", type=Path)
    p.add_argument("--allow-dirty", action="store_true", help=ALLOW_DIRTY_HELP)
    args = p.parse_args()
    require_clean_or_exit(args.allow_dirty or not args.out)  # a results file: clean tree
    records = [collect(r) for r in args.runs]
    out = {
        **script_provenance(args.out, args.allow_dirty),
        "runs": records,
        "configs": {
            r["run"]: yaml.safe_load((run / "config.yaml").read_text())
            for r, run in zip(records, args.runs, strict=True)
        },
    }
    print(table(records))
    write_result(args.out, out)


if __name__ == "__main__":
    main()
