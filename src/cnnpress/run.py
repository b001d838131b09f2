"""One run as a library object: data, model, method, training, then the file and its result.

A run's settings are one dict (a recipe resolved against the command line: ``model``,
``model_args``, ``data``, ``data_dir``, ``data_options``, ``train``, ``method``,
``method_config``, ``init``, ``distill``, ``out``, ``activations``, ``device``: a flash and
RAM budget of the C program, planned by ``cnnpress.compress``). :func:`train_run` builds
the model, compresses it, trains it in ``out`` (resumable per epoch,
:mod:`cnnpress.train.loop`), gives it integer activations where ``activations`` asks
(:func:`cnnpress.quantize`), saves ``model.cnnp`` and writes ``result.json``; the CLI only
parses for it and prints its record.
"""

from __future__ import annotations

import json
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console
from torch import nn

from cnnpress import models
from cnnpress.api import compress, load, load_model, quantize, save
from cnnpress.atomic import atomic_write_text
from cnnpress.budget import parse_size
from cnnpress.cost import summary
from cnnpress.data import DatasetSpec, Loader, load_dataset
from cnnpress.errors import CnnpressError, ConfigError
from cnnpress.format import read_info
from cnnpress.methods import get as get_method
from cnnpress.methods.distill import make_kd_loss
from cnnpress.pretrained import resolve
from cnnpress.provenance import provenance
from cnnpress.runtime.boards import fit_budget, program_memory
from cnnpress.train.checkpoint import check_checkpoint
from cnnpress.train.config import TrainConfig
from cnnpress.train.distributed import DistContext, run_on_main
from cnnpress.train.loop import evaluate, fit

__all__ = ["loaders", "read_run", "train_run"]

_BUDGET_KEYS = ("target_size", "target_ratio")


def loaders(
    cfg: dict[str, Any], train: TrainConfig, ctx: DistContext
) -> tuple[Loader, Loader, DatasetSpec]:
    """This process's training loader, the test loader and the dataset's spec."""
    if train.batch_size % ctx.world_size:
        raise ConfigError(
            f"--batch-size {train.batch_size} must be a multiple of the {ctx.world_size} "
            f"processes (each takes batch-size / {ctx.world_size} samples of every step)"
        )
    options = dict(cfg.get("data_options") or {})
    train_set = load_dataset(cfg["data"], "train", cfg.get("data_dir"), **options)
    test_set = load_dataset(cfg["data"], "test", cfg.get("data_dir"), **options)
    per_rank = train.batch_size // ctx.world_size
    return (
        Loader(train_set, per_rank, True, train.seed, rank=ctx.rank, world_size=ctx.world_size),
        Loader(test_set, 256, train=False),
        train_set.spec,
    )


def read_run(out: Path) -> dict[str, Any]:
    """The settings of the run in ``out`` (its config.yaml, checked) and whether it has a
    checkpoint: ``{"config": ..., "checkpoint": bool}``."""
    if not out.is_dir():
        raise CnnpressError(f"cannot resume: {out} does not exist; start the run without --resume")
    path = out / "config.yaml"
    if not path.is_file():
        raise CnnpressError(
            f"cannot resume: {out} holds no cnnpress run (no config.yaml); "
            "start a new run there without --resume"
        )
    try:
        cfg = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CnnpressError(f"cannot resume: {path} is corrupt ({first})") from None
    missing = [k for k in ("model", "data", "train") if not isinstance(cfg, dict) or k not in cfg]
    if missing:
        raise CnnpressError(f"cannot resume: {path} lacks {', '.join(missing)}; is it a run?")
    return {"config": cfg, "checkpoint": (out / "checkpoint.safetensors").is_file()}


def _new_run(run_dir: Path, cfg: dict[str, Any]) -> None:
    """Rank 0: refuse to overwrite a run, then write its config.yaml."""
    if run_dir.exists() and not run_dir.is_dir():
        raise CnnpressError(f"--out {run_dir} is a file; choose a folder")
    if (run_dir / "checkpoint.safetensors").exists():
        raise CnnpressError(
            f"{run_dir} already holds a run; continue it with --resume or choose another --out"
        )
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(cfg, sort_keys=False))


def _save_changed(run_dir: Path, cfg: dict[str, Any], model: nn.Module, has_ckpt: bool) -> None:
    """Rank 0, on a resume with new settings: check the checkpoint fits, then save them."""
    if has_ckpt:
        check_checkpoint(run_dir / "checkpoint.safetensors", model)
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(cfg, sort_keys=False))


def _show(arch: dict[str, Any]) -> str:
    rest = ", ".join(f"{k}={v}" for k, v in arch.items() if k != "name")
    return f"{arch.get('name')}({rest})"


def _trained(init: str, model: nn.Module) -> nn.Module:
    """The full-precision model ``init`` holds, checked to be of ``model``'s architecture."""
    trained, meta = load_model(init)
    want = models.arch_of(model)
    if meta["arch"] != want:
        raise CnnpressError(
            f"--init {init} holds a {_show(meta['arch'])}, but this run builds a {_show(want)}; "
            "pass the --model, model_args and --data it was trained with, or another --init"
        )
    if meta.get("method"):
        raise CnnpressError(
            f"--init {init} is already compressed with {meta['method']['name']}; --init takes "
            "a full-precision model (a `cnnpress train` run); continue a run with --resume"
        )
    return trained.train()


