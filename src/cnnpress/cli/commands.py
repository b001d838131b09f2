"""The training subcommands (``train``, ``compress``): their flags and recipe resolved into a
run's settings, which :mod:`cnnpress.run` trains; ``main`` handles parsing and errors.

The commands that read a model file are in :mod:`cnnpress.cli.files`, ``compare`` in
:mod:`cnnpress.cli.compare`.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console
from rich.table import Table

from cnnpress.budget import parse_size
from cnnpress.errors import CnnpressError, ConfigError
from cnnpress.methods import get as get_method
from cnnpress.methods import names
from cnnpress.run import read_run, train_run
from cnnpress.runtime.boards import CODE_BYTES, board
from cnnpress.train.config import TrainConfig
from cnnpress.train.distributed import (
    DistContext,
    broadcast_bytes,
    init_distributed,
    shutdown,
)
from cnnpress.train.loop import PLAIN
from cnnpress.typecheck import check_value

__all__ = ["cmd_compress", "cmd_train", "resolve_config", "resume_config", "train_config"]

_TRAIN_FLAGS = (
    "epochs",
    "batch_size",
    "lr",
    "optimizer",
    "weight_decay",
    "bn_recalibrate",
    "slimming_l1",
    "seed",
)
_METHOD_FLAGS = {
    "slice_channels": "slice_channels",
    "num_filters": "num_filters",
    "target_size": "target_size",
    "target_ratio": "target_ratio",
}
#: Flags that switch a storage setting on (``--float16`` means ``float_bits: 16``).
_STORAGE_FLAGS = {
    "float16": ("float_bits", 16),
    "int8": ("float_bits", 8),
    "fold_batchnorm": ("fold_batchnorm", True),
    "entropy": ("entropy", True),
}


def _read_recipe(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            recipe = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise CnnpressError(f"recipe {path} not found") from None
    except IsADirectoryError:
        raise CnnpressError(f"recipe {path} is a folder; pass a YAML file") from None
    except OSError as err:
        raise CnnpressError(f"cannot read recipe {path}: {err.strerror or err}") from None
    except UnicodeDecodeError:
        raise CnnpressError(f"recipe {path} is not a text (YAML) file") from None
    except yaml.YAMLError as err:
        raise CnnpressError(
            f"recipe {path} is not valid YAML: {str(err).splitlines()[0]}"
        ) from None
    if not isinstance(recipe, dict):
        raise CnnpressError(f"recipe {path} must be a mapping of settings")
    return recipe


#: The type of each recipe key's value (``null`` is allowed for each: unset).
_RECIPE_TYPES: dict[str, type] = {
    **dict.fromkeys(("model", "data", "data_dir", "out", "init", "method"), str),
    **dict.fromkeys(
        (
            "model_args",
            "data_options",
            "train",
            "method_config",
            "distill",
            "activations",
            "device",
        ),
        dict,
    ),
}
#: The settings of ``device:`` (a flash and RAM budget of the C program, on a core).
_DEVICE_KEYS = ("flash", "ram", "core")
#: The settings of ``activations:`` (the run's model saved with integer activations).
_ACTIVATION_KEYS = ("bits", "observer", "finetune_epochs")
_DISTILL_TYPES: dict[str, Any] = {"teacher": str, "temperature": float, "alpha": float}


def check_recipe_types(cfg: dict[str, Any]) -> None:
    """Refuse a recipe value of the wrong type (``model_args: many``) with one line."""
    for key, tp in _RECIPE_TYPES.items():
        check_value(key, cfg.get(key), tp | None)
    taken = sorted({"in_channels", "num_classes"} & set(cfg.get("model_args") or {}))
    if taken:
        raise ConfigError(
            f"model_args cannot set {' or '.join(taken)}: the data set (--data) decides "
            "in_channels and num_classes"
        )
    distill = cfg.get("distill") or {}
    unknown = sorted(str(key) for key in distill if key not in _DISTILL_TYPES)
    if unknown:
        raise ConfigError(
            f"unknown distill setting(s) {', '.join(unknown)}; valid: teacher, temperature, alpha"
        )
    for key, value in distill.items():
        check_value(f"distill {key}", value, _DISTILL_TYPES[key])


def _parse_settings(items: list[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` pairs as a dict, each value read as YAML (``0.5``, ``bn``, ``true``)."""
    settings: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set takes KEY=VALUE (e.g. --set ratio=0.5), got {item!r}")
        try:
            settings[key.strip()] = yaml.safe_load(text)
        except yaml.YAMLError:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML") from None
    return settings


