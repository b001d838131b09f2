"""Inference latency of SLBF through the fused CPU kernel, side by side with dense convs.

Per layer (3x3, stride 1, padding 1; c = n, m = n/8, d = 8): the SLBF layer through the kernel
against PyTorch's dense conv of the same effective filters (``to_dense``). Per model (SLBF
ResNet-20 and VGG-small, m = n/8 per layer, input 3x32x32): the SLBF model through the kernel,
its dense reconstruction (``cnnpress.runtime.to_dense``) and the fp32 model. Every comparison
runs its contenders in turn, round after round, and takes medians (the machine is shared), at
each batch size and thread count. Operation counts stand beside the times: dense MACs
``n*c*k*k*H*W`` against SLBF's ``m*c*k*k*H*W`` binary-weight MACs plus ``n*s*H*W`` adds, and
each speed-up is given as a fraction of the ``n/m`` limit. Medians of wall-clock time
(``ms``) and of the process's CPU time (``cpu_ms``, all threads) are both kept: on a busy
machine the CPU times are the steadier view at one thread.

    python benchmarks/latency.py --out benchmarks/results/latency.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

import cnnpress
from cnnpress import kernel
from cnnpress.methods.slbf import SLBFConv2d, set_path
from cnnpress.provenance import (
    ALLOW_DIRTY_HELP,
    require_clean_or_exit,
    script_provenance,
    write_result,
)
from cnnpress.runtime import to_dense

#: (channels, image side) of the 3x3 layers of ResNet-20 and VGG-16 on 32x32 inputs.
LAYERS = [(16, 32), (32, 16), (64, 8), (64, 32), (128, 16), (256, 8), (512, 4), (512, 2)]
MODELS = ["resnet20", "vgg_small"]


def side_by_side(
    fns: dict[str, Callable[[torch.Tensor], Any]],
    x: torch.Tensor,
    budget: float,
    min_reps: int,
    max_reps: int,
    warmups: int = 2,
) -> tuple[dict[str, float], dict[str, float]]:
    """Median wall and CPU seconds (all threads) of each ``fn(x)``, run in turn round after
    round after ``warmups`` calls each."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    with torch.inference_mode():
        for fn in fns.values():
            for _ in range(warmups):
                fn(x)
        start = time.perf_counter()
        while True:
            for name, fn in fns.items():
                c0, t0 = time.process_time(), time.perf_counter()
                fn(x)
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
            reps = len(times[next(iter(times))])
            if reps >= max_reps or (reps >= min_reps and time.perf_counter() - start > budget):
                break
    return (
        {name: statistics.median(v) for name, v in times.items()},
        {name: statistics.median(v) for name, v in cpu.items()},
    )


