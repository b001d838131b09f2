"""Data-parallel training over several processes (``torchrun`` + DistributedDataParallel).

``torchrun --nproc_per_node N -m cnnpress train|compress ...`` starts N processes and sets
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``;
:func:`init_distributed` reads them and joins the process group (``nccl`` when CUDA is
available, else ``gloo`` on CPU). Every rank trains on its strided share of each global
batch (``global batch / world size`` samples), DDP averages the gradients, and
:func:`synced_batchnorm` makes BatchNorm use the statistics of the whole global batch, so a
run equals a single-process run with the same global batch up to float rounding. Only rank 0
touches the run folder: it reads the checkpoint and broadcasts its bytes
(:func:`broadcast_bytes`), writes every file and prints; :func:`run_on_main` tells the other
ranks when rank 0 failed so that nobody waits forever in a collective.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from cnnpress.errors import CnnpressError, ConfigError

__all__ = [
    "DistContext",
    "PeerError",
    "all_reduce_sum",
    "any_rank",
    "broadcast_bytes",
    "current",
    "init_distributed",
    "note_rank",
    "run_on_main",
    "shutdown",
    "synced_batchnorm",
    "wrap_model",
]

T = TypeVar("T")


class PeerError(CnnpressError):
    """Another rank (rank 0) failed; its own message says why."""


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in a (possibly one-process) training job.

    Attributes:
        rank: This process's rank, ``0 .. world_size - 1``.
        world_size: Number of processes.
        local_rank: Rank on this machine (picks the GPU).
        device: Where the model and the batches live.
        backend: ``"gloo"`` or ``"nccl"``; ``None`` for one process.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        """More than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes files and prints."""
        return self.rank == 0


def _env_int(name: str, default: str | None = None) -> int:
    raw = os.environ.get(name, default)
    if raw is None:
        raise ConfigError(
            f"{name} is not set but WORLD_SIZE is; start distributed runs with "
            "`torchrun --nproc_per_node N -m cnnpress ...`"
        )
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name} must be an integer, got {raw!r}") from None


def _use_loopback_for_gloo() -> None:
    """On one machine (MASTER_ADDR on loopback) keep gloo's traffic on the loopback device."""
    addr = os.environ.get("MASTER_ADDR", "")
    try:
        local = addr == "localhost" or ipaddress.ip_address(addr).is_loopback
    except ValueError:
        local = False
    if local and "GLOO_SOCKET_IFNAME" not in os.environ and Path("/sys/class/net/lo").exists():
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"


def init_distributed(backend: str | None = None, timeout_s: float = 1800.0) -> DistContext:
    """Join the process group that ``torchrun`` describes in the environment.

    Without ``WORLD_SIZE`` (or with ``WORLD_SIZE=1``) this is a plain one-process run and
    nothing is initialised.

    Args:
        backend: ``"gloo"`` or ``"nccl"``; default ``nccl`` when CUDA is available.
        timeout_s: How long a collective waits for the other ranks.

    Returns:
        This process's :class:`DistContext`.

    Raises:
        ConfigError: The environment is incomplete or the backend cannot be used.
    """
    world = _env_int("WORLD_SIZE", "1")
    if world <= 1:
        return DistContext()
    if dist.is_available() and dist.is_initialized():
        return current()
    rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK", "0")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise ConfigError(f"{name} is not set; start distributed runs with torchrun")
    if not dist.is_available():
        raise ConfigError("this PyTorch build has no torch.distributed; run in one process")
    cuda = torch.cuda.is_available()
    backend = backend or ("nccl" if cuda else "gloo")
    if backend == "nccl" and not cuda:
        raise ConfigError("the nccl backend needs CUDA; use gloo on CPU")
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        _use_loopback_for_gloo()
    dist.init_process_group(
        backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s)
    )
    return DistContext(rank, world, local_rank, device, backend)


