"""The training loop: SGD/Adam with a cosine schedule, progress, metrics, checkpoints, resume.

A run folder holds ``config.yaml`` (the resolved settings), ``metrics.jsonl`` (one JSON line
per epoch), ``checkpoint.safetensors`` (the state after the last finished epoch) and, at the
end, the packed model ``model.cnnp`` (and the caller's ``result.json``). Every file is written
atomically, so a killed run leaves the folder consistent and ``resume=True`` continues from
the last finished epoch with the same data order (it depends only on the seed and the epoch).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from cnnpress.errors import CnnpressError
from cnnpress.methods.filter_prune import slimming_penalty
from cnnpress.train.atomic import atomic_write_text, remove_stale_temps
from cnnpress.train.checkpoint import load_checkpoint, save_checkpoint
from cnnpress.train.config import TrainConfig
from cnnpress.train.distributed import (
    DistContext,
    all_reduce_sum,
    any_rank,
    broadcast_bytes,
    current,
    run_on_main,
    synced_batchnorm,
    wrap_model,
)

__all__ = ["RUN_FILES", "evaluate", "fit", "lr_at", "make_optimizer", "recalibrate_batchnorm"]

#: Print a line as it is: no markup (paths may hold brackets), no wrapping.
PLAIN: dict[str, bool] = {"markup": False, "highlight": False, "soft_wrap": True}

#: The files of a run folder (each written atomically).
RUN_FILES = ("config.yaml", "metrics.jsonl", "checkpoint.safetensors", "model.cnnp", "result.json")

NO_DECAY_NAMES = ("shift",)  # XNOR-Net's input thresholds: decay pulls them to 0


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD or Adam; XNOR-Net's input thresholds get no weight decay."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name.rsplit(".", 1)[-1] in NO_DECAY_NAMES else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)


def lr_at(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Linear warm-up, then cosine decay to zero over all steps."""
    total = cfg.epochs * steps_per_epoch
    warm = int(cfg.warmup_epochs * steps_per_epoch)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return 0.5 * cfg.lr * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _device_of(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable) -> dict[str, float]:
    """Mean cross-entropy and top-1 accuracy (in %) over ``loader``, in eval mode."""
    was_training = model.training
    model.eval()
    device = _device_of(model)
    loss_sum, correct, count = 0.0, 0, 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        out = model(x)
        loss_sum += F.cross_entropy(out, y, reduction="sum").item()
        correct += (out.argmax(1) == y).sum().item()
        count += y.numel()
    model.train(was_training)
    return {"loss": loss_sum / max(1, count), "accuracy": 100.0 * correct / max(1, count)}


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, loader: Iterable, batches: int) -> None:
    """Re-estimate BatchNorm running statistics as plain averages over ``batches`` batches."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or batches <= 0:
        return
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    was_training = model.training
    model.train()
    for i, (x, _) in enumerate(loader):
        if i >= batches:
            break
        model(x.to(_device_of(model)))
    for m, mom in zip(bns, saved, strict=True):
        m.momentum = mom
    model.train(was_training)


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}  acc {task.fields[acc]:.1f}%"),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    )


def fit(
    model: nn.Module,
    train_loader: Any,
    test_loader: Any,
    cfg: TrainConfig,
    run_dir: str | Path,
    resume: bool = False,
    loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    on_epoch_end: Callable[[nn.Module, int, int], None] | None = None,
    console: Console | None = None,
    extra_meta: dict[str, Any] | None = None,
    method: Any | None = None,
    dist: DistContext | None = None,
    eval_at_start: bool = False,
) -> dict[str, Any]:
    """Train ``model`` in place and write the run folder.

    Args:
        model: The model to train.
        train_loader: A ``cnnpress.data.Loader`` over the training split (has ``set_epoch``);
            in a distributed run, this rank's share (``rank``/``world_size`` set).
        test_loader: Loader over the test split (accuracy is reported, never tuned on); only
            rank 0 evaluates.
        cfg: Training settings.
        run_dir: Run folder (created).
        resume: Continue from ``run_dir/checkpoint.safetensors``.
        loss_fn: ``loss_fn(logits, targets, inputs)``; default cross-entropy.
        on_epoch_end: Called as ``on_epoch_end(model, epoch, epochs)`` after each epoch.
        console: Where progress and epoch lines go (rank 0 only).
        extra_meta: Saved with the checkpoints and the model (dataset spec, provenance).
        method: The compression method (a ``cnnpress.methods.Method``): its ``regulariser``
            is added to the loss and its ``on_epoch_end`` runs after each epoch.
        eval_at_start: Before the first epoch of a new run, re-estimate BatchNorm and
            measure the test accuracy (a ``metrics.jsonl`` record with ``epoch: -1``): the
            accuracy right after initialising from trained weights.
        dist: The distributed context (:mod:`cnnpress.train.distributed`); default: the
            initialised process group, if any, else one process. With several processes the
            model is trained through DistributedDataParallel with BatchNorm over the global
            batch, and only rank 0 reads or writes ``run_dir``.

    Returns:
        The final metrics (also written to ``result.json`` by the caller's choice); on ranks
        other than 0 the history is empty.
    """
    ctx = dist or current()
    console = console or Console(stderr=True)
    if not ctx.is_main:
        console = Console(stderr=True, quiet=True)
    run_dir = Path(run_dir)
    ckpt, metrics_path = run_dir / "checkpoint.safetensors", run_dir / "metrics.jsonl"
    run_on_main(lambda: _prepare(run_dir), ctx, f"preparing {run_dir}")
    extra_meta = extra_meta or {}
    model.to(ctx.device)
    optimizer = make_optimizer(model, cfg)
    steps = len(train_loader)
    if steps == 0:
        per = f" ({cfg.batch_size} per process)" if ctx.enabled else ""
        raise CnnpressError(
            f"the training set is smaller than one batch of {cfg.batch_size}{per}; "
            "lower --batch-size"
        )
    start_epoch, history, train_seconds, saved = 0, [], 0.0, None
    if resume:
        data = broadcast_bytes(lambda: _read_checkpoint(ckpt), ctx, f"reading {ckpt}")
        meta = load_checkpoint(ckpt, model, optimizer, data=data)
        start_epoch = saved = meta["epoch"] + 1
        train_seconds = meta.get("train_seconds", 0.0)
        if ctx.is_main and metrics_path.is_file():
            history = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
            history = [h for h in history if h["epoch"] < start_epoch]
        console.print(f"resuming {run_dir} after epoch {start_epoch}/{cfg.epochs}", **PLAIN)
    else:
        torch.manual_seed(cfg.seed)
    loss_fn = loss_fn or (
        lambda out, y, _x: F.cross_entropy(out, y, label_smoothing=cfg.label_smoothing)
    )
    net = wrap_model(model, ctx)
    model.train()
    with synced_batchnorm(model, ctx):
        if eval_at_start and not resume:
            history.append(_evaluate_start(model, train_loader, test_loader, cfg, ctx, console))
        for epoch in range(start_epoch, cfg.epochs):
            train_loader.set_epoch(epoch)
            t0 = time.perf_counter()
            loss_sum, correct, count = 0.0, 0, 0
            before = method.snapshot(model) if method is not None else None
            with _progress(console) as bar:
                task = bar.add_task(
                    f"epoch {epoch + 1}/{cfg.epochs}", total=steps, loss=0.0, acc=0.0
                )
                for i, (x, y) in enumerate(train_loader):
                    x, y = x.to(ctx.device), y.to(ctx.device)
                    lr = lr_at(cfg, epoch * steps + i, steps)
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    out = net(x)
                    loss = loss_fn(out, y, x)
                    if method is not None:
                        reg = method.regulariser(model)
                        if reg is not None:
                            loss = loss + reg
                    if cfg.slimming_l1:
                        loss = loss + slimming_penalty(model, cfg.slimming_l1)
                    finite = bool(torch.isfinite(loss))
                    if any_rank(not finite, ctx):
                        raise _non_finite(
                            loss.item() if not finite else None, epoch, i, ckpt, saved
                        )
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    loss_sum += loss.item() * y.numel()
                    correct += (out.argmax(1) == y).sum().item()
                    count += y.numel()
                    bar.update(task, advance=1, loss=loss_sum / count, acc=100.0 * correct / count)
            epoch_seconds = time.perf_counter() - t0
            train_seconds += epoch_seconds
            loss_sum, correct, count = all_reduce_sum([loss_sum, correct, count], ctx)
            if method is not None:
                method.on_epoch_end(model, epoch, cfg.epochs)
            if on_epoch_end is not None:
                on_epoch_end(model, epoch, cfg.epochs)
            record: dict[str, Any] = {
                "epoch": epoch,
                "lr": lr,
                "train_loss": loss_sum / count,
                "train_accuracy": 100.0 * correct / count,
                "epoch_seconds": epoch_seconds,
            }
            learning = method.learning_stats(model, before) if before is not None else None
            if learning is not None:
                record["learning"] = learning
            if epoch == cfg.epochs - 1 or (epoch + 1) % cfg.eval_every == 0:
                if cfg.bn_recalibrate:  # every rank: the statistics are global ones
                    recalibrate_batchnorm(model, train_loader, cfg.bn_recalibrate)
                if ctx.is_main:  # eval mode: no collective, the other ranks need not wait
                    test = evaluate(model, test_loader)
                    record.update(test_loss=test["loss"], test_accuracy=test["accuracy"])
            history.append(record)

            meta = {"train_seconds": train_seconds, **extra_meta}
            save = partial(_save_epoch, run_dir, history, model, optimizer, epoch, meta)
            run_on_main(save, ctx, f"saving {ckpt}")
            saved = epoch + 1
            acc = record.get("test_accuracy")
            console.print(
                f"epoch {epoch + 1}/{cfg.epochs}  loss {record['train_loss']:.4f}  "
                f"train {record['train_accuracy']:.2f}%"
                + (f"  test {acc:.2f}%" if acc is not None else "")
                + f"  {epoch_seconds:.0f}s",
                **PLAIN,
            )
    model.eval().to("cpu")
    final = history[-1] if history else {}
    from cnnpress.format import save

    prov = {
        **(extra_meta.get("provenance") or {}),
        "test_accuracy": final.get("test_accuracy"),
        "epochs": cfg.epochs,
    }
    run_on_main(
        lambda: save(
            model, run_dir / "model.cnnp", dataset=extra_meta.get("dataset"), provenance=prov
        ),
        ctx,
        f"saving {run_dir / 'model.cnnp'}",
    )
    return {
        "epochs": cfg.epochs,
        "test_accuracy": final.get("test_accuracy"),
        "test_loss": final.get("test_loss"),
        "train_seconds": train_seconds,
        "history": history,
    }


def _evaluate_start(
    model: nn.Module,
    train_loader: Any,
    test_loader: Iterable,
    cfg: TrainConfig,
    ctx: DistContext,
    console: Console,
) -> dict[str, Any]:
    """The ``epoch: -1`` record: test accuracy before any training (after BN re-estimation)."""
    recalibrate_batchnorm(model, train_loader, cfg.bn_recalibrate or 50)
    record: dict[str, Any] = {"epoch": -1}
    if ctx.is_main:
        test = evaluate(model, test_loader)
        record.update(test_loss=test["loss"], test_accuracy=test["accuracy"])
        console.print(f"before training  test {test['accuracy']:.2f}%", **PLAIN)
    model.train()
    return record


def _save_epoch(
    run_dir: Path,
    history: list[dict[str, Any]],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    epoch: int,
    meta: dict[str, Any],
) -> None:
    """The metrics so far, then the checkpoint (each atomic; a crash between them is fine:
    resume drops metric lines past the checkpoint's epoch)."""
    atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history))
    save_checkpoint(run_dir / "checkpoint.safetensors", model, optimizer, epoch, meta)


def _prepare(run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(run_dir, RUN_FILES)


def _read_checkpoint(ckpt: Path) -> bytes:
    if not ckpt.is_file():
        raise CnnpressError(f"cannot resume: {ckpt} does not exist (start without --resume)")
    return ckpt.read_bytes()


def _non_finite(
    value: float | None, epoch: int, step: int, ckpt: Path, saved: int | None
) -> CnnpressError:
    what = f"became {value}" if value is not None else "became non-finite on another process"
    where = f"at epoch {epoch + 1} step {step + 1}"
    if saved:
        keep = (
            f"{ckpt} keeps epoch {saved}: lower the learning rate and continue "
            f"(cnnpress: --resume --out {ckpt.parent} --lr SMALLER)"
        )
    else:
        keep = "no epoch had finished, so nothing was saved: start again with a lower --lr"
    return CnnpressError(f"the loss {what} {where}; the run stopped and {keep}")