def layer_ops(c: int, n: int, m: int, d: int, k: int, pixels: int) -> dict[str, int]:
    """Dense MACs against SLBF bank MACs and merge adds, for one image."""
    return {
        "dense_macs": n * c * k * k * pixels,
        "slbf_binary_macs": m * c * k * k * pixels,
        "slbf_adds": n * (c // d) * pixels,
    }


def bench_layers(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for batch in args.batches:
            for c, hw in args.layers:
                n, d, m = c, args.slice_channels, max(2, c // args.ratio)
                torch.manual_seed(0)
                layer = SLBFConv2d(c, n, 3, padding=1, slice_channels=d, num_filters=m).eval()
                layer.path = "kernel"
                dense = to_dense(layer)
                x = torch.randn(batch, c, hw, hw)
                sec, cpu = side_by_side(
                    {"slbf_kernel": layer, "dense_conv": dense},
                    x,
                    args.budget,
                    args.min_reps,
                    args.max_reps,
                )
                ops = layer_ops(c, n, m, d, 3, hw * hw)
                speedup = sec["dense_conv"] / sec["slbf_kernel"]
                op_limit = ops["dense_macs"] / (ops["slbf_binary_macs"] + ops["slbf_adds"])
                rows.append(
                    {
                        "layer": f"{c}->{n} 3x3 @ {hw}x{hw}",
                        "c": c,
                        "n": n,
                        "m": m,
                        "d": d,
                        "hw": hw,
                        "batch": batch,
                        "threads": threads,
                        "ms": {k: round(v * 1e3, 4) for k, v in sec.items()},
                        "cpu_ms": {k: round(v * 1e3, 4) for k, v in cpu.items()},
                        "speedup_vs_dense": round(speedup, 3),
                        "cpu_speedup_vs_dense": round(cpu["dense_conv"] / cpu["slbf_kernel"], 3),
                        "ops_per_image": ops,
                        "op_count_limit": round(op_limit, 3),
                        "n_over_m": n / m,
                        "fraction_of_n_over_m": round(speedup / (n / m), 3),
                        "plan": kernel.plan(layer, (batch, c, hw, hw)),
                    }
                )
                print_row(rows[-1], args.console)
    return rows


def slbf_model(arch: str, args: argparse.Namespace) -> tuple[nn.Module, nn.Module]:
    """The fp32 model and its SLBF version with m = n/ratio (at least 2) in every layer."""
    torch.manual_seed(0)
    fp32 = cnnpress.models.create(arch, 3, 10).eval()
    convs = [(name, mod) for name, mod in fp32.named_modules() if isinstance(mod, nn.Conv2d)]
    layers = {name: {"num_filters": max(2, mod.out_channels // args.ratio)} for name, mod in convs}
    layers.pop(convs[0][0])  # the first conv stays fp32 (default rule)
    slbf = cnnpress.compress(
        fp32, "slbf", slice_channels=args.slice_channels, num_filters=16, layers=layers
    ).eval()
    set_path(slbf, "kernel")
    return fp32, slbf


def bench_models(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for arch in args.models:
        fp32, slbf = slbf_model(arch, args)
        dense = to_dense(slbf)
        cost = {}
        for name, model in (("fp32", fp32), ("slbf", slbf)):
            totals = cnnpress.summary(model, input_shape=(3, 32, 32)).totals
            cost[name] = {k: int(totals[k]) for k in ("macs", "binary_macs", "adds")}
        slbf_ops = sum(cost["slbf"].values())
        for threads in args.threads:
            torch.set_num_threads(threads)
            for batch in args.model_batches:
                x = torch.randn(batch, 3, 32, 32)
                sec, cpu = side_by_side(
                    {"slbf_kernel": slbf, "dense_reconstruction": dense, "fp32": fp32},
                    x,
                    args.budget,
                    args.min_reps,
                    args.max_reps,
                    warmups=1,
                )
                rows.append(
                    {
                        "model": arch,
                        "batch": batch,
                        "threads": threads,
                        "ms": {k: round(v * 1e3, 4) for k, v in sec.items()},
                        "cpu_ms": {k: round(v * 1e3, 4) for k, v in cpu.items()},
                        "speedup_vs_fp32": round(sec["fp32"] / sec["slbf_kernel"], 3),
                        "cpu_speedup_vs_fp32": round(cpu["fp32"] / cpu["slbf_kernel"], 3),
                        "speedup_vs_dense": round(
                            sec["dense_reconstruction"] / sec["slbf_kernel"], 3
                        ),
                        "ops_per_image": cost,
                        "op_count_limit": round(cost["fp32"]["macs"] / slbf_ops, 3),
                    }
                )
                print_row(rows[-1], args.console)
    return rows


def print_row(row: dict[str, Any], console: Console) -> None:
    what = row.get("layer") or row["model"]
    times = "  ".join(f"{k} {v:.3f} ms" for k, v in row["ms"].items())
    ratio = row.get("speedup_vs_fp32", row["speedup_vs_dense"])
    console.log(f"{what}  batch {row['batch']}  threads {row['threads']}: {times}  x{ratio:.2f}")


def tables(result: dict[str, Any], console: Console) -> None:
    t = Table(title="SLBF layer (kernel) vs dense conv of the same filters")
    for col in (
        "layer",
        "m",
        "batch",
        "thr",
        "kernel ms",
        "dense ms",
        "speed-up",
        "cpu-time x",
        "ops limit",
        "of n/m",
    ):
        t.add_column(col, justify="right")
    for r in result["layers"]:
        t.add_row(
            r["layer"],
            str(r["m"]),
            str(r["batch"]),
            str(r["threads"]),
            f"{r['ms']['slbf_kernel']:.3f}",
            f"{r['ms']['dense_conv']:.3f}",
            f"{r['speedup_vs_dense']:.2f}x",
            f"{r['cpu_speedup_vs_dense']:.2f}x",
            f"{r['op_count_limit']:.2f}x",
            f"{r['fraction_of_n_over_m']:.0%}",
        )
    console.print(t)
    t = Table(title="Whole models, input 3x32x32")
    for col in (
        "model",
        "batch",
        "thr",
        "slbf ms",
        "dense-recon ms",
        "fp32 ms",
        "vs fp32",
        "cpu-time vs fp32",
        "vs dense",
        "ops limit",
    ):
        t.add_column(col, justify="right")
    for r in result["models"]:
        ms = r["ms"]
        t.add_row(
            r["model"],
            str(r["batch"]),
            str(r["threads"]),
            f"{ms['slbf_kernel']:.2f}",
            f"{ms['dense_reconstruction']:.2f}",
            f"{ms['fp32']:.2f}",
            f"{r['speedup_vs_fp32']:.2f}x",
            f"{r['cpu_speedup_vs_fp32']:.2f}x",
            f"{r['speedup_vs_dense']:.2f}x",
            f"{r['op_count_limit']:.2f}x",
        )
    console.print(t)


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=ints, default=[1, 64], help="per-layer batch sizes")
    p.add_argument("--model-batches", type=ints, default=[1, 64])
    p.add_argument("--threads", type=ints, default=[1, 2])
    p.add_argument("--models", type=lambda s: s.split(",") if s else [], default=MODELS)
    p.add_argument("--no-layers", action="store_true", help="skip the per-layer part")
    p.add_argument("--quick", action="store_true", help="three small layers only (a smoke run)")
    p.add_argument("--ratio", type=int, default=8, help="n/m")
    p.add_argument("--slice-channels", type=int, default=8)
    p.add_argument("--budget", type=float, default=1.0, help="seconds per comparison")
    p.add_argument("--min-reps", type=int, default=3)
    p.add_argument("--max-reps", type=int, default=30)
    p.add_argument("--out", default=None, help="JSON file to write")
    p.add_argument("--allow-dirty", action="store_true", help=ALLOW_DIRTY_HELP)
    args = p.parse_args()
    require_clean_or_exit(args.allow_dirty or not args.out)  # a results file: clean tree
    args.console = Console(stderr=True, width=150)
    args.layers = [] if args.no_layers else (LAYERS[:3] if args.quick else LAYERS)
    info = kernel.status()
    if not info["available"]:
        args.console.print(f"[red]the SLBF kernel is not available: {info['reason']}")
        sys.exit(1)
    threads_before = torch.get_num_threads()
    result = {
        **script_provenance(args.out, args.allow_dirty),
        "kernel": {k: v for k, v in info.items() if k != "build_directory"},  # a local path
        "load_average_before": os.getloadavg(),
        "settings": {
            "ratio_n_over_m": args.ratio,
            "slice_channels": args.slice_channels,
            "budget_s": args.budget,
            "min_reps": args.min_reps,
        },
        "layers": bench_layers(args),
        "models": bench_models(args),
    }
    torch.set_num_threads(threads_before)
    result["load_average_after"] = os.getloadavg()
    tables(result, args.console)
    if args.out is None:
        print(json.dumps(result, indent=1))
    write_result(args.out, result)


if __name__ == "__main__":
    main()
