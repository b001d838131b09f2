"""What each subcommand does; ``main`` handles parsing and errors."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console
from rich.table import Table

from cnnpress import models
from cnnpress.api import compress
from cnnpress.cost import summary
from cnnpress.data import DatasetSpec, Loader, get_spec, load_dataset
from cnnpress.errors import CnnpressError, ConfigError
from cnnpress.methods import get as get_method
from cnnpress.provenance import provenance
from cnnpress.train.atomic import atomic_write_text
from cnnpress.train.checkpoint import load_model
from cnnpress.train.config import TrainConfig
from cnnpress.train.loop import evaluate, fit

__all__ = [
    "cmd_compress",
    "cmd_evaluate",
    "cmd_export",
    "cmd_predict",
    "cmd_summary",
    "cmd_train",
    "resolve_config",
]

_TRAIN_FLAGS = ("epochs", "batch_size", "lr", "optimizer", "weight_decay", "bn_recalibrate", "seed")
_METHOD_FLAGS = {"slice_channels": "slice_channels", "num_filters": "num_filters"}


def _read_recipe(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            recipe = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise CnnpressError(f"recipe {path} not found") from None
    except yaml.YAMLError as err:
        raise CnnpressError(
            f"recipe {path} is not valid YAML: {str(err).splitlines()[0]}"
        ) from None
    if not isinstance(recipe, dict):
        raise CnnpressError(f"recipe {path} must be a mapping of settings")
    return recipe


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
        "init",
        "out",
    }
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ConfigError(
            f"unknown recipe key(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}"
        )
    for key in ("model", "data", "data_dir", "out"):
        if getattr(args, key, None) is not None:
            cfg[key] = getattr(args, key)
    train = dict(cfg.get("train") or {})
    for key in _TRAIN_FLAGS:
        if getattr(args, key, None) is not None:
            train[key] = getattr(args, key)
    cfg["train"] = TrainConfig.from_dict(train).to_dict()
    if with_method:
        if args.method is not None:
            cfg["method"] = args.method
        if args.init is not None:
            cfg["init"] = args.init
        kd = dict(cfg.get("distill") or {})
        for flag, key in (
            ("teacher", "teacher"),
            ("kd_temperature", "temperature"),
            ("kd_alpha", "alpha"),
        ):
            if getattr(args, flag, None) is not None:
                kd[key] = getattr(args, flag)
        if kd:
            if not kd.get("teacher"):
                raise ConfigError("--kd-temperature/--kd-alpha need --teacher FILE")
            cfg["distill"] = {"temperature": 4.0, "alpha": 0.9, **kd}
        mc = dict(cfg.get("method_config") or {})
        for flag, key in _METHOD_FLAGS.items():
            if getattr(args, flag, None) is not None:
                mc[key] = getattr(args, flag)
        cfg["method_config"] = mc
        if not cfg.get("method"):
            raise ConfigError("choose a method with --method (or `method:` in the recipe)")
    else:
        cfg.pop("method", None)
        cfg.pop("method_config", None)
    for key in ("model", "data"):
        if not cfg.get(key):
            raise ConfigError(f"choose a {key} with --{key} (or `{key}:` in the recipe)")
    cfg.setdefault("out", f"runs/{cfg['model']}-{cfg.get('method', 'fp32')}")
    return cfg


def _set_threads(threads: int | None) -> None:
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(threads or os.cpu_count() or 1)


def _loaders(cfg: dict[str, Any], train: TrainConfig) -> tuple[Loader, Loader, DatasetSpec]:
    options = dict(cfg.get("data_options") or {})
    train_set = load_dataset(cfg["data"], "train", cfg.get("data_dir"), **options)
    test_set = load_dataset(cfg["data"], "test", cfg.get("data_dir"), **options)
    return (
        Loader(train_set, train.batch_size, train=True, seed=train.seed),
        Loader(test_set, 256, train=False),
        train_set.spec,
    )


def _run(args: argparse.Namespace, console: Console, err: Console, with_method: bool) -> dict:
    _set_threads(args.threads)
    out = Path(args.out) if args.out else None
    if args.resume:
        if out is None or not (out / "config.yaml").is_file():
            raise CnnpressError("--resume needs --out pointing at an existing run folder")
        cfg = yaml.safe_load((out / "config.yaml").read_text())
    else:
        cfg = resolve_config(args, with_method)
    train_cfg = TrainConfig.from_dict(cfg["train"])
    train_loader, test_loader, spec = _loaders(cfg, train_cfg)
    torch.manual_seed(train_cfg.seed)
    model = models.create(
        cfg["model"],
        in_channels=spec.in_channels,
        num_classes=spec.num_classes,
        **(cfg.get("model_args") or {}),
    )
    if cfg.get("init"):
        trained, meta = load_model(cfg["init"])
        if meta["arch"] != models.arch_of(model):
            raise CnnpressError(
                f"--init {cfg['init']} holds a {meta['arch']['name']} for "
                f"{meta['arch']['in_channels']}-channel input and {meta['arch']['num_classes']} "
                f"classes, not the {cfg['model']} of this run"
            )
        model = trained.train()
    if cfg.get("method"):
        model = compress(model, cfg["method"], **cfg["method_config"])
    run_dir = Path(cfg["out"])
    run_dir.mkdir(parents=True, exist_ok=True)
    if not args.resume:
        if (run_dir / "checkpoint.safetensors").exists():
            raise CnnpressError(
                f"{run_dir} already holds a run; continue it with --resume or choose another --out"
            )
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(cfg, sort_keys=False))
    prov = provenance()
    meta = {"dataset": spec.to_dict(), "provenance": prov}
    loss_fn = None
    if cfg.get("distill"):
        from cnnpress.methods.distill import make_kd_loss

        kd = cfg["distill"]
        teacher, _ = load_model(kd["teacher"])
        loss_fn = make_kd_loss(teacher, kd["temperature"], kd["alpha"])
    method = get_method(cfg["method"])() if cfg.get("method") else None
    start = time.perf_counter()
    result = fit(
        model,
        train_loader,
        test_loader,
        train_cfg,
        run_dir,
        resume=args.resume,
        console=err,
        extra_meta=meta,
        loss_fn=loss_fn,
        method=method,
    )
    totals = summary(model, (spec.in_channels, *spec.image_size)).totals
    record = {
        **prov,
        "model": cfg["model"],
        "data": cfg["data"],
        "method": cfg.get("method", "fp32"),
        "method_config": cfg.get("method_config"),
        "init": cfg.get("init"),
        "distill": cfg.get("distill"),
        "train": cfg["train"],
        "test_accuracy": result["test_accuracy"],
        "epochs": result["epochs"],
        "train_seconds": result["train_seconds"],
        "wall_seconds_this_process": time.perf_counter() - start,
        "ratio_payload": totals["ratio"],
        "compressed_layers_ratio": totals["compressed_ratio"],
        "stored_bits": totals["stored_bits"],
        "fp32_bits": totals["fp32_bits"],
    }
    from cnnpress.methods.slbf import describe

    if cfg.get("method") == "slbf":
        record["bank_usage"] = describe(model)
    atomic_write_text(run_dir / "result.json", json.dumps(record, indent=2) + "\n")
    if not args.json:
        _print_result(console, record)
    return record


def _print_result(console: Console, r: dict[str, Any]) -> None:
    t = Table(title=f"{r['model']} {r['method']} on {r['data']}")
    for col in ("test accuracy", "epochs", "train time", "ratio (payload)", "compressed layers"):
        t.add_column(col, justify="right")
    t.add_row(
        f"{r['test_accuracy']:.2f}%",
        str(r["epochs"]),
        f"{r['train_seconds'] / 60:.1f} min",
        f"{r['ratio_payload']:.1f}x",
        f"{r['compressed_layers_ratio']:.1f}x",
    )
    console.print(t)


def cmd_train(args: argparse.Namespace, console: Console, err: Console) -> dict:
    """``cnnpress train``: full-precision training."""
    return _run(args, console, err, with_method=False)


def cmd_compress(args: argparse.Namespace, console: Console, err: Console) -> dict:
    """``cnnpress compress``: convert with a method, then train (from scratch or --init)."""
    return _run(args, console, err, with_method=True)


def cmd_evaluate(args: argparse.Namespace, console: Console, err: Console) -> dict:
    """``cnnpress evaluate``: test accuracy of a saved model."""
    _set_threads(args.threads)
    model, meta = load_model(args.model_file)
    spec = DatasetSpec.from_dict(meta["dataset"])
    name = args.data or spec.name
    if get_spec(name).in_channels != spec.in_channels:
        raise CnnpressError(
            f"{args.model_file} takes {spec.in_channels}-channel images, {name} "
            f"has {get_spec(name).in_channels}"
        )
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
        raise CnnpressError(f"{path} records no dataset; pass the input shape or --data")
    return DatasetSpec.from_dict(meta["dataset"])


def cmd_summary(args: argparse.Namespace, console: Console, err: Console) -> dict:
    """``cnnpress summary``: the per-layer cost table, with the real file's bytes."""
    from cnnpress.format import read_info

    model, meta = load_model(args.model_file)
    if args.input_shape:
        try:
            shape = tuple(int(v) for v in args.input_shape.split(","))
        except ValueError:
            raise CnnpressError(f"--input-shape must be C,H,W, got {args.input_shape!r}") from None
    else:
        spec = _dataset_of(meta, args.model_file)
        shape = (spec.in_channels, *spec.image_size)
    path = Path(args.model_file)
    path = path / "model.cnnp" if path.is_dir() else path
    info = read_info(path) if path.suffix == ".cnnp" else None
    float_bits = info["manifest"].get("float_bits", 32) if info else 32
    s = summary(model, shape, float_bits=float_bits)
    if info is not None:
        s.attach_file(info)
    if not args.json:
        console.print(s.table())
    return s.to_dict()