def _measure_start(
    model: nn.Module, where: str, test_loader: Loader, spec: DatasetSpec
) -> dict[str, Any]:
    """Test accuracy, file bytes and ratio of the trained model a run starts from."""
    path = resolve(where)
    path = path / "model.cnnp" if path.is_dir() else path
    record: dict[str, Any] = {"model": str(where)}
    record["test_accuracy"] = evaluate(model, test_loader)["accuracy"]
    if path.suffix == ".cnnp" and path.is_file():
        cost = summary(model, (spec.in_channels, *spec.image_size))
        cost.attach_file(read_info(path))
        record.update(file_bytes=cost.file["file_bytes"], ratio=cost.file["ratio"])
    model.train()
    return record


def _build(
    cfg: dict[str, Any], spec: DatasetSpec, test_loader: Loader, ctx: DistContext, resume: bool
) -> tuple[nn.Module, dict[str, Any] | None, dict[str, Any] | None]:
    """The run's model (from ``init`` and compressed, as its settings say), the measurement
    of the model it starts from, and the size budget it was planned for."""
    model = models.create(
        cfg["model"],
        in_channels=spec.in_channels,
        num_classes=spec.num_classes,
        **(cfg.get("model_args") or {}),
    )
    before = budget = None
    if cfg.get("init"):  # also on a resume: the conversion reads the weights (masks, counts)
        model = _trained(cfg["init"], model)
        if ctx.is_main and not resume:  # the "before" of the before/after table
            before = _measure_start(model, cfg["init"], test_loader, spec)
    if cfg.get("method"):
        given = cfg["method_config"]
        device = cfg.pop("device", None)
        shape = (spec.in_channels, *spec.image_size)
        model = compress(model, cfg["method"], **_device_args(cfg, device, shape), **given)
        if device or any(given.get(k) is not None for k in _BUDGET_KEYS):
            # The budget chose per-layer settings (and activations): keep them, so that a
            # resume (and anyone reading config.yaml) rebuilds the same without planning again.
            budget = {k: given.get(k) for k in _BUDGET_KEYS}
            cfg["method_config"] = model.cnnpress_method["config"]
        if device:
            budget["device"] = {**device, "plan": model.cnnpress_device}
            bits = model.cnnpress_device["activation_bits"]
            if bits is not None and not cfg.get("activations"):
                cfg["activations"] = {"bits": bits, "observer": "mse", "finetune_epochs": 0}
    return model, before, budget


def _device_args(
    cfg: dict[str, Any], device: dict[str, Any] | None, shape: tuple[int, int, int]
) -> dict[str, Any]:
    """``compress``'s flash and RAM budget arguments of a run's ``device`` settings."""
    if not device:
        return {}
    acts = cfg.get("activations")
    return {
        "target_flash": device.get("flash"),
        "target_ram": device.get("ram"),
        "core": device.get("core", "cortex-m3"),
        "input_shape": shape,
        "activation_bits": acts["bits"] if acts else None,
    }


def _kd_loss(cfg: dict[str, Any], ctx: DistContext) -> Any:
    kd = cfg.get("distill")
    if not kd:
        return None
    teacher, _ = load_model(kd["teacher"])
    return make_kd_loss(teacher.to(ctx.device), kd["temperature"], kd["alpha"])


def _integer(
    cfg: dict[str, Any], model: nn.Module, train_loader: Loader, ctx: DistContext, err: Console
) -> nn.Module:
    """The trained model with integer activations where the run asks for them
    (``activations``: calibrated on 1,000 training images, after ``finetune_epochs`` of
    quantization-aware fine-tuning), else the model itself."""
    acts = cfg.get("activations")
    if not acts:
        return model
    if ctx.world_size > 1:
        raise ConfigError("integer activations (activations:) are made in one process")
    epochs = int(acts.get("finetune_epochs") or 0)

    def progress(step: int, steps: int, loss: float) -> None:
        if step % 100 == 0 or step == steps:
            err.print(f"quantization-aware fine-tuning: step {step}/{steps}, loss {loss:.4f}")

    return quantize(
        model,
        Loader(train_loader.dataset, 256, train=False),
        bits=acts["bits"],
        observer=acts.get("observer", "mse"),
        finetune=train_loader if epochs else None,
        epochs=epochs,
        progress=progress,
    )


def _save_model(
    model: nn.Module, run_dir: Path, meta: dict, result: dict, ctx: DistContext, test: Loader
) -> float | None:
    """Rank 0: the trained model as ``model.cnnp``, with the test accuracy of the saved file
    (read back; integer activations and int8 floats included) in its provenance; that
    accuracy (``None`` off rank 0)."""
    path = run_dir / "model.cnnp"

    def write(accuracy: float) -> None:
        prov = {
            **(meta.get("provenance") or {}),
            "test_accuracy": accuracy,
            "epochs": result["epochs"],
        }
        save(model, path, dataset=meta.get("dataset"), provenance=prov)

    run_on_main(partial(write, result["test_accuracy"]), ctx, f"saving {path}")
    if not ctx.is_main:
        return None
    accuracy = evaluate(load(path), test)["accuracy"]
    if accuracy != result["test_accuracy"]:  # the same bits, the file's accuracy recorded
        write(accuracy)
    return accuracy


