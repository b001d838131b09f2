"""The C99 program of ``cnnpress export --c`` beside its ``.cnnp``: flash and RAM from ``size``
of the compiled ``model.o``, logits against the loaded PyTorch model on real Fashion-MNIST
test images, and the time per image of both at batch 1 on one thread, side by side.

The models: the shipped fp32 ResNet-20 (``pretrained:resnet20-fmnist``) and any ``.cnnp``
files given with ``--files`` (for example the trained runs of
``recipes/compare-fmnist-slbf.yaml``)::

    python benchmarks/c_size.py --out benchmarks/results/c_size.json \\
        --files runs/compare-fmnist-slbf/*/model.cnnp

The C time is the program's wall time over all the images (one process, stdin to stdout)
divided by their number; PyTorch's is ``model(x[i:i+1])`` per image with one thread.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import cnnpress
from cnnpress.data import Loader, load_dataset
from cnnpress.pretrained import resolve
from cnnpress.provenance import (
    ALLOW_DIRTY_HELP,
    require_clean_or_exit,
    script_provenance,
    write_result,
)
from cnnpress.runtime import export_c

BUILD = "cc -std=c99 -O2 -Wall -Wextra -Werror *.c -lm -o prog"


def images(count: int) -> tuple[torch.Tensor, np.ndarray]:
    x, y = next(iter(Loader(load_dataset("fashion-mnist", "test"), count, train=False)))
    return x, y.numpy()


def model_o(folder: Path) -> dict[str, int]:
    subprocess.run(
        ["cc", "-std=c99", "-O2", "-c", "model.c", "-o", "model.o"], cwd=folder, check=True
    )
    line = (
        subprocess.run(["size", "model.o"], cwd=folder, capture_output=True, text=True, check=True)
        .stdout.splitlines()[1]
        .split()
    )
    text, data, bss = (int(v) for v in line[:3])
    return {"text": text, "data": data, "bss": bss}


def torch_ms(model: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        model(x[:1])
        start = time.perf_counter()
        for i in range(len(x)):
            model(x[i : i + 1])
    return 1000 * (time.perf_counter() - start) / len(x)


def measure(name: str, cnnp: Path, x: torch.Tensor, labels: np.ndarray, folder: Path) -> dict:
    model = cnnpress.load(cnnp).eval()
    out = folder / name.replace("/", "_").replace(":", "_")
    info = export_c(model, out, tuple(x.shape[1:]))
    subprocess.run(BUILD, shell=True, cwd=out, check=True)
    sizes = model_o(out)
    start = time.perf_counter()
    done = subprocess.run(
        [str(out / "prog")],
        input=x.numpy().astype("<f4").tobytes(),
        capture_output=True,
        check=True,
    )
    c_ms = 1000 * (time.perf_counter() - start) / len(x)
    got = np.frombuffer(done.stdout, dtype="<f4").reshape(len(x), -1)
    with torch.no_grad():
        ref = model(x).numpy()
    cnnp_bytes = cnnp.stat().st_size
    flash = sizes["text"] + sizes["data"]
    row = {
        "model": name,
        "cnnp_bytes": cnnp_bytes,
        "model_o": sizes,
        "model_o_flash": flash,
        "limit_1.25x_plus_2KB": 1.25 * cnnp_bytes + 2048,
        "within_limit": flash <= 1.25 * cnnp_bytes + 2048,
        **{k: v for k, v in info.items() if k not in ("layers", "files")},
        "max_abs_diff": float(np.abs(got - ref).max()),
        "max_abs_logit": float(np.abs(ref).max()),
        "same_class": int((got.argmax(1) == ref.argmax(1)).sum()),
        "images": len(x),
        "c_accuracy": float((got.argmax(1) == labels).mean()),
        "c_ms_per_image": round(c_ms, 3),
        "torch_ms_per_image_batch1": round(torch_ms(model, x), 3),
    }
    print(
        f"{name}: .cnnp {cnnp_bytes:,} B, model.o {flash:,} B (limit "
        f"{row['limit_1.25x_plus_2KB']:,.0f}), RAM {info['ram_bytes']:,} B; logits within "
        f"{row['max_abs_diff']:.1e} of {row['max_abs_logit']:.1f}, {row['same_class']}/{len(x)} "
        f"classes equal; {row['c_ms_per_image']} ms (C) vs "
        f"{row['torch_ms_per_image_batch1']} ms (PyTorch) per image",
        flush=True,
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--files", nargs="*", default=[], help="more .cnnp files to measure")
    parser.add_argument("--out", default=None)
    parser.add_argument("--allow-dirty", action="store_true", help=ALLOW_DIRTY_HELP)
    args = parser.parse_args()
    require_clean_or_exit(args.allow_dirty or not args.out)  # a results file: clean tree
    if shutil.which("cc") is None or shutil.which("size") is None:
        sys.exit("this benchmark needs cc and size (binutils)")
    torch.set_num_threads(1)
    x, labels = images(args.images)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name in ["pretrained:resnet20-fmnist", *args.files]:
            path = resolve(name) if name.startswith("pretrained:") else Path(name)
            rows.append(measure(name, Path(path), x, labels, folder))
    result = {
        **script_provenance(args.out, args.allow_dirty),
        "compiler": subprocess.run(
            ["cc", "--version"], capture_output=True, text=True, check=True
        ).stdout.splitlines()[0],
        "rows": rows,
    }
    write_result(args.out, result)


if __name__ == "__main__":
    main()
