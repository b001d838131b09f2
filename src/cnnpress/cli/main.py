"""The ``cnnpress`` command: parses, calls the library, prints (rich tables or JSON)."""

from __future__ import annotations

import argparse
import errno
import json
import sys
from pathlib import Path
from typing import Any, NoReturn

from rich.console import Console

from cnnpress.cli import commands, compare, files, quantize
from cnnpress.cli.predict import FORMATS
from cnnpress.errors import CnnpressError
from cnnpress.provenance import ALLOW_DIRTY_HELP
from cnnpress.runtime.boards import BOARDS
from cnnpress.runtime.quant import QAT_LR
from cnnpress.train.distributed import note_rank

__all__ = ["build_parser", "main"]


def _train_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", help="YAML recipe; flags override its values")
    p.add_argument("--model", help="architecture (see `cnnpress.models.names()`), e.g. resnet20")
    p.add_argument("--data", help="dataset: fashion-mnist, mnist, cifar10 or synthetic")
    p.add_argument("--data-dir", help="folder with the dataset files")
    p.add_argument("--out", help="run folder (default runs/<model>-<method>)")
    p.add_argument(
        "--init",
        help="start from trained fp32 weights (a run folder, model file or pretrained:NAME)",
    )
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--optimizer", choices=["sgd", "adam"])
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--bn-recalibrate", type=int, help="batches to re-estimate BN stats before eval")
    p.add_argument(
        "--slimming-l1",
        type=float,
        help="L1 penalty on BatchNorm scales (network slimming's sparsity training)",
    )
    p.add_argument("--seed", type=int)
    p.add_argument(
        "--activation-bits",
        type=int,
        choices=(8, 4),
        help="save the trained model with integer activations (calibrated on 1,000 training "
        "images): the C program's arithmetic",
    )
    p.add_argument(
        "--qat-epochs",
        type=int,
        help="with --activation-bits: epochs of quantization-aware fine-tuning first (0)",
    )
    p.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors as the one line every user error gets."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"cnnpress: error: {message}; see `{self.prog} --help`\n")


def _compress_options(p: argparse.ArgumentParser) -> None:
    """The options ``compress`` has beyond ``train``'s: the method, its settings, storage, KD."""
    p.add_argument("--method", help="compression method (see `cnnpress.methods.names()`)")
    p.add_argument("--slice-channels", type=int, help="SLBF slice width d")
    p.add_argument("--num-filters", type=int, help="SLBF bank size m")
    p.add_argument(
        "--target-size", help="SLBF: file size budget, e.g. 12KB (per-layer d and m chosen to fit)"
    )
    p.add_argument(
        "--target-ratio", type=float, help="SLBF: budget as fp32 bytes / file bytes, e.g. 100"
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any method setting, e.g. --set ratio=0.5 --set criterion=bn (value read as YAML)",
    )
    p.add_argument("--float16", action="store_true", help="store unpacked floats as float16")
    p.add_argument(
        "--int8", action="store_true", help="store unpacked floats as int8 with scales per row"
    )
    p.add_argument(
        "--fold-batchnorm", action="store_true", help="store BatchNorm folded (inference only)"
    )
    p.add_argument(
        "--entropy", action="store_true", help="Huffman-code selection indices where smaller"
    )
    p.add_argument(
        "--flash", help="flash budget of the C program, e.g. 64KB (settings chosen to fit)"
    )
    p.add_argument("--ram", help="RAM budget of the C program, e.g. 16KB (activations chosen)")
    p.add_argument(
        "--board",
        choices=sorted(BOARDS),
        help="plan for this board: its core, and its flash and RAM unless --flash/--ram say",
    )
    p.add_argument("--teacher", help="distil from this trained model (.cnnp or run folder)")
    p.add_argument("--kd-temperature", type=float, help="distillation temperature T (4)")
    p.add_argument("--kd-alpha", type=float, help="weight of the soft-target loss (0.9)")
    p.add_argument("--no-kd", action="store_true", help="SLBF with --init: no distillation from it")


def _file_commands(sub: Any) -> None:
    """The subcommands that read a model file: evaluate, summary, quantize, predict, export."""
    p = sub.add_parser("evaluate", help="test accuracy of a trained model")
    p.add_argument("model_file", help="model.cnnp file or run folder")
    p.add_argument("--data", help="dataset (default: the one it was trained on)")
    p.add_argument("--data-dir")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--threads", type=int)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("summary", help="per-layer bits, MACs, file bytes and compression ratio")
    p.add_argument("model_file", help="model.cnnp file or run folder")
    p.add_argument("--input-shape", help="C,H,W (default: the dataset's)")
    p.add_argument(
        "--board", choices=sorted(BOARDS), help="whether the C program fits this board's memory"
    )
    p.add_argument("--json", action="store_true")

    _quantize_command(sub)

    p = sub.add_parser("predict", help="classify images (IDX, .npy, PNG, JPEG) with a model file")
    p.add_argument("model_file", help="model.cnnp file or run folder")
    p.add_argument(
        "input",
        nargs="+",
        help=f"images: {FORMATS}",
    )
    p.add_argument("--limit", type=int, default=20, help="rows to print")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("export", help="export a model file to ONNX or to a C99 program")
    p.add_argument("model_file", help="model.cnnp file or run folder")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--onnx", help="output .onnx path")
    target.add_argument(
        "--c",
        dest="c_dir",
        metavar="DIR",
        help="folder for a C99 program that keeps the packed weights (model.c, cnnpress_rt.c, "
        "main.c; cc -std=c99 -O2 *.c -lm)",
    )
    p.add_argument("--input-shape", help="C,H,W (default: the dataset's)")
    p.add_argument(
        "--mode",
        choices=["dense", "stm"],
        default="dense",
        help="SLBF as a dense conv (default) or as grouped conv + gather + sum",
    )
    p.add_argument("--json", action="store_true")


