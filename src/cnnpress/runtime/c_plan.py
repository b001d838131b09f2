"""The plan of a C program: the graph's operations as kernel calls over one static arena.

:func:`plan` runs the model's graph (:mod:`cnnpress.models.graph`) once on an input of the
export's shape, with the model's own layers, and turns every node into a call of a kernel of
``csrc_c/cnnpress_rt.c`` (:class:`Op`): convs and linear layers (dense, binary, sparse,
k-means, SLBF), per-channel epilogues (batch norm, relu, relu6, hardtanh; fused into the conv
or addition before them where nothing else reads that output), broadcast add / sub / mul,
pooling, strided copies (transpose, slices, chunks, pad, cat, channel shuffle) and fills.

Tensors are views of *storages* (``torch``-style shape, strides and offset, found by running
each data-movement operation on a stand-in tensor of the storage, so ``view``, ``transpose``
and ``getitem`` cost nothing until a kernel needs a contiguous input). Each storage lives from
the operation that writes it to the last that reads it, and :func:`place` packs them into one
arena, largest first at the lowest free offset (a greedy liveness plan).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from cnnpress.errors import CnnpressError
from cnnpress.models.graph import FUNCTIONS, _decode, _refs

__all__ = ["INPUT", "LOGITS", "Op", "Plan", "Storage", "View", "live_floats", "place"]

ARENA, INPUT, LOGITS = 0, 1, 2
MAX_DIMS = 6
#: Operations that only move values (a view of a storage, or a copy where torch copies).
MOVES_F = {"getitem", "torch.flatten", "torch.transpose", "torch.chunk", "F.dropout"}
MOVES_M = {"view", "reshape", "flatten", "transpose", "permute", "contiguous", "chunk"}


class ExportError(CnnpressError):
    """A model the C export cannot write (one line naming the operation or layer)."""


@dataclass
class Storage:
    """A run of values: in the arena (``offset`` placed by :func:`place`, a multiple of
    ``align``), or the input or logits the caller passes."""

    size: int
    first: int
    last: int
    base: int = ARENA
    offset: int = 0
    align: int = 1


@dataclass(frozen=True)
class View:
    """A tensor as a strided view of a storage."""

    sid: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    offset: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def contiguous(self) -> bool:
        expect = 1
        for size, stride in zip(reversed(self.shape), reversed(self.strides), strict=True):
            if size != 1 and stride != expect:
                return False
            expect *= size
        return True


@dataclass
class Op:
    """One kernel call: ``kind`` (conv, epi, binary, copy, fill, pool), its fields, the views
    it reads and the one it writes, the module (for the per-layer figures)."""

    kind: str
    fields: dict[str, Any]
    reads: list[View]
    out: View
    module: str = ""
    scratch: int = 0  # 32-bit words
    scratch_sid: int = -1  # its storage in the arena (placed by CProgram)
    epi: dict[str, Any] = field(default_factory=dict)
    step: int = 0  # the graph node it runs for


class Plan:
    """The operations and storages of one model's C program (see the module doc)."""

    def __init__(self, graph: dict[str, Any], input_shape: tuple[int, ...]) -> None:
        self.nodes = [list(n) for n in graph["nodes"]]
        self.storages: list[Storage] = []
        self.ops: list[Op] = []
        self.dummies: dict[int, torch.Tensor] = {}
        self.values: dict[str, Any] = {}  # node -> real value (tensors, ints, tuples)
        self.views: dict[str, Any] = {}  # node -> View (or a tuple of them)
        self.owner: dict[str, Op] = {}  # node -> the op whose epilogue may still take it
        self.users = _users(self.nodes)
        self.last_use = {name: max(us) if us else -1 for name, us in self.users.items()}
        self.step = 0
        self.input_shape = tuple(input_shape)

    # -- storages and views -------------------------------------------------------------------
    def new_storage(self, shape: tuple[int, ...], base: int = ARENA) -> View:
        sid = len(self.storages)
        size = math.prod(shape)
        self.storages.append(Storage(size, self.step, self.step, base))
        self.dummies[sid] = torch.empty(max(1, size))
        return View(sid, tuple(shape), _contiguous_strides(shape), 0)

    def dummy(self, v: View) -> torch.Tensor:
        return self.dummies[v.sid].as_strided(v.shape, v.strides, v.offset)

    def view_of(self, t: torch.Tensor) -> View | None:
        """The view ``t`` is of one of the storages' stand-ins, or ``None`` (a copy)."""
        ptr = t.untyped_storage().data_ptr()
        for sid, d in self.dummies.items():
            if d.untyped_storage().data_ptr() == ptr:
                return View(sid, tuple(t.shape), tuple(t.stride()), t.storage_offset())
        return None

    def contiguous(self, v: View, module: str = "") -> View:
        """``v`` itself if contiguous, else a contiguous copy (a copy op)."""
        if v.contiguous:
            return v
        out = self.new_storage(v.shape)
        self.add(Op("copy", _copy_fields(v, out), [v], out, module))
        return out

    def add(self, op: Op, again: bool = False) -> Op:
        """Append ``op`` (``again``: it is already there; its views changed): every storage
        it touches lives at its step."""
        if not again:
            op.step = self.step
        for v in [*op.reads, op.out]:
            s = self.storages[v.sid]
            s.first, s.last = min(s.first, op.step), max(s.last, op.step)
        if not again:
            self.ops.append(op)
        return op

    def dies_here(self, v: View, node: int) -> bool:
        """Whether no node after ``node`` reads storage ``v.sid`` (it may then be overwritten)."""
        if self.storages[v.sid].base != ARENA:
            return False
        for name, value in self.views.items():
            if _holds(value, v.sid) and self.last_use.get(name, -1) > node:
                return False
        return True

    # -- running the graph --------------------------------------------------------------------
    def run(self, model: nn.Module, lower: Any) -> None:
        """Every node through ``lower(plan, index, node, args, kwargs)``, which returns the
        node's real value and view."""
        x = torch.randn(1, *self.input_shape)
        for index, (name, op, target, args, kwargs) in enumerate(self.nodes):
            self.step = index
            if op == "input":
                view = self.new_storage(tuple(x.shape), INPUT)
                self.values[name], self.views[name] = x, view
                continue
            real_args = [_decode(a, self.values) for a in args]
            real_kwargs = {k: _decode(v, self.values) for k, v in kwargs.items()}
            if op == "output":
                self.output(real_args[0], args[0])
                return
            value, view = lower(self, index, [op, target, args, kwargs], real_args, real_kwargs)
            self.values[name] = value
            if view is not None:
                self.views[name] = view

    def output(self, value: Any, arg: Any) -> None:
        if not isinstance(value, torch.Tensor) or not isinstance(arg, dict) or "node" not in arg:
            raise ExportError("the C export needs a model whose output is one tensor")
        v = self.views[arg["node"]]
        out = self.new_storage(tuple(value.shape), LOGITS)
        self.add(Op("copy", _copy_fields(v, out), [v], out))
        self.logits = value.numel()

    def movement(self, fn: Any, args: list[Any], kwargs: dict[str, Any], index: int) -> Any:
        """Views (no copy) of what a data-movement op makes of its input, a copy where torch
        copies (``reshape`` of a transposed tensor)."""
        dummy_args = [self.stand_in(a) for a in args]
        dummy_kwargs = {k: self.stand_in(v) for k, v in kwargs.items()}
        out = fn(*dummy_args, **dummy_kwargs)
        mapped = _map(out, self.view_of)
        if not _has_none(mapped):
            return mapped
        src = next(a for a in args if isinstance(a, dict) and "node" in a)["node"]
        if not isinstance(self.views.get(src), View) or self.views[src].contiguous:
            raise ExportError(f"the C export cannot place the result of {fn!r:.60}")
        self.views[src] = self.contiguous(self.views[src])  # copy once, then view it
        return self.movement(fn, args, kwargs, index)

    def stand_in(self, arg: Any) -> Any:
        """A graph argument with its nodes' tensors replaced by their storage stand-ins."""
        if isinstance(arg, dict) and "node" in arg:
            view = self.views.get(arg["node"])
            if view is None:
                return self.values[arg["node"]]
            return _map(view, self.dummy)
        if isinstance(arg, dict) and "tuple" in arg:
            return tuple(self.stand_in(v) for v in arg["tuple"])
        if isinstance(arg, list):
            return [self.stand_in(v) for v in arg]
        return _decode(arg, self.values)

    def arg_view(self, arg: Any) -> View:
        if not (isinstance(arg, dict) and isinstance(self.views.get(arg.get("node")), View)):
            raise ExportError(f"the C export expects a tensor here, got {arg!r:.60}")
        return self.views[arg["node"]]


