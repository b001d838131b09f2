"""The subcommands that work from a model file alone: ``evaluate``, ``summary``, ``predict``,
``export``."""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from cnnpress.api import load_model
from cnnpress.cli.commands import _set_threads
from cnnpress.cli.predict import read_inputs
from cnnpress.cost import summary
from cnnpress.data import DatasetSpec, Loader, get_spec, load_dataset
from cnnpress.errors import CnnpressError
from cnnpress.format import read_info
from cnnpress.runtime.boards import board_fit
from cnnpress.runtime.c_export import c_memory, export_c
from cnnpress.runtime.onnx import export_onnx
from cnnpress.train.fits import check_fits
from cnnpress.train.loop import PLAIN, evaluate

__all__ = ["cmd_evaluate", "cmd_export", "cmd_predict", "cmd_summary"]


def cmd_evaluate(args: argparse.Namespace, console: Console, err: Console) -> dict:
    """``cnnpress evaluate``: test accuracy of a saved model."""
    _set_threads(args.threads)
    model, meta = load_model(args.model_file)
    name = args.data or _dataset_of(meta, args.model_file).name
    check_fits(model, get_spec(name), args.model_file)
    test = load_dataset(name, "test", args.data_dir)
    metrics = evaluate(model, Loader(test, args.batch_size, train=False))
    result = {"model_file": args.model_file, "data": name, "samples": len(test), **metrics}
    if not args.json:
        console.print(
            f"{name} test accuracy {metrics['accuracy']:.2f}% "
            f"(loss {metrics['loss']:.4f}, {len(test)} images)"
        )
    return result


def _dataset_of(meta: dict[str, Any], path: str) -> DatasetSpec:
    if not meta.get("dataset"):
        raise CnnpressError(
            f"{path} records no dataset (saved without one); pass --input-shape C,H,W "
            "(summary, export) or --data NAME (evaluate)"
        )
    return DatasetSpec.from_dict(meta["dataset"])