def resolve_config(args: argparse.Namespace, with_method: bool) -> dict[str, Any]:
    """Recipe values overridden by the flags that were given: the run's full settings."""
    cfg = _read_recipe(args.recipe) if args.recipe else {}
    known = {
        "model",
        "model_args",
        "data",
        "data_dir",
        "data_options",
        "train",
        "method",
        "method_config",
        "distill",
        "init",
        "out",
        "activations",
        "device",
    }
    unknown = sorted(str(key) for key in cfg if key not in known)
    if unknown:
        raise ConfigError(
            f"unknown recipe key(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}"
        )
    check_recipe_types(cfg)
    for key in ("model", "data", "data_dir", "out"):
        if getattr(args, key, None) is not None:
            cfg[key] = getattr(args, key)
    train = dict(cfg.get("train") or {})
    for key in _TRAIN_FLAGS:
        if getattr(args, key, None) is not None:
            train[key] = getattr(args, key)
    cfg["train"] = TrainConfig.from_dict(train).to_dict()
    if getattr(args, "init", None) is not None:
        cfg["init"] = args.init
    if with_method:
        if args.method is not None:
            cfg["method"] = args.method
        kd = dict(cfg.get("distill") or {})
        for flag, key in (
            ("teacher", "teacher"),
            ("kd_temperature", "temperature"),
            ("kd_alpha", "alpha"),
        ):
            if getattr(args, flag, None) is not None:
                kd[key] = getattr(args, flag)
        if getattr(args, "no_kd", False):
            flags = ("teacher", "kd_temperature", "kd_alpha")
            if any(getattr(args, f, None) is not None for f in flags):
                raise ConfigError("--no-kd turns distillation off; drop --teacher/--kd-* with it")
            kd = {}
            cfg.pop("distill", None)
        elif not kd.get("teacher") and cfg.get("init") and _distils_from_init(cfg.get("method")):
            kd["teacher"] = cfg["init"]  # from trained weights: KD from them by default
        if kd:
            if not kd.get("teacher"):
                raise ConfigError("--kd-temperature/--kd-alpha need --teacher FILE")
            cfg["distill"] = {"temperature": 4.0, "alpha": 0.9, **kd}
        mc = dict(cfg.get("method_config") or {})
        mc.update(_parse_settings(getattr(args, "set", None) or []))
        for flag, key in _METHOD_FLAGS.items():
            if getattr(args, flag, None) is not None:
                mc[key] = getattr(args, flag)
        for flag, (key, value) in _STORAGE_FLAGS.items():
            if getattr(args, flag, False):
                mc[key] = value
        cfg["method_config"] = mc
        if not cfg.get("method"):
            raise ConfigError("choose a method with --method (or `method:` in the recipe)")
        _device_settings(cfg, args)
    else:
        cfg.pop("method", None)
        cfg.pop("method_config", None)
    for key in ("model", "data"):
        if not cfg.get(key):
            raise ConfigError(f"choose a {key} with --{key} (or `{key}:` in the recipe)")
    cfg.setdefault("out", f"runs/{cfg['model']}-{cfg.get('method', 'fp32')}")
    _activation_settings(cfg, args)
    return cfg


def _distils_from_init(method: str | None) -> bool:
    """Whether ``method`` (a registered name) distils from the weights it starts from."""
    return method in names() and get_method(method).distil_from_init


def _refuse_unknown(what: str, settings: dict[str, Any], valid: tuple[str, ...]) -> None:
    """One line naming the settings of ``what:`` that are not among ``valid``."""
    unknown = sorted(str(k) for k in settings if k not in valid)
    if unknown:
        raise ConfigError(
            f"unknown {what} setting(s) {', '.join(unknown)}; valid: {', '.join(valid)}"
        )


