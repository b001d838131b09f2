"""The demo (docs/results.md), measured: what ``make demo`` runs, timed, and its files measured.

``make demo`` runs ``cnnpress compress --recipe recipes/demo.yaml --out runs/demo`` and then
``cnnpress summary runs/demo``. This script runs the same two commands (as
``python -m cnnpress``, in the repository root, into ``--run-dir``), times each, then measures
from the files: test accuracy of the shipped fp32 model (``pretrained:resnet20-fmnist``) and of
the compressed ``model.cnnp`` on the full Fashion-MNIST test split, both file sizes and the
ratio (fp32 parameter bytes over the file's bytes, as cnnpress reports it). Writes JSON with
the command, commit, machine, thread count and load average::

    python benchmarks/demo.py --out benchmarks/results/demo.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import cnnpress
from cnnpress.data import DatasetSpec, Loader, load_dataset
from cnnpress.format import read_info
from cnnpress.pretrained import resolve
from cnnpress.provenance import (
    ALLOW_DIRTY_HELP,
    require_clean_or_exit,
    script_provenance,
    write_result,
)
from cnnpress.train.loop import evaluate

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "recipes/demo.yaml"
FP32 = "pretrained:resnet20-fmnist"


def run(argv: list[str]) -> float:
    """Run ``python -m cnnpress ARGV`` in the repository root; its wall seconds."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "cnnpress", *argv], cwd=ROOT, check=True)
    return time.perf_counter() - t0


def measure(path: Path) -> dict[str, Any]:
    """Test accuracy, file bytes and ratio of one model file, from the file."""
    model = cnnpress.load(path)
    spec = DatasetSpec.from_dict(model.cnnpress_dataset)
    test = Loader(load_dataset(spec.name, "test"), 500, train=False)
    info = read_info(path)
    s = cnnpress.summary(
        model,
        (spec.in_channels, *spec.image_size),
        float_bits=info["manifest"].get("float_bits", 32),
    )
    s.attach_file(info)
    return {
        "file_bytes": info["file_bytes"],
        "fp32_bytes": s.file["fp32_bytes"],
        "ratio": s.file["ratio"],
        "test_accuracy": evaluate(model, test)["accuracy"],
        "test_images": len(test.dataset),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", type=Path, help="the demo's run folder (default: a temporary one)")
    p.add_argument("--threads", type=int, default=2, help="threads for measuring the files")
    p.add_argument("--out", type=Path, help="JSON file to write")
    p.add_argument("--allow-dirty", action="store_true", help=ALLOW_DIRTY_HELP)
    args = p.parse_args(argv)
    require_clean_or_exit(args.allow_dirty or not args.out)  # a results file: clean tree
    tmp = None if args.run_dir else tempfile.mkdtemp(prefix="cnnpress-demo-")
    run_dir = (args.run_dir or Path(tmp) / "demo").resolve()
    try:
        shutil.rmtree(run_dir, ignore_errors=True)  # `make demo`: rm -rf runs/demo
        load_before = os.getloadavg()
        compress_s = run(["compress", "--recipe", RECIPE, "--out", str(run_dir)])
        summary_s = run(["summary", str(run_dir)])
        load_after = os.getloadavg()
        run_result = json.loads((run_dir / "result.json").read_text())
        torch.set_num_threads(args.threads)
        before = measure(resolve(FP32))
        after = measure(run_dir / "model.cnnp")
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    command = ["benchmarks/demo.py", *(sys.argv[1:] if argv is None else argv)]
    result = {
        **script_provenance(args.out, args.allow_dirty, command),
        "demo": [
            f"cnnpress compress --recipe {RECIPE} --out DIR",
            "cnnpress summary DIR",
        ],
        "demo_threads": run_result["machine"]["torch_threads"],
        "demo_commit": run_result["commit"],
        "cores": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": load_after,
        "wall_seconds": {
            "compress": round(compress_s, 1),
            "summary": round(summary_s, 1),
            "total": round(compress_s + summary_s, 1),
        },
        "train_seconds_in_run": run_result.get("train_seconds"),
        "fp32": {"model": FP32, **before},
        "compressed": after,
        "accuracy_change": round(after["test_accuracy"] - before["test_accuracy"], 2),
        "file_ratio": before["file_bytes"] / after["file_bytes"],
        "in_run": {
            "test_accuracy": run_result.get("test_accuracy"),
            "init_test_accuracy": run_result.get("init_test_accuracy"),
            "file_bytes": run_result.get("file_bytes"),
            "ratio": run_result.get("ratio"),
        },
    }
    print(json.dumps(result, indent=1))
    write_result(args.out, result)


if __name__ == "__main__":
    main()
