"""How long the SLBF size-budget planner takes, with its banks clustered from a sample of each
wide layer's slices (the default, ``cnnpress.budget.PLAN_SLICES``) and from all of them.

Both plans run in this one process, side by side, for each model and target ratio; the JSON
records seconds, the planned file bytes, the search objective (sum of the chosen layers'
squared errors, each error measured on every filter) and whether both chose the same
settings::

    python benchmarks/plan_speed.py --threads 1 --out benchmarks/results/plan_speed.json
"""

from __future__ import annotations

import argparse
import time

import torch

import cnnpress
from cnnpress.budget import PLAN_SLICES, plan
from cnnpress.methods.apply import make_config
from cnnpress.provenance import (
    ALLOW_DIRTY_HELP,
    require_clean_or_exit,
    script_provenance,
    write_result,
)

STORAGE = {"float_bits": 8, "fold_batchnorm": True, "entropy": True}


def timed_plan(model: torch.nn.Module, ratio: float, sample: int | None) -> dict:
    config = make_config("slbf", {"target_ratio": ratio, **STORAGE})
    start = time.perf_counter()
    chosen = plan(model, config, sample=sample)
    seconds = time.perf_counter() - start
    return {
        "sample": sample,
        "seconds": round(seconds, 2),
        "file_bytes": chosen.file_bytes,
        "budget": chosen.budget,
        "objective": chosen.error,
        "settings": chosen.overrides(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", default="vgg16,resnet20")
    parser.add_argument("--ratios", default="100,200")
    parser.add_argument("--out", default=None)
    parser.add_argument("--allow-dirty", action="store_true", help=ALLOW_DIRTY_HELP)
    args = parser.parse_args()
    require_clean_or_exit(args.allow_dirty or not args.out)  # a results file: clean tree
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = cnnpress.models.create(name, in_channels=1, num_classes=10)
        for ratio in (float(r) for r in args.ratios.split(",")):
            sampled, full = timed_plan(model, ratio, PLAN_SLICES), timed_plan(model, ratio, None)
            row = {
                "model": name,
                "target_ratio": ratio,
                "sampled": sampled,
                "full": full,
                "speedup": round(full["seconds"] / sampled["seconds"], 2),
                "same_settings": sampled["settings"] == full["settings"],
            }
            rows.append(row)
            print(
                f"{name} {ratio:g}x: sampled {sampled['seconds']:.1f} s "
                f"({sampled['file_bytes']:,} B, objective {sampled['objective']:.3f}), "
                f"all slices {full['seconds']:.1f} s ({full['file_bytes']:,} B, "
                f"objective {full['objective']:.3f}); same settings: {row['same_settings']}",
                flush=True,
            )
    result = {
        **script_provenance(args.out, args.allow_dirty),
        "note": "random initial weights (the planner's speed does not depend on training)",
        "rows": rows,
    }
    write_result(args.out, result)


if __name__ == "__main__":
    main()