def _input_shape(args: argparse.Namespace, meta: dict[str, Any]) -> tuple[int, int, int]:
    """``--input-shape C,H,W`` when given, else the recorded dataset's image shape."""
    if not getattr(args, "input_shape", None):
        spec = _dataset_of(meta, args.model_file)
        return (spec.in_channels, *spec.image_size)
    try:
        shape = tuple(int(v) for v in args.input_shape.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise CnnpressError(
            f"--input-shape must be C,H,W: three positive integers such as 1,28,28; "
            f"got {args.input_shape!r}"
        )
    return shape  # type: ignore[return-value]


def cmd_summary(args: argparse.Namespace, console: Console, err: Console) -> dict:
    """``cnnpress summary``: the per-layer cost table, with the real file's bytes and the C
    program's flash and RAM."""
    model, meta = load_model(args.model_file)
    shape = _input_shape(args, meta)
    path = Path(args.model_file)
    path = path / "model.cnnp" if path.is_dir() else path
    info = read_info(path) if path.suffix == ".cnnp" else None
    float_bits = info["manifest"].get("float_bits", 32) if info else 32
    s = summary(model, shape, float_bits=float_bits)
    if info is not None:
        s.attach_file(info)
    try:  # flash and RAM of the C program (export --c), where the runtime runs the model
        s.attach_device(c_memory(model, shape))
    except CnnpressError as why:
        s.attach_device({"error": str(why)})
    result = s.to_dict()
    if args.board:
        result["board"] = board_fit(model, args.board, shape)
    if not args.json:
        console.print(s.table())
        if args.board:
            console.print(board_line(result["board"]), **PLAIN)
    return result


def board_line(fit: dict[str, Any]) -> str:
    """One line: whether the program fits the board, and by how many bytes each memory."""

    def part(what: str, used: int, size: int, left: int) -> str:
        state = f"{left:,} left" if left >= 0 else f"over by {-left:,}"
        return f"{what} {used:,} of {size:,} bytes ({state})"

    verdict = "fits" if fit["fits"] else "does NOT fit"
    return (
        f"{fit['board']} ({fit['part']}, {fit['core']}): {fit['activations']} program {verdict}: "
        + part("flash", fit["flash_bytes"], fit["board_flash_bytes"], fit["flash_left_bytes"])
        + ", "
        + part("RAM", fit["ram_bytes"], fit["board_ram_bytes"], fit["ram_left_bytes"])
        + f" (estimated: the runtime's code {fit['code_bytes']:,}, stack {fit['stack_bytes']:,})"
    )


def cmd_predict(args: argparse.Namespace, console: Console, err: Console) -> dict:
    """``cnnpress predict``: classes of the images in files or folders, from the model file."""
    model, meta = load_model(args.model_file)
    spec = _dataset_of(meta, args.model_file)
    x, sources = read_inputs(args.input, spec)
    with torch.no_grad():
        probs = torch.cat([torch.softmax(model(b), dim=1) for b in x.split(256)])
    conf, cls = probs.max(dim=1)
    preds = [
        {
            "index": i,
            "file": file,
            "index_in_file": j,
            "class": spec.class_names[c],
            "label": int(c),
            "probability": float(p),
        }
        for i, ((file, j), c, p) in enumerate(
            zip(sources, cls.tolist(), conf.tolist(), strict=True)
        )
    ]
    if not args.json:
        t = Table(title=f"predictions of {args.model_file}")
        for col in ("image", "file", "class", "probability"):
            t.add_column(col, justify="left" if col in ("file", "class") else "right")
        per_file = Counter(file for file, _ in sources)
        for p in preds[: args.limit]:
            where = p["file"]
            if per_file[where] > 1:
                where += f"[{p['index_in_file']}]"
            t.add_row(str(p["index"]), where, p["class"], f"{p['probability']:.3f}")
        console.print(t)
        if len(preds) > args.limit:
            console.print(f"... {len(preds) - args.limit} more (use --json for all)")
    return {"model_file": args.model_file, "inputs": args.input, "predictions": preds}


def cmd_export(args: argparse.Namespace, console: Console, err: Console) -> dict:
    """``cnnpress export``: an ONNX graph or a C99 program of a model file."""
    model, meta = load_model(args.model_file)
    if getattr(args, "c_dir", None):
        return _export_c(args, console, model, meta)
    out = export_onnx(model, args.onnx, _input_shape(args, meta), mode=args.mode)
    cnnp = meta.get("file")  # the .cnnp it came from (none for a checkpoint)
    result = {
        "model_file": args.model_file,
        "onnx": str(out),
        "mode": args.mode,
        "bytes": Path(out).stat().st_size,
        "cnnp_bytes": Path(cnnp).stat().st_size if cnnp else None,
    }
    if not args.json:
        beside = f"; the .cnnp holds {result['cnnp_bytes']:,}" if cnnp else ""
        console.print(
            f"wrote {out} ({result['bytes']:,} bytes, SLBF as {args.mode}{beside})", **PLAIN
        )
    return result


def _export_c(args: argparse.Namespace, console: Console, model: Any, meta: dict) -> dict:
    """``cnnpress export --c DIR``: the C program, its flash and RAM beside the file's bytes."""
    info = export_c(model, args.c_dir, _input_shape(args, meta))
    cnnp = meta.get("file")
    result = {
        "model_file": args.model_file,
        "c_dir": args.c_dir,
        "cnnp_bytes": Path(cnnp).stat().st_size if cnnp else None,
        **info,
    }
    if not args.json:
        beside = f"; the .cnnp holds {result['cnnp_bytes']:,}" if cnnp else ""
        console.print(
            f"wrote {args.c_dir}: {info['const_bytes']:,} bytes of weights{beside}; RAM "
            f"{info['ram_bytes']:,} bytes (one arena: maps and, at most "
            f"{info['scratch_bytes']:,}, scratch); build: cc -std=c99 -O2 *.c -lm",
            **PLAIN,
        )
    return result
