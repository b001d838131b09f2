"""How big the ONNX export of an SLBF model is beside its .cnnp, and whether onnxruntime
computes what PyTorch does, on real Fashion-MNIST test images.

The models: the shipped fp32 ResNet-20 (``pretrained:resnet20-fmnist``) compressed by SLBF to
whole-file ratios of 50x, 100x and 200x by the budget planner (int8 floats, BatchNorm folded,
Huffman-coded selections: the storage of ``recipes/compare-fmnist-slbf.yaml``) without
fine-tuning (the sizes depend on the layers' settings, not on training), plus any ``.cnnp``
files given with ``--files`` (for example the trained runs of that recipe). Each is exported in
``dense`` and ``stm`` mode; the JSON records the bytes of all three files, the largest
difference of the logits from the loaded PyTorch model and how many predicted classes agree::

    python benchmarks/onnx_size.py --out benchmarks/results/onnx_size.json \\
        --files runs/compare-fmnist-slbf/slbf-100x-kd/model.cnnp
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

import cnnpress
from cnnpress.data import Loader, load_dataset
from cnnpress.provenance import (
    ALLOW_DIRTY_HELP,
    require_clean_or_exit,
    script_provenance,
    write_result,
)
from cnnpress.runtime import export_onnx

STORAGE = {"float_bits": 8, "fold_batchnorm": True, "entropy": True}


def images(count: int) -> torch.Tensor:
    test = Loader(load_dataset("fashion-mnist", "test"), count, train=False)
    return next(iter(test))[0]


def measure(name: str, cnnp: Path, x: torch.Tensor, folder: Path) -> dict:
    model = cnnpress.load(cnnp).eval()
    with torch.no_grad():
        ref = model(x).numpy()
    row = {"model": name, "cnnp_bytes": cnnp.stat().st_size}
    for mode in ("dense", "stm"):
        path = export_onnx(model, folder / f"{name}-{mode}.onnx", tuple(x.shape[1:]), mode=mode)
        got = ort.InferenceSession(str(path)).run(None, {"input": x.numpy()})[0]
        row[mode] = {
            "onnx_bytes": path.stat().st_size,
            "onnx_over_cnnp": round(path.stat().st_size / row["cnnp_bytes"], 3),
            "max_abs_diff": float(np.abs(got - ref).max()),
            "max_abs_logit": float(np.abs(ref).max()),
            "same_class": int((got.argmax(1) == ref.argmax(1)).sum()),
            "images": len(x),
        }
    print(
        f"{name}: .cnnp {row['cnnp_bytes']:,} B; ONNX dense {row['dense']['onnx_bytes']:,} B, "
        f"stm {row['stm']['onnx_bytes']:,} B ({row['stm']['onnx_over_cnnp']:.2f}x the .cnnp); "
        f"stm logits within {row['stm']['max_abs_diff']:.1e}, "
        f"{row['stm']['same_class']}/{len(x)} classes equal",
        flush=True,
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--files", nargs="*", default=[], help="more .cnnp files to measure")
    parser.add_argument("--out", default=None)
    parser.add_argument("--allow-dirty", action="store_true", help=ALLOW_DIRTY_HELP)
    args = parser.parse_args()
    require_clean_or_exit(args.allow_dirty or not args.out)  # a results file: clean tree
    torch.set_num_threads(args.threads)
    x = images(args.images)
    fp32 = cnnpress.load("pretrained:resnet20-fmnist")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for ratio in (50, 100, 200):
            small = cnnpress.compress(fp32, "slbf", target_ratio=ratio, **STORAGE)
            path = folder / f"slbf-{ratio}x.cnnp"
            cnnpress.save(small, path)
            rows.append(measure(f"slbf-{ratio}x (planner, untrained)", path, x, folder))
        for file in args.files:
            rows.append(measure(file, Path(file), x, folder))
    result = {
        **script_provenance(args.out, args.allow_dirty),
        "rows": rows,
    }
    write_result(args.out, result)


if __name__ == "__main__":
    main()
