"""The ``quantize`` subcommand: integer activations for a model file, calibrated on training
images (:func:`cnnpress.quantize`), written to a new file, with test accuracy before and
after."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from torch import nn

from cnnpress.api import load_model, quantize, save
from cnnpress.cli.commands import _set_threads
from cnnpress.cli.files import _dataset_of
from cnnpress.data import Dataset, Loader, get_spec, load_dataset
from cnnpress.errors import CnnpressError
from cnnpress.train.fits import check_fits
from cnnpress.train.loop import PLAIN, evaluate

__all__ = ["cmd_quantize"]

#: Images per batch of the calibration and of the test-set evaluation.
BATCH = 256


def _finetune(args: argparse.Namespace, name: str, err: Console) -> dict[str, Any]:
    """The fine-tuning settings of ``--finetune-epochs`` (none when 0), printing a line every
    50 steps."""
    if args.finetune_epochs < 0:
        raise CnnpressError(f"--finetune-epochs must be 0 or more, got {args.finetune_epochs}")
    if not args.finetune_epochs:
        return {}
    full = load_dataset(name, "train", args.data_dir)

    def progress(step: int, steps: int, loss: float) -> None:
        if step % 50 == 0 or step == steps:
            err.print(f"fine-tuning step {step}/{steps}: loss {loss:.4f}", **PLAIN)

    return dict(
        finetune=Loader(full, 128, train=True, seed=0),
        epochs=args.finetune_epochs,
        lr=args.lr,
        progress=progress,
    )


def cmd_quantize(args: argparse.Namespace, console: Console, err: Console) -> dict:
    """``cnnpress quantize``: int8 or 4-bit activations, saved to ``--out``."""
    _set_threads(args.threads)
    model, meta = load_model(args.model_file)
    name = args.data or _dataset_of(meta, args.model_file).name
    check_fits(model, get_spec(name), args.model_file)
    train = load_dataset(name, "train", args.data_dir, limit=args.calibration)
    try:  # refused, before anything is written, where a layer has no integer kernel
        q = quantize(
            model,
            Loader(train, BATCH, train=False),
            bits=args.bits,
            observer=args.observer,
            limit=args.calibration,
            **_finetune(args, name, err),
        )
    except CnnpressError as why:
        raise CnnpressError(f"cannot quantize {args.model_file}: {why}") from None
    spec = train.spec
    dataset = meta.get("dataset") or spec.to_dict()
    size = save(q, args.out, dataset=dataset)
    before = {"file_bytes": _file_bytes(meta), "activations": _width(model)}
    after = {"file_bytes": size, "activations": _width(q)}
    test = None if args.no_eval else load_dataset(name, "test", args.data_dir)
    if test is not None:
        err.print(f"wrote {args.out}; evaluating both on {len(test)} {name} test images", **PLAIN)
        before["test_accuracy"] = _accuracy(model, test)
        after["test_accuracy"] = _accuracy(q, test)
    result = {
        "model_file": args.model_file,
        "out": args.out,
        "data": name,
        "bits": args.bits,
        "observer": args.observer,
        "calibration_images": len(train),
        "test_images": len(test) if test is not None else None,
        "before": before,
        "after": after,
    }
    if not args.json:
        console.print(_table(result))
    return result


def _file_bytes(meta: dict[str, Any]) -> int | None:
    """Bytes of the ``.cnnp`` a model came from (``None`` for a checkpoint)."""
    return Path(meta["file"]).stat().st_size if meta.get("file") else None


def _width(model: nn.Module) -> str:
    """``int8``, ``int4`` or ``float32``: the model's activations."""
    activations = getattr(model, "cnnpress_activations", None)
    return f"int{activations['bits']}" if activations else "float32"


def _accuracy(model: nn.Module, test: Dataset) -> float:
    """Top-1 test accuracy in % (in eval mode; a quantized model runs its integer program)."""
    return evaluate(model, Loader(test, BATCH, train=False))["accuracy"]


def _table(r: dict[str, Any]) -> Table:
    """Before and after: the file's bytes, the activations' width, the test accuracy."""
    t = Table(
        title=f"quantize: {r['bits']}-bit activations per tensor ({r['observer']} observer, "
        f"{r['calibration_images']} {r['data']} training images)"
    )
    for col in ("model", "activations", "file bytes", "test accuracy"):
        t.add_column(col, justify="left" if col == "model" else "right")
    for label, path, row in (
        ("before", r["model_file"], r["before"]),
        ("after", r["out"], r["after"]),
    ):
        size = f"{row['file_bytes']:,}" if row["file_bytes"] is not None else "-"
        acc = row.get("test_accuracy")
        t.add_row(
            f"{label}: {path}",
            row["activations"],
            size,
            f"{acc:.2f}%" if acc is not None else "-",
        )
    if r["test_images"]:
        t.caption = f"test accuracy on the {r['test_images']} {r['data']} test images"
    return t