def _positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (anything else is argparse's one-line error)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _quantize_command(sub: Any) -> None:
    """``quantize``: integer activations calibrated on training images, saved to a new file."""
    p = sub.add_parser(
        "quantize", help="int8 or 4-bit activations (the C program's integer arithmetic)"
    )
    p.add_argument("model_file", help="model.cnnp file, run folder or pretrained:NAME")
    p.add_argument("--data", help="dataset (default: the one it was trained on)")
    p.add_argument("--data-dir")
    p.add_argument("--bits", type=int, choices=[8, 4], default=8, help="activation bits (8)")
    p.add_argument(
        "--observer",
        choices=["mse", "minmax", "percentile"],
        default="mse",
        help="how each tensor's range is chosen (mse)",
    )
    p.add_argument(
        "--calibration",
        type=_positive_int,
        default=1000,
        metavar="N",
        help="training images to calibrate on (1000)",
    )
    p.add_argument("--out", required=True, help="the quantized .cnnp file to write")
    p.add_argument(
        "--finetune-epochs",
        type=int,
        default=0,
        help="quantization-aware fine-tuning on the training split first (default 0: none)",
    )
    p.add_argument("--lr", type=float, default=QAT_LR, help=f"fine-tuning learning rate ({QAT_LR})")
    p.add_argument("--no-eval", action="store_true", help="skip the test accuracy before and after")
    p.add_argument("--threads", type=int)
    p.add_argument("--json", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = _Parser(
        prog="cnnpress", description="Compress convolutional networks (SLBF and classic methods)."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compare", help="every method of a recipe: train, measure, report")
    p.add_argument("recipe", help="comparison recipe (YAML), e.g. recipes/compare-fmnist.yaml")
    p.add_argument("--runs", help="train only these runs (comma-separated names)")
    p.add_argument("--train-only", action="store_true", help="train, do not measure or report")
    p.add_argument("--report", help="folder for results.json/.md/.png (default: the recipe's out)")
    p.add_argument("--allow-dirty", action="store_true", help=ALLOW_DIRTY_HELP)
    p.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("train", help="train a full-precision model")
    _train_options(p)

    p = sub.add_parser("compress", help="compress a model with a method and train it")
    _train_options(p)
    _compress_options(p)

    _file_commands(sub)
    return parser


#: OS errors a user can cause (and fix), with what they mean and what to do.
_OS_ERRORS: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("the disk is full", "free some space"),
    errno.EDQUOT: ("the disk quota is used up", "free some space"),
    errno.EACCES: ("permission denied", "fix the permissions or choose another path"),
    errno.EPERM: ("operation not permitted", "fix the permissions or choose another path"),
    errno.EROFS: ("the file system is read-only", "make it writable or use another path"),
    errno.ENOENT: ("no such file or folder", "check the path"),
    errno.ENOTDIR: ("a part of the path is not a folder", "check the path"),
    errno.EISDIR: ("it is a folder, not a file", "check the path"),
    errno.EEXIST: ("it already exists", "choose another path"),
    errno.ENAMETOOLONG: ("the name is too long", "choose a shorter path"),
    errno.EIO: ("input/output error (a failing disk or network share?)", "check the storage"),
}


def _os_message(exc: OSError, args: argparse.Namespace) -> str | None:
    """One line for an OS error a user can fix, or ``None`` for any other (a real bug)."""
    if exc.errno not in _OS_ERRORS:
        return None
    reason, advice = _OS_ERRORS[exc.errno]
    where = f": {exc.filename}" if exc.filename else ""
    line = f"{reason}{where}; {advice}"
    out = getattr(args, "out", None)
    if args.command in ("train", "compress") and out and Path(out, "config.yaml").is_file():
        line += f", then continue with --resume --out {out} (the files already there are intact)"
    elif args.command in ("train", "compress"):
        line += " and run again"
    return line


def main(argv: list[str] | None = None) -> int:
    """Run the command line; user errors print one line and return exit code 2.

    A user error is a :class:`~cnnpress.errors.CnnpressError` or an OS error a user can fix
    (full disk, permissions, read-only file system, missing path); anything else is a bug
    and keeps its traceback.
    """
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already printed as one line
        return exc.code if isinstance(exc.code, int) else 2
    console = Console() if sys.stdout.isatty() else Console(width=200)
    err = Console(stderr=True)
    try:
        where = {
            "compare": compare,
            "train": commands,
            "compress": commands,
            "quantize": quantize,
        }.get(args.command, files)
        result = getattr(where, f"cmd_{args.command}")(args, console, err)
    except CnnpressError as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return _fail(message)
    except OSError as exc:
        message = _os_message(exc, args)
        if message is None:
            raise
        return _fail(message)
    except KeyboardInterrupt:
        out = getattr(args, "out", None)
        hint = f"; continue with --resume --out {out}" if out and args.command != "predict" else ""
        print(note_rank(f"cnnpress: interrupted{hint}"), file=sys.stderr)
        return 130
    if getattr(args, "json", False) and result is not None:
        print(json.dumps(result, indent=2, default=str))
    return 0


def _fail(message: str) -> int:
    print(f"cnnpress: error: {note_rank(message)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
