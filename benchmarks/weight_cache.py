"""Inference with the derived weight kept (``cnnpress.methods.cache``) against rebuilding it
on every forward, side by side in one run, beside the fp32 model.

Per method (BWN, BinaryConnect, k-means weight sharing, magnitude pruning) on VGG-16 and
ResNet-20 (1x28x28, Fashion-MNIST's shape; random weights: the time does not depend on
their values), at batch 1 and 64 on one thread: the median time of a forward pass under
``torch.no_grad()`` in eval mode with the weight kept (what ``cnnpress`` does now), and with
it rebuilt each time (``eval()`` before every pass drops the kept copy: the old behaviour),
and the fp32 model's. The contenders run in turn, round after round (the machine is
shared), and every ratio is of times measured in the same rounds.

    python benchmarks/weight_cache.py --out benchmarks/results/weight_cache.json
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import cnnpress
from cnnpress.provenance import (
    ALLOW_DIRTY_HELP,
    require_clean_or_exit,
    script_provenance,
    write_result,
)

SHAPE = (1, 28, 28)
METHODS = ("bwn", "binaryconnect", "kmeans", "magnitude_prune")


def forward(model: torch.nn.Module, x: torch.Tensor, rebuild: bool) -> float:
    """Seconds of one forward pass (with ``rebuild``: the kept weights dropped first)."""
    if rebuild:
        model.eval()
    t0 = time.perf_counter()
    model(x)
    return time.perf_counter() - t0


def measure(arch: str, batch: int, rounds: int) -> dict:
    """Median milliseconds of fp32 and, per method, kept and rebuilt; their ratios."""
    torch.manual_seed(0)
    fp32 = cnnpress.models.create(arch, 1, 10).eval()
    models = {m: cnnpress.compress(fp32, m).eval() for m in METHODS}
    x = torch.randn(batch, *SHAPE)
    contenders = [("fp32", fp32, False)]
    for name, model in models.items():
        contenders += [(f"{name} kept", model, False), (f"{name} rebuilt", model, True)]
    times: dict[str, list[float]] = {name: [] for name, _, _ in contenders}
    with torch.no_grad():
        for r in range(rounds + 2):  # two warm-up rounds
            for name, model, rebuild in contenders:
                seconds = forward(model, x, rebuild)
                if r >= 2:
                    times[name].append(seconds)
    ms = {name: round(1e3 * statistics.median(t), 3) for name, t in times.items()}
    row = {"arch": arch, "batch": batch, "ms": ms}
    row["speedup_kept_over_rebuilt"] = {
        m: round(ms[f"{m} rebuilt"] / ms[f"{m} kept"], 2) for m in METHODS
    }
    row["kept_vs_fp32"] = {m: round(ms["fp32"] / ms[f"{m} kept"], 2) for m in METHODS}
    row["rebuilt_vs_fp32"] = {m: round(ms["fp32"] / ms[f"{m} rebuilt"], 2) for m in METHODS}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None)
    parser.add_argument("--allow-dirty", action="store_true", help=ALLOW_DIRTY_HELP)
    args = parser.parse_args()
    require_clean_or_exit(args.allow_dirty or not args.out)
    provenance = script_provenance(args.out, args.allow_dirty)
    torch.set_num_threads(args.threads)
    rows = []
    for arch in ("vgg16", "resnet20"):
        for batch in (1, 64):
            rows.append(measure(arch, batch, args.rounds))
            print(rows[-1], flush=True)
    write_result(args.out, {**provenance, "threads": args.threads, "rows": rows})


if __name__ == "__main__":
    main()