def current() -> DistContext:
    """The context of an already initialised process group, else the one-process context."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistContext()
    backend = dist.get_backend()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device, backend)


def shutdown(ctx: DistContext, ok: bool = True) -> None:
    """Leave the process group (if this process joined one).

    After a run that ended well on this rank, every rank first waits for the others
    (a barrier): a rank that tears its gloo connections down while rank 0 is still writing
    its last files aborts now and then ("terminate called without an active exception").
    After a failure there is no barrier, since the other ranks may never arrive.
    """
    if ctx.enabled and dist.is_initialized():
        if ok:
            dist.barrier()
        dist.destroy_process_group()


def wrap_model(model: nn.Module, ctx: DistContext) -> nn.Module:
    """``model`` wrapped in DistributedDataParallel (the model itself for one process).

    The wrapper shares the parameters, so training it trains ``model`` in place. Every
    trainable parameter must get a gradient at each step (the method contract says so).
    """
    if not ctx.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def all_reduce_sum(values: list[float], ctx: DistContext) -> list[float]:
    """Element-wise sums over all ranks of a few numbers (the numbers themselves for one)."""
    if not ctx.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return t.tolist()


def any_rank(flag: bool, ctx: DistContext) -> bool:
    """True on every rank when ``flag`` is true on at least one."""
    if not ctx.enabled:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def run_on_main(fn: Callable[[], T], ctx: DistContext, what: str = "writing files") -> T | None:
    """Run ``fn`` on rank 0 only; if it fails there, every other rank raises :class:`PeerError`.

    Returns ``fn()`` on rank 0 and ``None`` elsewhere.
    """
    if not ctx.enabled:
        return fn()
    result, error = None, None
    if ctx.is_main:
        try:
            result = fn()
        except BaseException as exc:  # noqa: BLE001  (re-raised below, after telling the peers)
            error = exc
    failed = any_rank(error is not None, ctx)
    if error is not None:
        raise error
    if failed:
        raise PeerError(f"rank 0 failed while {what}; see its message")
    return result


def broadcast_bytes(fn: Callable[[], bytes], ctx: DistContext, what: str) -> bytes:
    """``fn()`` computed on rank 0 (for example a file's bytes), sent to every rank."""
    if not ctx.enabled:
        return fn()
    data = run_on_main(fn, ctx, what)  # rank 0's bytes; None elsewhere
    size = torch.tensor([len(data) if ctx.is_main else 0], dtype=torch.int64)
    size = size.to(ctx.device)
    dist.broadcast(size, src=0)
    if ctx.is_main:
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(ctx.device)
    else:
        buf = torch.empty(int(size.item()), dtype=torch.uint8, device=ctx.device)
    if buf.numel():
        dist.broadcast(buf, src=0)
    return bytes(buf.cpu().numpy().tobytes())


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the gradient of each rank's input is the sum of all ranks' gradients."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        out = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _AllReduceSum.apply(grad.contiguous(), ctx.group), None


def _global_bn_forward(bn: nn.modules.batchnorm._BatchNorm, group: Any, x: torch.Tensor):
    """BatchNorm over the whole global batch: sums all-reduced with autograd (two passes)."""
    if not bn.training:
        return type(bn).forward(bn, x)
    ar = _AllReduceSum.apply
    bn._check_input_dim(x)
    dims = [0, *range(2, x.dim())]
    shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
    local = torch.tensor([x.numel() // x.shape[1]], dtype=x.dtype, device=x.device)
    both = ar(torch.cat([x.sum(dims), local]), group)
    count = both[-1].detach()
    mean = both[:-1] / count
    centred = x - mean.view(shape)
    var = ar((centred * centred).sum(dims), group) / count
    y = centred * torch.rsqrt(var + bn.eps).view(shape)
    if bn.affine:
        y = y * bn.weight.view(shape) + bn.bias.view(shape)
    if bn.track_running_stats:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            factor = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
            n = float(count)
            bn.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
            unbiased = var.detach() * (n / max(n - 1.0, 1.0))
            bn.running_var.mul_(1 - factor).add_(unbiased, alpha=factor)
    return y


@contextlib.contextmanager
def synced_batchnorm(model: nn.Module, ctx: DistContext) -> Iterator[None]:
    """Inside, every BatchNorm of ``model`` normalises with the global batch's statistics.

    ``torch.nn.SyncBatchNorm`` refuses CPU tensors, so this does the same with autograd-aware
    all-reduces on a process group of its own (gloo or nccl); the layers keep their type and
    state, so checkpoints and files are unchanged. Evaluation (eval mode) stays local.
    A no-op for one process.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not ctx.enabled or not bns:
        yield
        return
    group = dist.new_group(backend=ctx.backend)
    for m in bns:
        m.forward = partial(_global_bn_forward, m, group)
    try:
        yield
    finally:
        for m in bns:
            del m.forward
        with contextlib.suppress(Exception):
            dist.destroy_process_group(group)


def note_rank(message: str) -> str:
    """``message`` tagged with this process's rank when it is not rank 0 of a job."""
    rank = os.environ.get("RANK")
    if rank and rank != "0" and os.environ.get("WORLD_SIZE", "1") != "1":
        return f"(rank {rank}) {message}"
    return message
