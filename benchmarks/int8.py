"""Integer inference measured: accuracy with int8 and 4-bit activations beside float, the int8
C program against PyTorch's integer forward bit for bit, its RAM and flash beside the float
program's, and the speed of both C programs, PyTorch and onnxruntime at batch 1 on one thread,
side by side in one run.

The models: the shipped fp32 ResNet-20 (``pretrained:resnet20-fmnist``) and any ``.cnnp``
files given as ``--files NAME=PATH`` (the trained runs of ``recipes/compare-fmnist-slbf.yaml``)::

    python benchmarks/int8.py --out benchmarks/results/int8.json \\
        --files slbf-50x=runs/compare-fmnist-slbf/slbf-50x-kd/model.cnnp

Per model:

- ``float_accuracy``: the file's model on the 10,000 test images; ``float8_accuracy``: the
  same with its floats stored as int8 (what a quantized file keeps), still float activations;
- ``observers_held_out`` (and ``_int4``): each observer's accuracy at 8 (4) bits on 5,000
  held-out *training* images (the last 5,000; calibration takes 1,000 of the first), which
  chooses the observer without looking at the test set; ``int8_accuracy`` and
  ``int4_accuracy``: the chosen observer's, post-training,
  from PyTorch's integer forward over the 10,000 test images; ``int8_qat_accuracy`` and
  ``int4_qat_accuracy`` for the models named in ``--qat``: after ``--qat-epochs`` of
  quantization-aware fine-tuning on the training split at ``--qat-lr``
  (``cnnpress.quantize(..., finetune=...)``), with their seconds and their C program (its
  memory, and ``bit_equal`` on the first ``--images``);
- the int8 C program on the first ``--images`` test images: ``bit_equal`` (its logits against
  PyTorch's integer forward, every bit), RAM and flash (the exporter's figures and ``size`` of
  ``model.o``), and the float C program's;
- milliseconds per image at batch 1 with one thread: the int8 and float C programs (wall time
  of one process over all the images), PyTorch (the float model), onnxruntime (the dense
  fp32 ONNX export).

"""

from __future__ import annotations

import argparse
import inspect
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

import cnnpress
from cnnpress.data import Loader, get_spec, load_dataset, normalize
from cnnpress.pretrained import resolve
from cnnpress.provenance import (
    ALLOW_DIRTY_HELP,
    require_clean_or_exit,
    script_provenance,
    write_result,
)
from cnnpress.runtime import export_c, export_onnx

BUILD = "cc -std=c99 -O2 -Wall -Wextra -Werror *.c -lm -o prog"
OBSERVERS = ("minmax", "percentile", "mse")
QAT_LR = inspect.signature(cnnpress.quantize).parameters["lr"].default


def split(name: str, start: int, stop: int) -> tuple[torch.Tensor, np.ndarray]:
    spec = get_spec("fashion-mnist")
    ds = load_dataset("fashion-mnist", name)
    return normalize(ds.images[start:stop], spec.mean, spec.std), ds.labels[start:stop].numpy()


def accuracy(model: torch.nn.Module, x: torch.Tensor, labels: np.ndarray) -> float:
    with torch.no_grad():
        pred = torch.cat([model(b).argmax(1) for b in x.split(500)]).numpy()
    return round(100.0 * float((pred == labels).mean()), 2)


def c_program(model: torch.nn.Module, folder: Path) -> tuple[Path, dict]:
    info = export_c(model, folder, (1, 28, 28))
    subprocess.run(BUILD, shell=True, cwd=folder, check=True)
    subprocess.run(["cc", "-std=c99", "-O2", "-c", "model.c"], cwd=folder, check=True)
    line = subprocess.run(
        ["size", "model.o"], cwd=folder, capture_output=True, text=True, check=True
    ).stdout.splitlines()[1]
    text, data, bss = (int(v) for v in line.split()[:3])
    info = {k: v for k, v in info.items() if k not in ("layers", "files")}
    return folder / "prog", {**info, "model_o": {"text": text, "data": data, "bss": bss}}


def run_c(prog: Path, x: torch.Tensor) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    done = subprocess.run(
        [str(prog)], input=x.numpy().astype("<f4").tobytes(), capture_output=True, check=True
    )
    ms = 1000 * (time.perf_counter() - start) / len(x)
    return np.frombuffer(done.stdout, dtype="<f4").reshape(len(x), -1), round(ms, 3)