def train_run(
    cfg: dict[str, Any],
    err: Console,
    ctx: DistContext,
    *,
    new: bool = True,
    resume: bool = False,
    changed: bool = False,
) -> dict[str, Any] | None:
    """Train one run from its full settings; its result record (``None`` off rank 0).

    Args:
        cfg: The run's settings (module docstring); a size budget is replaced in
            ``cfg["method_config"]`` by the per-layer settings it planned.
        err: Where progress and epoch lines go.
        ctx: The distributed context (one process: ``DistContext()``).
        new: A new run (its folder must not hold one); else a resume.
        resume: Continue from the folder's checkpoint.
        changed: The settings differ from the folder's config.yaml (save them).
    """
    train_cfg = TrainConfig.from_dict(cfg["train"])
    train_loader, test_loader, spec = loaders(cfg, train_cfg, ctx)
    torch.manual_seed(train_cfg.seed)
    model, before, budget = _build(cfg, spec, test_loader, ctx, resume)
    run_dir = Path(cfg["out"])
    if new:
        run_on_main(lambda: _new_run(run_dir, cfg), ctx, f"creating {run_dir}")
    elif changed:  # keep the new settings, once the checkpoint is known to fit
        run_on_main(lambda: _save_changed(run_dir, cfg, model, resume), ctx, "saving config")
    prov = provenance()
    meta = {"dataset": spec.to_dict(), "provenance": prov}
    method = get_method(cfg["method"])() if cfg.get("method") else None
    start = time.perf_counter()
    result = fit(
        model,
        train_loader,
        test_loader,
        train_cfg,
        run_dir,
        resume=resume,
        console=err,
        extra_meta=meta,
        loss_fn=_kd_loss(cfg, ctx),
        method=method,
        dist=ctx,
        eval_at_start=bool(cfg.get("init")),
    )
    model = _integer(cfg, model, train_loader, ctx, err)
    file_accuracy = _save_model(model, run_dir, meta, result, ctx, test_loader)
    if not ctx.is_main:
        return None
    record = _record(cfg, model, spec, {**result, "file_accuracy": file_accuracy}, prov, ctx)
    if cfg.get("activations"):  # the file's own accuracy is its integer program's
        record["activations"] = cfg["activations"]
        record["int_test_accuracy"] = file_accuracy
    if budget and budget.get("device"):  # the trained program, measured against the budget
        record["device_program"] = _program_fit(model, spec, budget["device"])
    wall = time.perf_counter() - start
    record.update(budget=budget, before=before, wall_seconds_this_process=wall)
    atomic_write_text(run_dir / "result.json", json.dumps(record, indent=2) + "\n")
    return record


def _program_fit(model: nn.Module, spec: DatasetSpec, device: dict[str, Any]) -> dict[str, Any]:
    """The C program's flash and RAM of the saved model on the device's core, and whether
    it fits the device's budget."""
    memory = program_memory(model, (spec.in_channels, *spec.image_size), device["core"])
    limits = [None if device.get(k) is None else parse_size(device[k]) for k in ("flash", "ram")]
    return {**memory, **fit_budget(memory, *limits)}


def _record(
    cfg: dict[str, Any],
    model: nn.Module,
    spec: DatasetSpec,
    result: dict[str, Any],
    prov: dict[str, Any],
    ctx: DistContext,
) -> dict[str, Any]:
    """The run's result: its settings, accuracy, time, and the sizes measured on its file."""
    cost = summary(model, (spec.in_channels, *spec.image_size))
    cost.attach_file(read_info(Path(cfg["out"]) / "model.cnnp"))
    totals = cost.totals
    record = {
        **prov,
        **{k: cfg.get(k) for k in ("model", "data", "method_config", "init", "distill", "train")},
        "method": cfg.get("method", "fp32"),
        "world_size": ctx.world_size,
        # What a run reports is its file's accuracy; the model in memory's is kept beside it.
        "test_accuracy": result["file_accuracy"],
        "trained_test_accuracy": result["test_accuracy"],
        "init_test_accuracy": next(
            (h.get("test_accuracy") for h in result["history"] if h["epoch"] == -1), None
        ),
        "epochs": result["epochs"],
        "train_seconds": result["train_seconds"],
        "file_bytes": cost.file["file_bytes"],
        "ratio": cost.file["ratio"],
        "ratio_payload": totals["ratio"],
        "compressed_layers_ratio": totals["compressed_ratio"],
        "stored_bits": totals["stored_bits"],
        "fp32_bits": totals["fp32_bits"],
    }
    if cfg.get("method"):
        record.update(get_method(cfg["method"])().report(getattr(model, "float_model", model)))
    return record
