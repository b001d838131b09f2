"""Time of one SLBF training step over one fp32 step, measured side by side in one run.

The two models alternate step by step on the same batches (so machine noise hits both), and
the ratio of medians is reported. Writes JSON with the command, commit and machine.

    python benchmarks/step_time.py --out benchmarks/results/step_time.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

import cnnpress
from cnnpress.data import Loader, load_dataset
from cnnpress.provenance import (
    ALLOW_DIRTY_HELP,
    require_clean_or_exit,
    script_provenance,
    write_result,
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--slice-channels", type=int, default=8)
    p.add_argument("--num-filters", type=int, default=16)
    p.add_argument("--out", default=None)
    p.add_argument("--allow-dirty", action="store_true", help=ALLOW_DIRTY_HELP)
    args = p.parse_args()
    require_clean_or_exit(args.allow_dirty or not args.out)  # a results file: clean tree
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_dataset(args.data, "train")
    spec = data.spec
    batches = iter(Loader(data, args.batch_size, train=True))
    torch.manual_seed(0)
    fp32 = cnnpress.models.create(args.model, spec.in_channels, spec.num_classes)
    slbf = cnnpress.compress(
        fp32, "slbf", slice_channels=args.slice_channels, num_filters=args.num_filters
    )
    nets = {"fp32": fp32.train(), "slbf": slbf.train()}
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for k, m in nets.items()}
    times: dict[str, list[float]] = {k: [] for k in nets}
    for step in range(args.warmup + args.steps):
        x, y = next(batches)
        for name, net in nets.items():
            t0 = time.perf_counter()
            loss = F.cross_entropy(net(x), y)
            opts[name].zero_grad(set_to_none=True)
            loss.backward()
            opts[name].step()
            if step >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        **script_provenance(args.out, args.allow_dirty),
        "model": args.model,
        "batch_size": args.batch_size,
        "slice_channels": args.slice_channels,
        "num_filters": args.num_filters,
        "steps": args.steps,
        "median_step_seconds": med,
        "slbf_over_fp32": med["slbf"] / med["fp32"],
    }
    print(json.dumps(result, indent=1))
    write_result(args.out, result)


if __name__ == "__main__":
    main()