def torch_ms(model: torch.nn.Module, x: torch.Tensor) -> float:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.no_grad():
        model(x[:1])
        start = time.perf_counter()
        for i in range(len(x)):
            model(x[i : i + 1])
    torch.set_num_threads(threads)
    return round(1000 * (time.perf_counter() - start) / len(x), 3)


def onnx_ms(model: torch.nn.Module, x: torch.Tensor, folder: Path) -> float:
    path = export_onnx(model, folder / "dense.onnx", (1, 28, 28), mode="dense")
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = x.numpy()
    session.run(None, {"input": feed[:1]})
    start = time.perf_counter()
    for i in range(len(feed)):
        session.run(None, {"input": feed[i : i + 1]})
    return round(1000 * (time.perf_counter() - start) / len(feed), 3)


def observers(model: torch.nn.Module, data: dict, bits: int) -> tuple[dict[str, float], str]:
    """Each observer's accuracy at ``bits`` on the held-out training images, and the best."""
    scores = {}
    for observer in OBSERVERS:
        q = cnnpress.quantize(model, data["calibration"], bits=bits, observer=observer)
        scores[observer] = accuracy(q, *data["held_out"])
    return scores, max(OBSERVERS, key=lambda o: (scores[o], o == "mse"))


def qat_model(model: torch.nn.Module, data: dict, bits: int, observer: str) -> torch.nn.Module:
    """``model`` with ``bits``-bit activations after quantization-aware fine-tuning on the
    training split."""
    loader = Loader(load_dataset("fashion-mnist", "train"), 128, train=True, seed=0)
    return cnnpress.quantize(
        model,
        data["calibration"],
        bits=bits,
        observer=observer,
        finetune=loader,
        epochs=data["qat_epochs"],
        lr=data["qat_lr"],
    )


def measure(name: str, path: str, data: dict, folder: Path) -> dict:
    model = cnnpress.load(path).eval()
    x_test, y_test = data["test"]
    scores, best = observers(model, data, 8)
    scores4, best4 = observers(model, data, 4)
    q8 = cnnpress.quantize(model, data["calibration"], bits=8, observer=best)
    q4 = cnnpress.quantize(model, data["calibration"], bits=4, observer=best4)
    row = {
        "model": name,
        "file": path,
        "method": (getattr(model, "cnnpress_method", None) or {}).get("name", "fp32"),
        "cnnp_bytes": Path(resolve(path)).stat().st_size,
        "float_accuracy": accuracy(model, x_test, y_test),
        "float8_accuracy": accuracy(q8.float_model, x_test, y_test),
        "observers_held_out": scores,
        "observer": best,
        "observers_held_out_int4": scores4,
        "observer_int4": best4,
        "int8_accuracy": accuracy(q8, x_test, y_test),
        "int4_accuracy": accuracy(q4, x_test, y_test),
    }
    x = x_test[: data["images"]]
    prog8, info8 = c_program(q8, folder / f"{name}-int8")
    progf, infof = c_program(model, folder / f"{name}-float")
    got8, ms8 = run_c(prog8, x)
    gotf, msf = run_c(progf, x)
    with torch.no_grad():
        ref8, reff = q8(x).numpy(), model(x).numpy()
    if name in data["qat"]:
        row["qat_epochs"], row["qat_lr"] = data["qat_epochs"], data["qat_lr"]
        for bits, observer in ((8, best), (4, best4)):
            start = time.perf_counter()
            qat = qat_model(model, data, bits, observer)
            row[f"int{bits}_qat_accuracy"] = accuracy(qat, x_test, y_test)
            row[f"int{bits}_qat_seconds"] = round(time.perf_counter() - start, 1)
            prog, info = c_program(qat, folder / f"{name}-int{bits}-qat")
            with torch.no_grad():
                same = np.array_equal(run_c(prog, x)[0], qat(x).numpy())
            row[f"int{bits}_qat_program"] = {**info, "bit_equal": same}
    row.update(
        images=len(x),
        bit_equal=bool(np.array_equal(got8, ref8)),
        float_c_max_abs_diff=float(np.abs(gotf - reff).max()),
        int8_program=info8,
        float_program=infof,
        c_int8_ms=ms8,
        c_float_ms=msf,
        torch_float_ms=torch_ms(model, x),
        onnxruntime_dense_fp32_ms=onnx_ms(model, x, folder / name),
    )
    print(
        f"{name}: float {row['float_accuracy']}% (int8 floats {row['float8_accuracy']}%), "
        f"int8 {row['int8_accuracy']}% ({best}), int4 {row['int4_accuracy']}%; C int8 "
        f"bit-equal on {len(x)}: {row['bit_equal']}; RAM {info8['ram_bytes']:,} B int8 vs "
        f"{infof['ram_bytes']:,} B float; ms/image C int8 {ms8}, C float {msf}, PyTorch "
        f"{row['torch_float_ms']}, onnxruntime {row['onnxruntime_dense_fp32_ms']}",
        flush=True,
    )
    return row