def cmd_predict(args: argparse.Namespace, console: Console, err: Console) -> dict:
    """``cnnpress predict``: classes of the images in a file, from the model file alone."""
    from cnnpress.cli.predict import read_images

    model, meta = load_model(args.model_file)
    spec = _dataset_of(meta, args.model_file)
    x = read_images(args.input, spec)
    with torch.no_grad():
        probs = torch.softmax(model(x), dim=1)
    conf, cls = probs.max(dim=1)
    preds = [
        {"index": i, "class": spec.class_names[c], "label": int(c), "probability": float(p)}
        for i, (c, p) in enumerate(zip(cls.tolist(), conf.tolist(), strict=True))
    ]
    if not args.json:
        t = Table(title=f"predictions of {args.model_file}")
        for col in ("image", "class", "probability"):
            t.add_column(col, justify="right" if col != "class" else "left")
        for p in preds[: args.limit]:
            t.add_row(str(p["index"]), p["class"], f"{p['probability']:.3f}")
        console.print(t)
        if len(preds) > args.limit:
            console.print(f"... {len(preds) - args.limit} more (use --json for all)")
    return {"model_file": args.model_file, "input": args.input, "predictions": preds}


def cmd_export(args: argparse.Namespace, console: Console, err: Console) -> dict:
    """``cnnpress export``: an ONNX graph of a model file."""
    from cnnpress.runtime.onnx import export_onnx

    model, meta = load_model(args.model_file)
    spec = _dataset_of(meta, args.model_file)
    out = export_onnx(model, args.onnx, (spec.in_channels, *spec.image_size), mode=args.mode)
    result = {
        "model_file": args.model_file,
        "onnx": str(out),
        "mode": args.mode,
        "bytes": Path(out).stat().st_size,
    }
    if not args.json:
        console.print(f"wrote {out} ({result['bytes']:,} bytes, SLBF as {args.mode})")
    return result