def live_floats(storages: list[Storage], step: int) -> int:
    """Values of the arena storages alive at graph node ``step``."""
    return sum(s.size for s in storages if s.base == ARENA and s.first <= step <= s.last)


def place(storages: list[Storage]) -> int:
    """Offsets in the arena for every arena storage, none overlapping another that lives at
    the same time (largest first, each at the lowest offset, a multiple of its ``align``,
    that fits); returns the arena's values."""
    placed: list[Storage] = []
    end = 0
    for s in sorted((s for s in storages if s.base == ARENA), key=lambda s: -s.size):
        taken = sorted(
            (p.offset, p.offset + p.size) for p in placed if p.first <= s.last and s.first <= p.last
        )
        offset = 0
        for lo, hi in taken:
            if offset + s.size <= lo:
                break
            offset = max(offset, -(-hi // s.align) * s.align)
        s.offset = offset
        placed.append(s)
        end = max(end, offset + s.size)
    return end


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def _copy_fields(src: View, dst: View) -> dict[str, Any]:
    if len(src.shape) > MAX_DIMS:
        raise ExportError(f"a copy of a {len(src.shape)}-dimensional tensor (at most {MAX_DIMS})")
    return {"shape": list(src.shape), "sx": list(src.strides), "sy": list(dst.strides)}


def _users(nodes: list[list[Any]]) -> dict[str, list[int]]:
    users: dict[str, list[int]] = {n[0]: [] for n in nodes}
    for index, (_, _, _, args, kwargs) in enumerate(nodes):
        for ref in _refs(list(args)) | _refs(list(kwargs.values())):
            users.setdefault(ref, []).append(index)
    return users


def _holds(value: Any, sid: int) -> bool:
    if isinstance(value, View):
        return value.sid == sid
    return isinstance(value, (tuple, list)) and any(_holds(v, sid) for v in value)


def _map(value: Any, fn: Any) -> Any:
    if isinstance(value, (torch.Tensor, View)):
        return fn(value)
    if isinstance(value, (tuple, list)):
        return type(value)(_map(v, fn) for v in value)
    return value


def _has_none(value: Any) -> bool:
    if value is None:
        return True
    return isinstance(value, (tuple, list)) and any(_has_none(v) for v in value)


def movement_fn(op: str, target: str) -> Any | None:
    """The callable of a data-movement node, or ``None`` for other nodes."""
    if op == "function" and target in MOVES_F:
        if target == "F.dropout":
            return lambda x, *a, **k: x
        return FUNCTIONS[target]
    if op == "method" and target in MOVES_M:
        return lambda x, *a, **k: getattr(x, target)(*a, **k)
    return None


SCALAR_OPS = {
    "add": operator.add,
    "sub": operator.sub,
    "mul": operator.mul,
    "floordiv": operator.floordiv,
}