def _qat(row: dict, bits: int) -> str:
    """A QAT accuracy cell (not run where the model was not fine-tuned)."""
    key = f"int{bits}_qat_accuracy"
    if key not in row:
        return "not run"
    program = row.get(f"int{bits}_qat_program", {})
    equal = {True: ", C bit-equal", False: ", C DIFFERS"}.get(program.get("bit_equal"), "")
    return f"{row[key]:.2f}%{equal}"


def tables(path: str) -> str:
    """The tables of docs/results.md (markdown) from a results file of this script."""
    rows = json.loads(Path(path).read_text())["rows"]
    out = [
        "| model | `.cnnp` bytes | float | float, int8 floats | int8 PTQ | int8 QAT "
        "| int4 PTQ | int4 QAT | C = PyTorch (images) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['model']} | {r['cnnp_bytes']:,} | {r['float_accuracy']:.2f}% | "
            f"{r['float8_accuracy']:.2f}% | {r['int8_accuracy']:.2f}% ({r['observer']}) | "
            f"{_qat(r, 8)} | "
            f"{r['int4_accuracy']:.2f}% ({r.get('observer_int4', r['observer'])}) | "
            f"{_qat(r, 4)} | {'bit-equal' if r['bit_equal'] else 'DIFFER'}"
            f" ({r['images']:,}) |"
        )
    out += [
        "",
        "| model | RAM int8 (one arena; its largest scratch) | RAM float | flash int8 (weights "
        "+ requant + descriptors) | flash float | C int8 ms | C float ms | PyTorch ms | "
        "onnxruntime ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        i, f = r["int8_program"], r["float_program"]
        out.append(
            f"| {r['model']} | {i['ram_bytes']:,} ({i['scratch_bytes']:,}) | "
            f"{f['ram_bytes']:,} | {i['flash_bytes']:,} "
            f"({i['const_bytes']:,} + {i['requant_bytes']:,} + {i['descriptor_bytes']:,}) | "
            f"{f['flash_bytes']:,} | {r['c_int8_ms']} | {r['c_float_ms']} | "
            f"{r['torch_float_ms']} | {r['onnxruntime_dense_fp32_ms']} |"
        )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000, help="test images for the C checks")
    parser.add_argument("--test-images", type=int, default=10000, help="for the accuracies")
    parser.add_argument("--held-out", type=int, default=5000, help="for choosing the observer")
    parser.add_argument("--files", nargs="*", default=[], help="NAME=PATH of more .cnnp files")
    parser.add_argument("--qat", default="", help="comma-separated names: int8 and 4-bit QAT")
    parser.add_argument("--qat-epochs", type=int, default=1)
    parser.add_argument("--qat-lr", type=float, default=QAT_LR, help="fine-tuning lr")
    parser.add_argument("--threads", type=int, default=2, help="threads for the accuracies")
    parser.add_argument("--out", default=None)
    parser.add_argument("--allow-dirty", action="store_true", help=ALLOW_DIRTY_HELP)
    parser.add_argument(
        "--table", default=None, help="print the docs/results.md tables of a result"
    )
    args = parser.parse_args()
    if args.table:
        print(tables(args.table))
        return
    require_clean_or_exit(args.allow_dirty or not args.out)
    if shutil.which("cc") is None or shutil.which("size") is None:
        sys.exit("this benchmark needs cc and size (binutils)")
    torch.set_num_threads(args.threads)  # the accuracies; every timing takes one thread
    data = {
        "calibration": split("train", 0, 1000)[0],
        "held_out": split("train", 60000 - args.held_out, 60000),
        "test": split("test", 0, args.test_images),
        "images": args.images,
        "qat": set(filter(None, args.qat.split(","))),
        "qat_epochs": args.qat_epochs,
        "qat_lr": args.qat_lr,
    }
    files = [("fp32", "pretrained:resnet20-fmnist")] + [tuple(f.split("=", 1)) for f in args.files]
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(name, path, data, Path(tmp)) for name, path in files]
    compiler = subprocess.run(["cc", "--version"], capture_output=True, text=True, check=True)
    write_result(
        args.out,
        {
            **script_provenance(args.out, args.allow_dirty),
            "compiler": compiler.stdout.splitlines()[0],
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