def _activation_settings(cfg: dict[str, Any], args: argparse.Namespace) -> None:
    """``activations:`` with ``--activation-bits`` and ``--qat-epochs`` over it, checked and
    completed (``observer`` mse, no fine-tuning), or removed when neither asks for it."""
    acts = dict(cfg.get("activations") or {})
    if getattr(args, "activation_bits", None) is not None:
        acts["bits"] = args.activation_bits
    if getattr(args, "qat_epochs", None) is not None:
        acts["finetune_epochs"] = args.qat_epochs
    if not acts:
        cfg.pop("activations", None)
        return
    _refuse_unknown("activations", acts, _ACTIVATION_KEYS)
    acts = {"bits": 8, "observer": "mse", "finetune_epochs": 0, **acts}
    if isinstance(acts["bits"], bool) or acts["bits"] not in (8, 4):
        raise ConfigError(f"activations bits must be 8 or 4, got {acts['bits']!r}")
    epochs = acts["finetune_epochs"]
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ConfigError(f"activations finetune_epochs must be 0 or more, got {epochs!r}")
    cfg["activations"] = acts


def _device_settings(cfg: dict[str, Any], args: argparse.Namespace) -> None:
    """``device:`` with ``--flash``, ``--ram`` and ``--board`` over it (a board gives its core,
    and its flash and RAM where they are not given), checked, or removed when none asks."""
    device = dict(cfg.get("device") or {})
    for key in ("flash", "ram"):
        if getattr(args, key, None) is not None:
            device[key] = getattr(args, key)
    name = getattr(args, "board", None)
    if name is not None:
        b = board(name)
        device = {"flash": b.flash_bytes, "ram": b.ram_bytes, **device, "core": b.core}
    if not device:
        cfg.pop("device", None)
        return
    _refuse_unknown("device", device, _DEVICE_KEYS)
    if device.get("flash") is None and device.get("ram") is None:
        raise ConfigError("a device budget needs flash or ram (e.g. --flash 64KB --ram 16KB)")
    for key in ("flash", "ram"):
        if device.get(key) is not None:
            parse_size(device[key])  # refuses a bad size in one line
    device.setdefault("core", "cortex-m3")
    if device["core"] not in CODE_BYTES:
        raise ConfigError(f"device core must be one of {', '.join(CODE_BYTES)}")
    cfg["device"] = device


def _set_threads(threads: int | None) -> None:
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {threads}")
    local = os.environ.get("LOCAL_WORLD_SIZE", "1")  # torchrun: processes share the cores
    per_process = (os.cpu_count() or 1) // (int(local) if local.isdigit() and local != "0" else 1)
    torch.set_num_threads(threads or max(1, per_process))


#: Flags that may change when a run is resumed (the new values go into its config.yaml).
_RESUME_OVERRIDES = ("epochs", "lr", "weight_decay", "bn_recalibrate")
#: Flags that cannot: (flag, where its value lives in config.yaml).
_RESUME_FIXED = (
    ("model", ("model",)),
    ("data", ("data",)),
    ("batch_size", ("train", "batch_size")),
    ("slimming_l1", ("train", "slimming_l1")),
    ("optimizer", ("train", "optimizer")),
    ("seed", ("train", "seed")),
    ("method", ("method",)),
    ("init", ("init",)),
    ("slice_channels", ("method_config", "slice_channels")),
    ("num_filters", ("method_config", "num_filters")),
    ("teacher", ("distill", "teacher")),
    ("kd_temperature", ("distill", "temperature")),
    ("kd_alpha", ("distill", "alpha")),
)


