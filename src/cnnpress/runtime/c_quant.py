"""The integer program: a C plan (:mod:`cnnpress.runtime.c_plan`) over int8 activations, and
PyTorch's forward of it.

:func:`lower_integer` turns the float plan of a model whose activations are quantized (one
scale and zero point per graph node, :mod:`cnnpress.runtime.quant`) into integer operations:
the image is quantized first (``quant``), every tensor is then held as ``bits``-bit integers
``q`` (``real = scale * (q - zero)``), and each operation carries in ``op.q`` what the C
kernels (``csrc_c/q_*.c``) and :func:`run_integer` both compute with:

- a conv or linear layer sums ``w * (x - zero_in)`` in integers, with ``w`` the weights as the
  file stores them (SLBF and binary signs +-1, int8 values of ``"q8"`` arrays, k-means
  codebook entries), then requantizes each output channel ``c``:
  ``clamp(zero_out + C_c + multiply(acc + B_c, m_c, shift_c))``, where the real factor
  ``M_c = s_in * w_scale_c * scale_c * bn_a_c / s_out`` (the weight's scale, the method's
  per-filter scale and the batch norm folded into one) and the bias ``B_c`` (in accumulator
  units; ``C_c``, in output units, only for a channel whose bias does not fit) come from the
  file's floats; ReLU, ReLU6 and hardtanh are the clamp;
- a residual addition is TFLite's ADD (:func:`cnnpress.fixedpoint.add_multipliers`), also when
  fused into the conv before it; a multiplication is TFLite's MUL;
- copies keep their integers, or requantize where a concatenation's parts have other scales;
  pooling keeps the scale of its input (average: rounded half away from zero);
- the logits are dequantized to float32.

The per-channel requantization lives in one int32 array (``qdata``, three values per channel:
``m``, ``B``, and ``shift + 256 * C``). PyTorch's forward (:func:`run_integer`) runs the same
operations with int64 tensors (convolutions in float64, exact for integer sums below 2**53),
so its logits equal the C program's bit for bit.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cnnpress.fixedpoint import (
    ADD_SHIFT,
    add_multipliers,
    dequantize,
    multiply,
    qrange,
    quantize_input,
    quantize_multiplier,
)
from cnnpress.floats import q8_rows
from cnnpress.format.layout import decode
from cnnpress.runtime.c_interface import BN, OP, POOL, QMODE, WEIGHT
from cnnpress.runtime.c_plan import INPUT, LOGITS, ExportError, Op, Plan, View
from cnnpress.runtime.dense import dense_layer, is_compressed

__all__ = ["IntegerProgram", "lower_integer", "run_integer"]

#: The fields of TFLite ADD's multipliers (:func:`cnnpress.fixedpoint.add_multipliers`).
_ADD = ("m1", "s1", "m2", "s2", "mo", "so")
#: Bias beyond this many accumulator units goes to the output offset ``C`` instead.
BIAS_LIMIT = 2**24


@dataclasses.dataclass
class IntegerProgram:
    """What :func:`lower_integer` adds to a plan: the activations' width, the requantization
    table (``qdata``), each conv's integer weights by ``id`` of its operation (for PyTorch's
    forward; the C program reads them from the file's arrays) and ``nodes``, the graph nodes
    whose values the program holds as integers (a value fused away inside an operation, such
    as a conv's output before its batch norm, is not one; quantization-aware training rounds
    exactly these)."""

    bits: int
    qdata: list[int]
    weights: dict[int, torch.Tensor]
    nodes: set[str] = dataclasses.field(default_factory=set)


class _Lowering:
    """The walk of :func:`lower_integer` over the plan's operations (see the module doc)."""

    def __init__(
        self, plan: Plan, model: nn.Module, arrays: dict[Any, Any], activations: dict[str, Any]
    ) -> None:
        self.plan, self.model, self.arrays = plan, model, arrays
        self.bits = int(activations["bits"])
        self.tensors = {k: (float(v[0]), int(v[1])) for k, v in activations["tensors"].items()}
        self.widths = {k: int((*v, self.bits)[2]) for k, v in activations["tensors"].items()}
        self.held: dict[int, tuple[float, int]] = {}
        self.out_node = _value_nodes(plan)
        self.program = IntegerProgram(self.bits, [], {})

    def node_q(self, name: str) -> tuple[float, int]:
        if name not in self.tensors:
            raise ExportError(f"the activations record no scale for graph node {name!r}")
        self.program.nodes.add(name)
        return self.tensors[name]

    def vec(self, key: Any) -> np.ndarray | None:
        if key is None:
            return None
        encoding, data, shape = self.arrays[key]
        return decode(data, encoding, shape).astype(np.float64).reshape(-1)

    def range(self, name: str) -> tuple[int, int]:
        """The integer range of node ``name`` (its own width where it has one)."""
        return qrange(self.widths.get(name, self.bits))

    def clamp(self, epi: dict[str, Any], name: str) -> dict[str, int]:
        """The output range of node ``name`` after an activation (none, ReLU or a clamp):
        ``lo``, ``hi``, and the node's whole range ``qmin``, ``qmax``."""
        qmin, qmax = self.range(name)
        s, z = self.node_q(name)
        lo, hi = qmin, qmax
        if epi.get("act"):
            lo = max(lo, z + _round(epi["lo"] / s)) if math.isfinite(epi["lo"]) else lo
            hi = min(hi, z + _round(epi["hi"] / s)) if math.isfinite(epi["hi"]) else hi
        return dict(lo=lo, hi=min(max(lo, hi), qmax), qmin=qmin, qmax=qmax)

    def requant(self, a: np.ndarray, b: np.ndarray, s_out: float) -> int:
        """Per-channel requantization of ``real = a * acc + b`` onto ``s_out`` into qdata;
        returns its offset."""
        at = len(self.program.qdata)
        for ac, bc in zip(a.tolist(), b.tolist(), strict=True):
            m, shift = quantize_multiplier(ac / s_out)
            big = m == 0 or abs(bc) >= BIAS_LIMIT * abs(ac)
            bias = 0 if big else _round(bc / ac)
            offset = max(-(2**22), min(2**22, _round(bc / s_out))) if big else 0
            self.program.qdata += [m, bias, shift + 256 * offset]  # shift in [-128, 127]
        return at

    def bn(self, epi: dict[str, Any], n: int) -> tuple[np.ndarray, np.ndarray]:
        """Batch norm of an epilogue as ``y = x * a + b`` per channel (float64)."""
        kind, keys = epi.get("bn_kind", 0), list(epi.get("bn") or [None] * 4)
        if kind == BN["folded"]:
            return self.vec(keys[0]), self.vec(keys[1])
        if kind == BN["full"]:
            weight = self.vec(keys[0]) if keys[0] is not None else np.ones(n)
            bias = self.vec(keys[1]) if keys[1] is not None else np.zeros(n)
            a = weight / np.sqrt(self.vec(keys[3]) + float(np.float32(epi["eps"])))
            return a, bias - self.vec(keys[2]) * a
        return np.ones(n), np.zeros(n)

    # -- the operations -----------------------------------------------------------------------
    def op(self, op: Op) -> None:
        handler = getattr(self, f"op_{op.kind}")
        out_q = handler(op)
        self.held[op.out.sid] = out_q

    def op_quant(self, op: Op) -> tuple[float, int]:
        name = self.out_node[id(op)]
        s, z = self.node_q(name)
        inverse = float(np.float32(1.0 / s))
        op.q = dict(mode=QMODE["quantize"], zo=z, scale=inverse, **self.clamp({}, name))
        return s, z

    def op_conv(self, op: Op) -> tuple[float, int]:
        f, epi = op.fields, op.epi
        s_in, z_in = self.held[op.reads[0].sid]
        weight, w_scale = self.integer_weight(op)
        self.program.weights[id(op)] = weight
        n = f["n"]
        scale = self.vec(f["scale"]) if f["scale_n"] else np.ones(1)
        bias = self.vec(f["bias"])
        bn_a, bn_b = self.bn(epi, n)
        a = s_in * w_scale * np.broadcast_to(scale, (n,)) * bn_a
        b = (bias if bias is not None else np.zeros(n)) * bn_a + bn_b
        name = self.out_node[id(op)]
        s_out, z_out = self.node_q(name)
        q = dict(zi=z_in, zo=z_out, **self.clamp(epi, name))
        if f.get("res"):
            s_pre, z_pre = self.node_q(f["pre"])
            s_res, z_res = self.held[op.out.sid]
            q.update(rq=self.requant(a, b, s_pre), zp=z_pre, zb=z_res)
            q.update(zip(_ADD, add_multipliers(s_pre, s_res, s_out), strict=True))
            q["qmin"], q["qmax"] = self.range(f["pre"])  # the pre-add value's range
        else:
            q.update(rq=self.requant(a, b, s_out))
        op.q = q
        return s_out, z_out

    def op_epi(self, op: Op) -> tuple[float, int]:
        s_in, z_in = self.held[op.reads[0].sid]
        bn_a, bn_b = self.bn(op.epi, op.fields["c"])
        name = self.out_node[id(op)]
        s_out, z_out = self.node_q(name)
        rq = self.requant(s_in * bn_a, bn_b, s_out)
        op.q = dict(zi=z_in, zo=z_out, rq=rq, **self.clamp(op.epi, name))
        return s_out, z_out

    def op_binary(self, op: Op) -> tuple[float, int]:
        f = op.fields
        if f["b_const"] or op.epi.get("bn_kind"):
            raise ExportError(
                "an elementwise operation with a constant or a batch norm after it has no "
                "integer kernel"
            )
        (s_a, z_a), (s_b, z_b) = self.held[f["a"].sid], self.held[f["b"].sid]
        name = self.out_node[id(op)]
        s_out, z_out = self.node_q(name)
        q = dict(zi=z_a, zb=z_b, zo=z_out, **self.clamp(op.epi, name))
        if f["op"] == OP["mul"]:
            q["mo"], q["so"] = quantize_multiplier(s_a * s_b / s_out)
        else:
            q.update(zip(_ADD, add_multipliers(s_a, s_b, s_out), strict=True))
            q["m2"] = -q["m2"] if f["op"] == OP["sub"] else q["m2"]
        op.q = q
        return s_out, z_out

    def op_copy(self, op: Op) -> tuple[float, int]:
        if self.plan.storages[op.reads[0].sid].base == INPUT:
            return self.op_quant(op)
        s_in, z_in = self.held[op.reads[0].sid]
        if self.plan.storages[op.out.sid].base == LOGITS:
            op.q = dict(mode=QMODE["dequantize"], zi=z_in, scale=s_in)
            return s_in, z_in
        s_out, z_out, limits = s_in, z_in, dict(lo=-128, hi=127)
        if op.module in ("cat", "pad"):
            name = self.plan.nodes[op.step][0]
            (s_out, z_out), limits = self.node_q(name), self.clamp({}, name)
        mo, so = (0, 0) if (s_out, z_out) == (s_in, z_in) else quantize_multiplier(s_in / s_out)
        op.q = dict(mode=QMODE["copy"], zi=z_in, zo=z_out, mo=mo, so=so, **limits)
        return s_out, z_out

    def op_fill(self, op: Op) -> tuple[float, int]:
        name = self.plan.nodes[op.step][0]
        s, z = self.node_q(name)
        qmin, qmax = self.range(name)
        op.q = dict(zo=max(qmin, min(qmax, z + _round(op.fields["value"] / s))))
        return s, z

    def op_pool(self, op: Op) -> tuple[float, int]:
        s, z = self.held[op.reads[0].sid]
        op.q = dict(zi=z, zo=z)
        self.program.nodes.add(self.out_node[id(op)])  # rounded to its input's grid
        return s, z

    # -- weights ------------------------------------------------------------------------------
    def integer_weight(self, op: Op) -> tuple[torch.Tensor, np.ndarray]:
        """The conv's weights as integers (n, c/groups, kh, kw), float64, and each output
        channel's weight scale: exactly the values the C kernel reads from the file's
        arrays."""
        f, n = op.fields, op.fields["n"]
        shape = (n, f["c"] // f["groups"], f["kh"], f["kw"])
        if f["kind"] == WEIGHT["slbf"]:  # the selected +-1 bank filters, stacked
            bank = self.bits_of(f["code"]).reshape(f["m"], f["d"], f["kh"], f["kw"])
            sel = self.bits_of(f["sel"]).reshape(n, -1).astype(np.int64)
            w = bank[sel].reshape(shape) * 2.0 - 1.0
            return torch.from_numpy(w), np.ones(n)
        if f["kind"] == WEIGHT["binary"]:  # signs
            w = self.bits_of(f["code"]).reshape(shape) * 2.0 - 1.0
            return torch.from_numpy(w), np.ones(n)
        key = f["wt"]
        encoding, data, ashape = self.arrays[key]
        if encoding != "q8":
            raise ExportError(
                f"{op.module}: integer activations need the file's floats as int8 (float_bits=8)"
            )
        rows = q8_rows(ashape)
        scales = np.frombuffer(data, dtype="<f4", count=rows).astype(np.float64)
        if f["kind"] == WEIGHT["dense"]:
            w = np.frombuffer(data, dtype=np.int8, offset=4 * rows).astype(np.float64)
            return torch.from_numpy(w.reshape(shape).copy()), np.broadcast_to(scales, (n,))
        dense = self.model.get_submodule(op.module)
        if not is_compressed(dense):
            raise ExportError(f"{op.module}: no dense weight to read the stored integers from")
        w = dense_layer(dense).weight.detach().double().reshape(shape).numpy()
        ints = np.rint(w / scales[0]) if scales[0] > 0 else np.zeros_like(w)
        if np.abs(ints).max(initial=0) > 127 or not np.allclose(ints * scales[0], w, rtol=1e-5):
            raise ExportError(f"{op.module}: its weights are not the file's int8 values")
        return torch.from_numpy(ints), np.full(n, scales[0])

    def bits_of(self, key: Any) -> np.ndarray:
        encoding, data, shape = self.arrays[key]
        return decode(data, encoding, shape).astype(np.float64 if key[1] != "indices" else np.int64)


def _round(v: float) -> int:
    return int(math.floor(abs(v) + 0.5)) * (1 if v >= 0 else -1)


def _value_nodes(plan: Plan) -> dict[int, str]:
    """Each operation's output as a graph node: the last node whose value it makes (an
    epilogue fused into it makes its output that epilogue's), else the node it runs for."""
    index = {n[0]: i for i, n in enumerate(plan.nodes)}
    out: dict[int, str] = {id(op): plan.nodes[op.step][0] for op in plan.ops}
    for name, op in plan.owner.items():
        if index[name] > index[out[id(op)]]:
            out[id(op)] = name
    return out


def _quantize_input(plan: Plan) -> None:
    """An int8 copy of the float input in the arena, made by a first ``quant`` operation;
    every operation reads that copy instead."""
    sid = next(i for i, s in enumerate(plan.storages) if s.base == INPUT)
    source = plan.storages[sid]
    node = next(n[0] for n in plan.nodes if n[1] == "input")
    given = plan.views[node]
    plan.step = 0
    inner = plan.new_storage(given.shape)
    new_sid = inner.sid
    plan.storages[new_sid].last = source.last
    source.last = 0

    def move(v: Any) -> Any:
        return dataclasses.replace(v, sid=new_sid) if isinstance(v, View) and v.sid == sid else v

    for op in plan.ops:
        op.reads = [move(v) for v in op.reads]
        op.out = move(op.out)
        for key in ("a", "b"):
            if key in op.fields:
                op.fields[key] = move(op.fields[key])
    fields = {"shape": list(given.shape), "sx": list(given.strides), "sy": list(inner.strides)}
    quant = Op("copy", fields, [given], inner, "input")
    plan.ops.insert(0, quant)


def lower_integer(
    plan: Plan, model: nn.Module, arrays: dict[Any, Any], activations: dict[str, Any]
) -> IntegerProgram:
    """Make ``plan`` (planned, not yet placed) an integer program (see the module doc)."""
    _quantize_input(plan)
    walk = _Lowering(plan, model, arrays, activations)
    walk.out_node[id(plan.ops[0])] = next(n[0] for n in plan.nodes if n[1] == "input")
    for op in plan.ops:
        walk.op(op)
    return walk.program


# -- PyTorch's forward of the integer program ---------------------------------------------------
class _Machine:
    """Storages as (N, size) int64 tensors (the float input and logits as float32)."""

    def __init__(self, plan: Plan, x: torch.Tensor, bits: int) -> None:
        self.plan, self.n, self.bits = plan, len(x), bits
        self.mem: dict[int, torch.Tensor] = {}
        for sid, s in enumerate(plan.storages):
            dtype = torch.float32 if s.base in (INPUT, LOGITS) else torch.int64
            self.mem[sid] = torch.zeros(self.n, max(1, s.size), dtype=dtype)
        src = next(i for i, s in enumerate(plan.storages) if s.base == INPUT)
        self.mem[src] = x.reshape(self.n, -1).to(torch.float32).contiguous()

    def get(self, v: View) -> torch.Tensor:
        t = self.mem[v.sid]  # (N, size), maybe a view of a larger tensor (a slice of a batch)
        strides = (t.stride(0), *v.strides)
        return t.as_strided((self.n, *v.shape), strides, t.storage_offset() + v.offset)

    def put(self, v: View, values: torch.Tensor) -> None:
        self.get(v).copy_(values.reshape(self.n, *v.shape))


def _requant(acc: torch.Tensor, qdata: torch.Tensor, at: int, channels: int) -> torch.Tensor:
    """``zero_out``-less requantization of (N, channels, ...) accumulators (module doc)."""
    table = qdata[at : at + 3 * channels].reshape(channels, 3)
    shape = (1, channels) + (1,) * (acc.dim() - 2)
    m, bias, packed = (table[:, i].reshape(shape) for i in range(3))
    shift = packed & 255
    shift = torch.where(shift > 127, shift - 256, shift)
    offset = torch.div(packed - shift, 256, rounding_mode="trunc")
    return offset + multiply(acc + bias, m, shift)


def _add(a: torch.Tensor, b: torch.Tensor, q: dict[str, Any]) -> torch.Tensor:
    a = multiply((a - q["zi"]) << ADD_SHIFT, q["m1"], q["s1"])
    b = multiply((b - q["zb"]) << ADD_SHIFT, q["m2"], q["s2"])
    return (q["zo"] + multiply(a + b, q["mo"], q["so"])).clamp(q["lo"], q["hi"])


def _conv(m: _Machine, op: Op, program: IntegerProgram, qdata: torch.Tensor) -> None:
    f, q = op.fields, op.q
    w = program.weights[id(op)]
    # float32 sums are exact while every partial sum stays below 2**24 in magnitude
    exact32 = float(w.abs().flatten(1).sum(1).max()) * 255 < 2**24
    dtype = torch.float32 if exact32 else torch.float64
    w = w.to(dtype)
    x = (m.get(op.reads[0]) - q["zi"]).to(dtype)
    if f["h"] == 1 and f["w"] == 1 and f["kh"] == 1 and x.numel() == m.n * f["c"]:
        acc = (x.reshape(m.n, f["c"]) @ w.reshape(f["n"], f["c"]).T).reshape(m.n, f["n"], 1, 1)
    else:
        acc = F.conv2d(
            x.reshape(m.n, f["c"], f["h"], f["w"]),
            w,
            stride=(f["sh"], f["sw"]),
            padding=(f["ph"], f["pw"]),
            dilation=(f["dh"], f["dw"]),
            groups=f["groups"],
        )
    acc = acc.round().to(torch.int64)
    out = _requant(acc, qdata, q["rq"], f["n"])
    if f.get("res"):
        pre = (q["zp"] + out).clamp(q["qmin"], q["qmax"])
        residual = m.get(op.out).reshape(pre.shape)
        out = _add(pre, residual, {**q, "zi": q["zp"]})
    else:
        out = (q["zo"] + out).clamp(q["lo"], q["hi"])
    m.put(op.out, out)


def _pool(m: _Machine, op: Op) -> None:
    """Max or average over each window, as ``cnnp_q_pool`` walks it."""
    f, z = op.fields, op.q["zi"]
    x = m.get(op.reads[0]).reshape(m.n, f["c"], f["h"], f["w"]) - z
    out = torch.zeros(m.n, f["c"], f["oh"], f["ow"], dtype=torch.int64)
    for oh in range(f["oh"]):
        h0, h1, hs, step_h = _window(f, oh, vertical=True)
        for ow in range(f["ow"]):
            w0, w1, ws, step_w = _window(f, ow, vertical=False)
            part = x[:, :, h0:h1:step_h, w0:w1:step_w]
            if f["kind"] in (POOL["maxpool"], POOL["adaptive_max"]):
                out[:, :, oh, ow] = part.amax(dim=(2, 3))
                continue
            total = part.sum(dim=(2, 3))
            padded = f["kind"] == POOL["avgpool"] and f["count_include_pad"]
            count = hs * ws if padded else (h1 - h0) * (w1 - w0)
            half = count // 2
            out[:, :, oh, ow] = torch.where(
                total >= 0,
                torch.div(total + half, count, rounding_mode="trunc"),
                torch.div(total - half, count, rounding_mode="trunc"),
            )
    m.put(op.out, out + z)


def _window(f: dict[str, Any], o: int, vertical: bool) -> tuple[int, int, int, int]:
    """``cnnp_window``: the input range [lo, hi) of output ``o``, the window's size with
    padding, and the step (dilation for max pooling)."""
    n, out = (f["h"], f["oh"]) if vertical else (f["w"], f["ow"])
    k, s, pad, d = (
        (f["kh"], f["sh"], f["ph"], f["dh"]) if vertical else (f["kw"], f["sw"], f["pw"], f["dw"])
    )
    if f["kind"] in (POOL["adaptive_avg"], POOL["adaptive_max"]):
        lo, hi = (o * n) // out, ((o + 1) * n + out - 1) // out
        return lo, hi, hi - lo, 1
    lo = o * s - pad
    if f["kind"] == POOL["avgpool"]:
        hi = min(lo + k, n + pad)
        size = hi - lo
        return max(lo, 0), min(hi, n), size, 1
    hi = min(lo + (k - 1) * d + 1, n)
    while lo < 0:
        lo += d
    return lo, hi, 0, d


def _binary(m: _Machine, op: Op) -> None:
    f, q = op.fields, op.q
    shape = (m.n, *op.out.shape)
    a, b = (_broadcast(m.get(f[k]), shape) for k in ("a", "b"))
    if f["op"] == OP["mul"]:
        out = q["zo"] + multiply((a - q["zi"]) * (b - q["zb"]), q["mo"], q["so"])
        out = out.clamp(q["lo"], q["hi"])
    else:
        out = _add(a, b, q)
    m.put(op.out, out)


def _broadcast(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """(N, *view shape) broadcast to (N, *shape), the view's dims aligned on the right."""
    ones = (1,) * (len(shape) - t.dim())
    return t.reshape(t.shape[0], *ones, *t.shape[1:]).expand(shape)


def _copy(m: _Machine, op: Op) -> None:
    q, x = op.q, m.get(op.reads[0])
    if q["mode"] == QMODE["quantize"]:
        m.put(op.out, quantize_input(x, q["scale"], q["zo"], 8).clamp(q["lo"], q["hi"]))
    elif q["mode"] == QMODE["dequantize"]:
        m.put(op.out, dequantize(x, q["scale"], q["zi"]))
    elif q["mo"] == 0:
        m.put(op.out, x)
    else:
        m.put(op.out, (q["zo"] + multiply(x - q["zi"], q["mo"], q["so"])).clamp(q["lo"], q["hi"]))


def run_integer(plan: Plan, program: IntegerProgram, x: torch.Tensor) -> torch.Tensor:
    """The logits of the integer program for the batch ``x`` (N x C x H x W float32), equal
    bit for bit to what the C program computes image by image."""
    m = _Machine(plan, x, program.bits)
    qdata = torch.tensor(program.qdata, dtype=torch.int64)
    for op in plan.ops:
        q = op.q
        if op.kind == "conv":
            _conv(m, op, program, qdata)
        elif op.kind == "epi":
            c = op.fields["c"]
            acc = m.get(op.reads[0]).reshape(m.n, c, -1) - q["zi"]
            m.put(op.out, (q["zo"] + _requant(acc, qdata, q["rq"], c)).clamp(q["lo"], q["hi"]))
        elif op.kind in ("binary", "ewise"):
            _binary(m, op)
        elif op.kind == "copy":
            _copy(m, op)
        elif op.kind == "fill":
            m.put(op.out, torch.full((m.n, op.out.numel), q["zo"], dtype=torch.int64))
        elif op.kind == "pool":
            _pool(m, op)
    last = next(op for op in plan.ops if plan.storages[op.out.sid].base == LOGITS)
    shape = last.reads[0].shape
    return m.mem[last.out.sid][:, : plan.logits].reshape(m.n, *shape[1:]).clone()
