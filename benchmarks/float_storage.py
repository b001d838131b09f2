"""What the float width of a file costs: bytes and test accuracy at float32, float16 and int8.

The shipped fp32 ResNet-20 (``pretrained:resnet20-fmnist``) saved with BatchNorm folded at each
``float_bits``, then loaded back and evaluated on the Fashion-MNIST test split (every float of
that model is one the width applies to). Writes JSON with the command, commit and machine::

    python benchmarks/float_storage.py --out benchmarks/results/float_storage.json
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

import cnnpress
from cnnpress.data import Loader, load_dataset
from cnnpress.provenance import (
    ALLOW_DIRTY_HELP,
    require_clean_or_exit,
    script_provenance,
    write_result,
)
from cnnpress.train.loop import evaluate


def measure(model: torch.nn.Module, test: Loader, folder: Path, name: str) -> list[dict]:
    rows = []
    for float_bits in (32, 16, 8):
        path = folder / f"{name}-{float_bits}.cnnp"
        size = cnnpress.save(model, path, float_bits=float_bits, fold_batchnorm=True)
        accuracy = evaluate(cnnpress.load(path), test)["accuracy"]
        rows.append(
            {"model": name, "float_bits": float_bits, "file_bytes": size, "test_accuracy": accuracy}
        )
        print(f"{name}  float_bits {float_bits}: {size:,} bytes, {accuracy:.2f}%")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    parser.add_argument("--allow-dirty", action="store_true", help=ALLOW_DIRTY_HELP)
    args = parser.parse_args()
    require_clean_or_exit(args.allow_dirty or not args.out)  # a results file: clean tree
    torch.set_num_threads(args.threads)
    test = Loader(load_dataset("fashion-mnist", "test"), 500, train=False)
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure(cnnpress.load("pretrained:resnet20-fmnist"), test, Path(tmp), "fp32")
    result = {
        **script_provenance(args.out, args.allow_dirty),
        "rows": rows,
    }
    write_result(args.out, result)


if __name__ == "__main__":
    main()