def resume_config(
    args: argparse.Namespace, ctx: DistContext, err: Console
) -> tuple[dict[str, Any], bool, bool]:
    """The settings of the run in ``--out`` with the flags that may change applied, whether
    it has a checkpoint, and whether the settings changed."""
    if args.out is None:
        raise CnnpressError("--resume needs --out RUN, the folder of the run to continue")
    if args.recipe:
        raise CnnpressError(
            f"--recipe cannot be used with --resume; the run's settings are in "
            f"{Path(args.out) / 'config.yaml'}"
        )
    out = Path(args.out)

    def read() -> bytes:  # rank 0 reads, every rank gets it
        return json.dumps(read_run(out)).encode()

    state = json.loads(broadcast_bytes(read, ctx, f"reading {out}"))
    cfg = state["config"]
    for flag, where in _RESUME_FIXED:
        given = getattr(args, flag, None)
        have: Any = cfg
        for key in where:
            have = have.get(key) if isinstance(have, dict) else None
        if given is not None and given != have:
            name = "--" + flag.replace("_", "-")
            raise CnnpressError(
                f"{name} {given} differs from the run's {have!r} and cannot change on --resume; "
                "drop it, or start a new run with another --out"
            )
    for key, given in _parse_settings(getattr(args, "set", None) or []).items():
        recorded = cfg.get("method_config") or {}
        if key not in recorded or given != recorded[key]:
            have = repr(recorded[key]) if key in recorded else "default"
            raise CnnpressError(
                f"--set {key}={given} differs from the run's {key} ({have}) and cannot change "
                "on --resume; drop it, or start a new run with another --out"
            )
    cfg["out"] = str(out)
    if args.data_dir is not None:
        cfg["data_dir"] = args.data_dir
    changed = {
        k: getattr(args, k)
        for k in _RESUME_OVERRIDES
        if getattr(args, k, None) is not None and getattr(args, k) != cfg["train"].get(k)
    }
    if changed:
        cfg["train"] = TrainConfig.from_dict({**cfg["train"], **changed}).to_dict()
        err.print("resuming with " + ", ".join(f"{k}={v}" for k, v in changed.items()), **PLAIN)
    if not state["checkpoint"]:
        err.print(f"{out} has no checkpoint yet; starting it from epoch 1", **PLAIN)
    return cfg, state["checkpoint"], bool(changed)


def _run(args: argparse.Namespace, console: Console, err: Console, with_method: bool) -> dict:
    _set_threads(args.threads)
    ctx = init_distributed()
    try:
        result = _train_run(args, console, err if ctx.is_main else _QUIET, with_method, ctx)
    except BaseException:
        shutdown(ctx, ok=False)
        raise
    shutdown(ctx)
    return result


_QUIET = Console(stderr=True, quiet=True)


def _train_run(
    args: argparse.Namespace, console: Console, err: Console, with_method: bool, ctx: DistContext
) -> dict | None:
    resume = changed = False
    if args.resume:
        cfg, resume, changed = resume_config(args, ctx, err)
    else:
        cfg = resolve_config(args, with_method)
    return train_config(
        cfg, console, err, ctx, new=not args.resume, resume=resume, changed=changed, quiet=args.json
    )


def train_config(
    cfg: dict[str, Any],
    console: Console,
    err: Console,
    ctx: DistContext,
    *,
    new: bool = True,
    resume: bool = False,
    changed: bool = False,
    quiet: bool = False,
) -> dict | None:
    """``cnnpress.run.train_run``, then the result table unless ``quiet``."""
    record = train_run(cfg, err, ctx, new=new, resume=resume, changed=changed)
    if record is not None and not quiet:
        _print_result(console, record)
    return record


def _print_result(console: Console, r: dict[str, Any]) -> None:
    t = Table(title=f"{r['model']} on {r['data']}: test accuracy and file size (.cnnp)")
    for col in ("model", "test accuracy", "file bytes", "ratio (file)", "epochs", "train time"):
        t.add_column(col, justify="left" if col == "model" else "right")
    b = r.get("before")
    if b:
        size = f"{b['file_bytes']:,}" if b.get("file_bytes") else "-"
        ratio = f"{b['ratio']:.1f}x" if b.get("ratio") else "-"
        t.add_row(f"before: {b['model']}", f"{b['test_accuracy']:.2f}%", size, ratio, "", "")
    t.add_row(
        ("after: " if b else "") + r["method"],
        f"{r['test_accuracy']:.2f}%",
        f"{r['file_bytes']:,}",
        f"{r['ratio']:.1f}x",
        str(r["epochs"]),
        f"{r['train_seconds'] / 60:.1f} min",
    )
    console.print(t)


def cmd_train(args: argparse.Namespace, console: Console, err: Console) -> dict:
    """``cnnpress train``: full-precision training."""
    return _run(args, console, err, with_method=False)


def cmd_compress(args: argparse.Namespace, console: Console, err: Console) -> dict:
    """``cnnpress compress``: convert with a method, then train (from scratch or --init)."""
    return _run(args, console, err, with_method=True)
