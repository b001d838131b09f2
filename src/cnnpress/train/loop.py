"""The training loop: SGD/Adam with a cosine schedule, progress, metrics, checkpoints, resume.

A run folder holds ``config.yaml`` (the resolved settings), ``metrics.jsonl`` (one JSON line
per epoch), ``checkpoint.safetensors`` (the state after the last finished epoch) and, at the
end, the packed model ``model.cnnp`` and ``result.json`` (both written by ``cnnpress.run``).
Every file is written atomically, so a killed run leaves the folder consistent and
``resume=True`` continues from the last finished epoch with the same data order (it depends
only on the seed and the epoch).
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

from cnnpress.atomic import atomic_write_text, remove_stale_temps
from cnnpress.batchnorm import batch_statistics_errors
from cnnpress.errors import CnnpressError
from cnnpress.methods.base import slimming_penalty
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


def make_optimizer(
    model: nn.Module, cfg: TrainConfig, no_decay_names: tuple[str, ...] = ()
) -> torch.optim.Optimizer:
    """SGD or Adam; the parameters called one of ``no_decay_names`` (the last part of their
    name: a method's ``no_decay``) get no weight decay."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name.rsplit(".", 1)[-1] in no_decay_names else decay).append(p)
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


#: Seconds between two progress lines when the output is not a terminal (a log, a CI job).
PLAIN_PROGRESS_SECONDS = 30.0


class _EpochProgress:
    """An epoch's progress: rich's bar on a terminal; elsewhere a plain line every
    :data:`PLAIN_PROGRESS_SECONDS` seconds (step, running loss and accuracy, time left)."""

    def __init__(self, console: Console, description: str, total: int) -> None:
        self.console, self.description, self.total = console, description, total
        self.start = self.last = time.monotonic()
        self.bar: Progress | None = None
        if console.is_terminal:
            self.bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.3f}  acc {task.fields[acc]:.1f}%"),
                TimeRemainingColumn(),
                console=console,
                transient=True,
            )
            self.task = self.bar.add_task(description, total=total, loss=0.0, acc=0.0)

    def __enter__(self) -> _EpochProgress:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()

    def update(self, done: int, loss: float, acc: float) -> None:
        """``done`` steps of ``total`` finished, with the running loss and accuracy."""
        if self.bar is not None:
            self.bar.update(self.task, completed=done, loss=loss, acc=acc)
            return
        now = time.monotonic()
        if now - self.last < PLAIN_PROGRESS_SECONDS or done >= self.total:
            return
        self.last = now
        left = (now - self.start) / done * (self.total - done)
        self.console.print(
            f"{self.description}  step {done}/{self.total}  loss {loss:.3f}  acc {acc:.1f}%  "
            f"about {left:.0f} s left",
            **PLAIN,
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
    """Train ``model`` in place, writing the run folder's metrics and checkpoints (the packed
    model is the caller's to save: ``cnnpress.run``).

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
    quiet = not ctx.is_main  # one rank prints
    console = Console(stderr=True, quiet=True) if quiet else console or Console(stderr=True)
    run = _Run(Path(run_dir), cfg, ctx, console, extra_meta or {})
    run_on_main(lambda: _prepare(run.dir), ctx, f"preparing {run.dir}")
    model.to(ctx.device)
    optimizer = make_optimizer(model, cfg, method.no_decay if method is not None else ())
    steps = _steps(train_loader, cfg, ctx)
    if resume:
        run.resume(model, optimizer)
    else:
        torch.manual_seed(cfg.seed)
    loss_fn = loss_fn or (
        lambda out, y, _x: F.cross_entropy(out, y, label_smoothing=cfg.label_smoothing)
    )
    step = _Step(wrap_model(model, ctx), model, optimizer, cfg, loss_fn, method, ctx)
    model.train()
    with synced_batchnorm(model, ctx):
        if eval_at_start and not resume:
            at = (train_loader, test_loader, cfg, ctx, console, method is not None)
            run.history.append(_evaluate_start(model, *at))
        for epoch in range(run.start_epoch, cfg.epochs):
            record = _train_epoch(step, run, train_loader, epoch, steps)
            if on_epoch_end is not None:
                on_epoch_end(model, epoch, cfg.epochs)
            _end_epoch(run, record, model, optimizer, train_loader, test_loader)
    model.eval().to("cpu")
    final = run.history[-1] if run.history else {}
    return {
        "epochs": cfg.epochs,
        "test_accuracy": final.get("test_accuracy"),
        "test_loss": final.get("test_loss"),
        "train_seconds": run.train_seconds,
        "history": run.history,
    }


class _Run:
    """The state of a run across epochs: its folder, history, time and last saved epoch."""

    def __init__(
        self, run_dir: Path, cfg: TrainConfig, ctx: DistContext, console: Console, meta: dict
    ) -> None:
        self.dir, self.cfg, self.ctx, self.console, self.meta = run_dir, cfg, ctx, console, meta
        self.ckpt = run_dir / "checkpoint.safetensors"
        self.history: list[dict[str, Any]] = []
        self.start_epoch, self.train_seconds = 0, 0.0
        self.saved: int | None = None

    def resume(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Load the checkpoint and the metrics up to its epoch."""
        read = partial(_read_checkpoint, self.ckpt)
        data = broadcast_bytes(read, self.ctx, f"reading {self.ckpt}")
        meta = load_checkpoint(self.ckpt, model, optimizer, data=data)
        self.start_epoch = self.saved = meta["epoch"] + 1
        self.train_seconds = meta.get("train_seconds", 0.0)
        metrics = self.dir / "metrics.jsonl"
        if self.ctx.is_main and metrics.is_file():
            lines = [json.loads(line) for line in metrics.read_text().splitlines() if line]
            self.history = [h for h in lines if h["epoch"] < self.start_epoch]
        self.console.print(
            f"resuming {self.dir} after epoch {self.start_epoch}/{self.cfg.epochs}", **PLAIN
        )


class _Step:
    """One optimisation step: forward, loss (with the method's and slimming's terms), update."""

    def __init__(
        self,
        net: nn.Module,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        cfg: TrainConfig,
        loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
        method: Any | None,
        ctx: DistContext,
    ) -> None:
        self.net, self.model, self.optimizer, self.cfg = net, model, optimizer, cfg
        self.loss_fn, self.method, self.ctx = loss_fn, method, ctx

    def __call__(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> tuple[torch.Tensor, ...]:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with batch_statistics_errors():  # a 1x1 map at batch 1: one line, not torch's
            out = self.net(x)
        loss = self.loss_fn(out, y, x)
        if self.method is not None:
            reg = self.method.regulariser(self.model)
            if reg is not None:
                loss = loss + reg
        if self.cfg.slimming_l1:
            loss = loss + slimming_penalty(self.model, self.cfg.slimming_l1)
        return out, loss

    def update(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


def _steps(train_loader: Any, cfg: TrainConfig, ctx: DistContext) -> int:
    steps = len(train_loader)
    if steps == 0:
        per = f" ({cfg.batch_size} per process)" if ctx.enabled else ""
        raise CnnpressError(
            f"the training set is smaller than one batch of {cfg.batch_size}{per}; "
            "lower --batch-size"
        )
    return steps


def _train_epoch(step: _Step, run: _Run, loader: Any, epoch: int, steps: int) -> dict[str, Any]:
    """One pass over the training data, with a progress bar; the epoch's record so far."""
    cfg, ctx = run.cfg, run.ctx
    loader.set_epoch(epoch)
    t0 = time.perf_counter()
    loss_sum, correct, count, lr = 0.0, 0, 0, cfg.lr
    before = step.method.snapshot(step.model) if step.method is not None else None
    with _EpochProgress(run.console, f"epoch {epoch + 1}/{cfg.epochs}", steps) as bar:
        for i, (x, y) in enumerate(loader):
            x, y = x.to(ctx.device), y.to(ctx.device)
            lr = lr_at(cfg, epoch * steps + i, steps)
            out, loss = step(x, y, lr)
            finite = bool(torch.isfinite(loss))
            if any_rank(not finite, ctx):
                value = loss.item() if not finite else None
                raise _non_finite(value, epoch, i, run.ckpt, run.saved)
            step.update(loss)
            loss_sum += loss.item() * y.numel()
            correct += (out.argmax(1) == y).sum().item()
            count += y.numel()
            bar.update(i + 1, loss_sum / count, 100.0 * correct / count)
    seconds = time.perf_counter() - t0
    run.train_seconds += seconds
    loss_sum, correct, count = all_reduce_sum([loss_sum, correct, count], ctx)
    if step.method is not None:
        step.method.on_epoch_end(step.model, epoch, cfg.epochs)
    record: dict[str, Any] = {
        "epoch": epoch,
        "lr": lr,
        "train_loss": loss_sum / count,
        "train_accuracy": 100.0 * correct / count,
        "epoch_seconds": seconds,
    }
    learning = step.method.learning_stats(step.model, before) if before is not None else None
    if learning is not None:
        record["learning"] = learning
    return record


def _end_epoch(
    run: _Run,
    record: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_loader: Any,
    test_loader: Iterable,
) -> None:
    """Evaluate when due, save metrics and checkpoint, print the epoch's line."""
    cfg, ctx, epoch = run.cfg, run.ctx, record["epoch"]
    if epoch == cfg.epochs - 1 or (epoch + 1) % cfg.eval_every == 0:
        if cfg.bn_recalibrate:  # every rank: the statistics are global ones
            recalibrate_batchnorm(model, train_loader, cfg.bn_recalibrate)
        if ctx.is_main:  # eval mode: no collective, the other ranks need not wait
            test = evaluate(model, test_loader)
            record.update(test_loss=test["loss"], test_accuracy=test["accuracy"])
    run.history.append(record)
    meta = {"train_seconds": run.train_seconds, **run.meta}
    save = partial(_save_epoch, run.dir, run.history, model, optimizer, epoch, meta)
    run_on_main(save, ctx, f"saving {run.ckpt}")
    run.saved = epoch + 1
    acc = record.get("test_accuracy")
    run.console.print(
        f"epoch {epoch + 1}/{cfg.epochs}  loss {record['train_loss']:.4f}  "
        f"train {record['train_accuracy']:.2f}%"
        + (f"  test {acc:.2f}%" if acc is not None else "")
        + f"  {record['epoch_seconds']:.0f}s",
        **PLAIN,
    )


def _evaluate_start(
    model: nn.Module,
    train_loader: Any,
    test_loader: Iterable,
    cfg: TrainConfig,
    ctx: DistContext,
    console: Console,
    run_method: bool,
) -> dict[str, Any]:
    """The ``epoch: -1`` record: test accuracy before any training (after BN re-estimation);
    ``run_method``: the model is a compressed one (its line says so)."""
    recalibrate_batchnorm(model, train_loader, cfg.bn_recalibrate or 50)
    record: dict[str, Any] = {"epoch": -1}
    if ctx.is_main:
        test = evaluate(model, test_loader)
        record.update(test_loss=test["loss"], test_accuracy=test["accuracy"])
        what = "as compressed, before fine-tuning" if run_method else "before training"
        console.print(f"{what}  test {test['accuracy']:.2f}%", **PLAIN)
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
