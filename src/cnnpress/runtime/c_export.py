"""A self-contained C99 inference program of a model that keeps the packed weights.

:func:`export_c` writes ``model.c`` / ``model.h`` (every array the ``.cnnp`` file stores, as
``const`` bytes equal to the file's: SLBF bank and selection bits, binary signs and scales,
sparse positions and values, k-means indices and codebooks, floats as float32, float16 or int8
with their scales; the operations as constant descriptors; one static arena), the kernels
(every file of ``csrc_c/``, :data:`RUNTIME_FILES`) and ``main.c`` (N float32 inputs on stdin,
N x K float32 logits on stdout). ``int cnnp_predict(const float *input, float *logits)``
allocates nothing and reads no file. Build: ``cc -std=c99 -O2 -Wall -Wextra -Werror *.c -lm``.

A model with quantized activations (a ``QuantizedModel``, :mod:`cnnpress.runtime.quant`) gives
the integer program (:mod:`cnnpress.runtime.c_quant`): an int8 arena, the packed weights the
integer kernels read (the batch norms, scales and biases are folded into a per-channel
requantization table, ``qdata``) and each operation's integer parameters (``cnnp_q_t``).

:func:`c_memory` gives the two numbers a device needs: flash (the const bytes, per layer, and
the requantization table) and RAM (the arena the liveness plan sizes, plus the kernels'
scratch).

Huffman-coded streams (``entropy``: SLBF selections, k-means indices, sparse positions) stay
coded; the kernels decode them in order, with the decoder's tables in scratch.
"""

from __future__ import annotations

import copy
import math
import shutil
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from cnnpress.atomic import atomic_write_bytes
from cnnpress.errors import CnnpressError
from cnnpress.format.layout import encode, entropy_code, layout
from cnnpress.methods import use_plain_paths
from cnnpress.models import from_arch
from cnnpress.models.graph import trace
from cnnpress.runtime.c_interface import BASE, STRUCTS, WEIGHT
from cnnpress.runtime.c_lower import Lowerer, no_epi
from cnnpress.runtime.c_plan import (
    ARENA,
    INPUT,
    LOGITS,
    Op,
    Plan,
    Storage,
    View,
    live_floats,
    place,
)
from cnnpress.runtime.c_quant import IntegerProgram, lower_integer

__all__ = ["RUNTIME_FILES", "CProgram", "c_memory", "export_c"]

#: The runtime's sources (every ``.c`` and ``.h`` of ``csrc_c/``), copied beside model.c.
RUNTIME_FILES = tuple(
    sorted(
        f.name
        for f in (resources.files("cnnpress.runtime") / "csrc_c").iterdir()
        if f.name.endswith((".c", ".h"))
    )
)
_STRUCT = {kind: struct for kind, (struct, _) in STRUCTS.items()}
#: sizeof of each descriptor struct (:data:`cnnpress.runtime.c_interface.STRUCTS`).
DESCRIPTOR_BYTES = {kind: size for kind, (_, size) in STRUCTS.items()}
_BASE = {ARENA: BASE["arena"], INPUT: BASE["input"], LOGITS: BASE["logits"]}
#: A conv's geometry, in the order of cnnp_conv_t's fields.
_GEOMETRY = (
    "c",
    "h",
    "w",
    "n",
    "oh",
    "ow",
    "kh",
    "kw",
    "sh",
    "sw",
    "ph",
    "pw",
    "dh",
    "dw",
    "groups",
)
#: Fields the C structs keep in 16 bits.
_SHORT = {*_GEOMETRY, "d", "m", "scale_n"}
_ORDER = {
    "conv": (
        *_GEOMETRY,
        "kind",
        "wt",
        "code",
        "code_bits",
        "pos",
        "pos_bits",
        "pos_count",
        "kept",
        "sel",
        "d",
        "m",
        "scale",
        "scale_n",
        "huff",
        "res",
        "bias",
    ),
    "epi": ("c", "plane"),
    "binary": ("op", "ndim", "b_const", "b_value", "shape", "sa", "sb", "channels"),
    "ewise": ("op", "b_const", "n", "channels", "b_value"),
    "copy": ("ndim", "shape", "sx", "sy"),
    "fill": ("n", "value"),
    "pool": (
        "kind",
        "c",
        "h",
        "w",
        "oh",
        "ow",
        "kh",
        "kw",
        "sh",
        "sw",
        "ph",
        "pw",
        "dh",
        "dw",
        "count_include_pad",
    ),
}


#: cnnp_q_t's integer fields, in order (cnnpress_q.h), and their values where an op has none.
_Q_FIELDS = (
    "mode",
    "zi",
    "zb",
    "zp",
    "zo",
    "lo",
    "hi",
    "qmin",
    "qmax",
    "rq",
    "m1",
    "s1",
    "m2",
    "s2",
    "mo",
    "so",
)
_Q_DEFAULT = {**{k: 0 for k in _Q_FIELDS}, "rq": -1, "qmin": -128, "qmax": 127, "scale": 0.0}


def storage_settings(model: nn.Module) -> tuple[int, bool, bool]:
    """``(float_bits, fold_batchnorm, entropy)`` the model's file keeps (what a save of it
    writes: a loaded file's settings, else those of its method's config)."""
    storage = getattr(model, "cnnpress_storage", None) or (
        (getattr(model, "cnnpress_method", None) or {}).get("config") or {}
    )
    return (
        int(storage.get("float_bits", 32)),
        bool(storage.get("fold_batchnorm", False)),
        bool(storage.get("entropy", False)),
    )


def graph_of(model: nn.Module) -> dict[str, Any]:
    """The model's graph: its recorded one, the registry architecture's, or traced."""
    arch = getattr(model, "cnnpress_arch", None)
    if arch and "graph" in arch:
        return arch["graph"]
    return trace(from_arch(arch) if arch else model)


class CProgram:
    """A model planned for the C runtime: arrays, operations, arena (see the module doc)."""

    def __init__(self, model: nn.Module, input_shape: tuple[int, int, int] | None) -> None:
        if not isinstance(model, nn.Module):
            raise CnnpressError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        activations = getattr(model, "cnnpress_activations", None)
        model = getattr(model, "float_model", model)  # a QuantizedModel's own model
        self.input_shape = shape = _input_shape(model, input_shape)
        self.float_bits, fold, entropy = storage_settings(model)
        work = copy.deepcopy(model).to("cpu").float().eval()
        use_plain_paths(work)  # the real values come from PyTorch's plain path
        self.arrays: dict[tuple[str, str], tuple[str, bytes, tuple[int, ...]]] = {}
        entries = layout(work, self.float_bits, with_values=True, fold_batchnorm=fold)
        for e in entropy_code(entries) if entropy else entries:
            self.arrays[(e.module, e.name)] = (e.encoding, encode(e), e.shape)
        self.plan = Plan(graph_of(model), shape)
        try:
            self.plan.run(work, Lowerer(work, self.arrays))
        except RuntimeError as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise CnnpressError(f"input_shape {shape} does not fit the model: {first}") from err
        self.integer = None if not activations else self._lower_integer(work, activations)
        self.value_bytes = 1 if self.integer else 4  # bytes of one activation
        self._scratch_storages()
        self.arena = place(self.plan.storages)
        self.scratch = max([op.scratch for op in self.plan.ops] + [0])
        used = {k for op in self.plan.ops for k in _keys(op)}
        self.offsets: dict[tuple[str, str], int] = {}
        blob = []
        for key, (_, data, _) in self.arrays.items():
            if key in used:
                self.offsets[key] = sum(len(b) for b in blob)
                blob.append(data)
        self.blob = b"".join(blob)
        for op in self.plan.ops:
            _simplify(op)

    def _lower_integer(self, work: nn.Module, activations: dict[str, Any]) -> IntegerProgram:
        """The plan as an integer program (:mod:`cnnpress.runtime.c_quant`): the batch norms,
        scales and biases go into its requantization, so the C program reads only the packed
        weights; a stream conv's sums take one output plane of scratch."""
        program = lower_integer(self.plan, work, self.arrays, activations)
        for op in self.plan.ops:
            op.epi = no_epi()
            f = op.fields
            if op.kind == "conv":
                f.update(scale=None, scale_n=0, bias=None)
                if f["kind"] != WEIGHT["slbf"]:
                    plane = f["oh"] * f["ow"]
                    op.scratch += 0 if f.get("res") else plane
        return program

    def _scratch_storages(self) -> None:
        """Each operation's scratch as an arena storage that lives only while it runs, so the
        liveness plan lays it over maps that are dead then (as TFLite Micro plans kernel
        scratch in its arena): word-aligned, in the arena's values."""
        words = 4 // self.value_bytes  # arena values in one 32-bit word
        for op in self.plan.ops:
            if op.scratch:
                op.scratch_sid = len(self.plan.storages)
                self.plan.storages.append(
                    Storage(words * op.scratch, op.step, op.step, ARENA, align=words)
                )

    # -- figures ------------------------------------------------------------------------------
    def memory(self) -> dict[str, Any]:
        """Flash: the const bytes of the weights and of the operations' descriptors, per
        layer and in total (the code of ``cnnp_predict``, a call per operation, and of the
        kernels comes on top); RAM: the arena, which holds the activation maps and the
        kernels' scratch (``scratch_bytes``: the most one operation uses), and per layer the
        arena bytes alive while it runs, its scratch included (``live_bytes``)."""
        layers: dict[str, dict[str, int]] = {}
        blank = {"const_bytes": 0, "descriptor_bytes": 0, "live_bytes": 0}
        for module, name in self.offsets:
            row = layers.setdefault(module, dict(blank))
            row["const_bytes"] += len(self.arrays[(module, name)][1])
        value = self.value_bytes
        extra = DESCRIPTOR_BYTES["q"] if self.integer else 0
        for op in self.plan.ops:
            row = layers.setdefault(op.module if op.module in layers else "(graph)", dict(blank))
            row["descriptor_bytes"] += DESCRIPTOR_BYTES[op.kind] + extra
            live = value * live_floats(self.plan.storages, op.step)
            row["live_bytes"] = max(row["live_bytes"], live)
        const = sum(r["const_bytes"] for r in layers.values())
        descriptors = sum(r["descriptor_bytes"] for r in layers.values())
        requant = 4 * len(self.integer.qdata) if self.integer else 0
        arena, scratch = -(-value * max(1, self.arena) // 4) * 4, 4 * self.scratch
        return {
            "layers": [{"layer": k, **v} for k, v in layers.items()],
            "activations": f"int{self.integer.bits}" if self.integer else "float32",
            "const_bytes": const,
            "descriptor_bytes": descriptors,
            "requant_bytes": requant,
            "flash_bytes": const + descriptors + requant,
            "ops": len(self.plan.ops),
            "arena_bytes": arena,
            "scratch_bytes": scratch,
            "ram_bytes": arena,
            "input_floats": math.prod(self.input_shape),
            "logits": self.plan.logits,
        }

    # -- C text -------------------------------------------------------------------------------
    def ref(self, v: View | None) -> str:
        if v is None:
            return "0"
        s = self.plan.storages[v.sid]
        offset = s.offset + v.offset if s.base == ARENA else v.offset
        return str(4 * offset + _BASE[s.base])

    def value(self, v: Any) -> str:
        if isinstance(v, View):
            return self.ref(v)
        if isinstance(v, tuple) and len(v) == 2 and v in self.offsets:
            return str(self.offsets[v])
        if v is None:
            return "-1"
        if isinstance(v, list):
            return "{" + ", ".join(self.value(x) for x in v) + "}"
        if isinstance(v, float):
            return _float(v)
        return str(int(v))

    def op_text(self, op: Op) -> str:
        """The initializer of one operation's descriptor (one element of its kind's array)."""
        f = op.fields
        parts = []
        for key in _SHORT & set(f):
            if not -(2**15) <= int(f[key]) < 2**15:
                raise CnnpressError(f"{op.module}: {key} = {f[key]} is too large for the C export")
        if op.kind in ("binary", "ewise"):
            parts += [f".a = {self.ref(f['a'])}", f".b = {self.ref(f['b'])}"]
        elif op.kind != "fill":
            parts.append(f".x = {self.ref(op.reads[0])}")
        parts.append(f".y = {self.ref(op.out)}")
        parts += [f".{k} = {self.value(f[k])}" for k in _ORDER[op.kind]]
        if op.kind in ("conv", "epi", "binary", "ewise"):
            e = op.epi
            parts.append(
                f".epi = {{{e['bn_kind']}, {e['act']}, {self.value(list(e['bn']))}, "
                f"{_float(e['eps'])}, {_float(e['lo'])}, {_float(e['hi'])}}}"
            )
        where = f" /* {op.module} */" if op.module else ""
        body = ",\n        ".join(parts)
        return f"    {{{where}\n        {body}\n    }}"

    def model_c(self) -> str:
        out = [
            "/* Written by cnnpress export --c: the weights as the .cnnp file packs them. */",
            "#include <math.h>",
            "#include <stdint.h>",
            "",
            '#include "cnnpress_rt.h"',
            '#include "cnnpress_q.h"' if self.integer else "",
            '#include "model.h"',
            "",
            "/* CNNP_AFTER_OP(i) runs after operation i of cnnp_predict: a profiler's hook (a",
            "   board's instruction counter per layer), nothing unless the build defines it. */",
            "#ifndef CNNP_AFTER_OP",
            "#define CNNP_AFTER_OP(i) ((void)0)",
            "#endif",
            "",
        ]
        out.append("/* The weight arrays, one after another (byte offset: array, encoding, shape):")
        for key, offset in self.offsets.items():
            encoding, _, shape = self.arrays[key]
            out.append(f" * {offset}: {key[0]}.{key[1]}, {encoding} {list(shape)}")
        out.append(" */")
        out.append(f"static const uint8_t weights[{max(1, len(self.blob))}] = {{")
        out.append(_bytes(self.blob) + "\n};\n")
        # the descriptors, one array per kind (arrays pack them without the alignment padding
        # a compiler may give each object of its own)
        index: list[str] = []
        for kind, struct in _STRUCT.items():
            ops = [op for op in self.plan.ops if op.kind == kind]
            if ops:
                out.append(f"static const {struct} {kind}_ops[{len(ops)}] = {{")
                out.append(",\n".join(self.op_text(op) for op in ops))
                out.append("};\n")
        seen: dict[str, int] = {}
        for op in self.plan.ops:
            index.append(f"{op.kind}_ops[{seen.get(op.kind, 0)}]")
            seen[op.kind] = seen.get(op.kind, 0) + 1
        if self.integer:
            return "\n".join(out + self.integer_c(index))
        out.append(f"static float arena[{max(1, self.arena)}]; /* maps and scratch */")
        out.append("")
        out.append("int cnnp_predict(const float *input, float *logits)\n{")
        bits = self.float_bits
        out.append(f"    cnnp_ctx ctx = {{arena, input, logits, arena, weights, {bits}}};")
        for i, (op, where) in enumerate(zip(self.plan.ops, index, strict=True)):
            out += self.scratch_c(op, "arena")
            out.append(f"    cnnp_{'epilogue' if op.kind == 'epi' else op.kind}(&ctx, &{where});")
            out.append(f"    CNNP_AFTER_OP({i});")
        out.append("    return 0;\n}\n")
        return "\n".join(out)

    def integer_c(self, index: list[str]) -> list[str]:
        """The rest of an integer program's model.c: each operation's integer parameters, the
        requantization table, the int8 arena and ``cnnp_predict`` calling the q kernels."""
        assert self.integer is not None
        out = [f"static const cnnp_q_t q_ops[{len(self.plan.ops)}] = {{"]
        rows = []
        for op in self.plan.ops:
            q = {**_Q_DEFAULT, **op.q}
            values = ", ".join(str(int(q[k])) for k in _Q_FIELDS) + ", " + _float(q["scale"])
            rows.append(f"    {{{values}}} /* {op.kind} {op.module} */")
        out += [",\n".join(rows), "};\n"]
        qdata = self.integer.qdata or [0]
        out.append(f"static const int32_t qdata[{len(qdata)}] = {{")
        out.append(
            ",\n".join(
                ", ".join(str(v) for v in qdata[i : i + 12]) for i in range(0, len(qdata), 12)
            )
            + "\n};\n"
        )
        # int32 words, so that the scratch is aligned; the int8 maps are bytes of it
        out.append(f"static int32_t arena[{max(1, -(-self.arena // 4))}]; /* maps and scratch */")
        out.append("")
        out.append("int cnnp_predict(const float *input, float *logits)\n{")
        out.append("    cnnp_qctx ctx = {(int8_t *)arena, input, logits, arena, weights, qdata};")
        for i, (op, where) in enumerate(zip(self.plan.ops, index, strict=True)):
            name = "epilogue" if op.kind == "epi" else op.kind
            out += self.scratch_c(op, "arena")
            out.append(f"    cnnp_q_{name}(&ctx, &{where}, &q_ops[{i}]);")
            out.append(f"    CNNP_AFTER_OP({i});")
        out.append("    return 0;\n}\n")
        return out

    def scratch_c(self, op: Op, arena: str) -> list[str]:
        """The line that points the context's scratch at ``op``'s place in the arena (none for
        an operation without scratch)."""
        if not op.scratch:
            return []
        offset = self.plan.storages[op.scratch_sid].offset
        return [f"    ctx.scratch = {arena} + {offset * self.value_bytes // 4};"]

    def model_h(self) -> str:
        c, h, w = self.input_shape
        m = self.memory()
        return "\n".join(
            [
                "/* Written by cnnpress export --c. */",
                "#ifndef CNNP_MODEL_H",
                "#define CNNP_MODEL_H",
                "",
                f"#define CNNP_INPUT_C {c}",
                f"#define CNNP_INPUT_H {h}",
                f"#define CNNP_INPUT_W {w}",
                f"#define CNNP_INPUT_SIZE {c * h * w}",
                f"#define CNNP_OUTPUT_SIZE {m['logits']}",
                f"#define CNNP_CONST_BYTES {m['const_bytes']}",
                f"#define CNNP_ARENA_BYTES {m['arena_bytes']}",
                f"#define CNNP_SCRATCH_BYTES {m['scratch_bytes']} /* inside the arena */",
                "",
                "/* logits = model(input): CNNP_INPUT_SIZE floats (C x H x W, normalised) in,",
                "   CNNP_OUTPUT_SIZE out. Uses one static arena: not reentrant. Returns 0. */",
                "int cnnp_predict(const float *input, float *logits);",
                "",
                "#endif",
                "",
            ]
        )


def c_memory(model: nn.Module, input_shape: tuple[int, int, int] | None = None) -> dict[str, Any]:
    """The C program's flash and RAM for ``model`` (:meth:`CProgram.memory`): per layer and in
    total the const bytes of the weights, the arena and scratch bytes."""
    return CProgram(model, input_shape).memory()


def export_c(
    model: nn.Module, out_dir: str | Path, input_shape: tuple[int, int, int] | None = None
) -> dict[str, Any]:
    """Write the C program of ``model`` into ``out_dir`` (made if missing; see the module doc)
    for inputs of ``input_shape`` (C, H, W; by default the image shape of the data set the
    model records, as a loaded ``.cnnp`` does).

    Returns:
        :func:`c_memory`'s figures with ``files``: the paths written.

    Raises:
        CnnpressError: A layer or operation without a C kernel (named), a bad input shape, or
            an ``out_dir`` that is a file.
    """
    program = CProgram(model, input_shape)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CnnpressError(f"{out} is a file; give the folder to write the C program into")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "model.c", program.model_c().encode())
    atomic_write_bytes(out / "model.h", program.model_h().encode())
    source = resources.files("cnnpress.runtime") / "csrc_c"
    for name in RUNTIME_FILES:
        with resources.as_file(source / name) as path:
            shutil.copyfile(path, out / name)
    return {
        **program.memory(),
        "files": [str(out / n) for n in ("model.c", "model.h", *RUNTIME_FILES)],
    }


def _input_shape(model: nn.Module, given: Any) -> tuple[int, int, int]:
    """``given`` checked, or the recorded data set's image shape."""
    if given is None:
        spec = getattr(model, "cnnpress_dataset", None) or {}
        if not spec.get("in_channels") or not spec.get("image_size"):
            raise CnnpressError("the model records no data set: give input_shape (C, H, W)")
        given = (spec["in_channels"], *spec["image_size"])
    shape = tuple(given) if isinstance(given, (tuple, list)) else ()
    if len(shape) != 3 or not all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape
    ):
        raise CnnpressError(f"input_shape must be (C, H, W), three positive ints; got {given!r}")
    return shape  # type: ignore[return-value]


def _keys(op: Op) -> list[tuple[str, str]]:
    found = [
        v
        for v in op.fields.values()
        if isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], str)
    ]
    return found + [k for k in op.epi.get("bn", []) if k is not None]


def _coalesce(shape: list[int], strides: list[list[int]]) -> tuple[list[int], list[list[int]]]:
    """The same walk over fewer dimensions: size-1 ones dropped, neighbours merged where
    every stride list steps over them as one (the output is row-major)."""
    dims = [i for i, size in enumerate(shape) if size != 1]
    out_shape: list[int] = []
    out_strides: list[list[int]] = [[] for _ in strides]
    for i in dims:
        if out_shape and all(
            st[i] * shape[i] == o[-1] for st, o in zip(strides, out_strides, strict=True)
        ):
            out_shape[-1] *= shape[i]
            for st, o in zip(strides, out_strides, strict=True):
                o[-1] = st[i]
            continue
        out_shape.append(shape[i])
        for st, o in zip(strides, out_strides, strict=True):
            o.append(st[i])
    if not out_shape:
        return [1], [[1] for _ in strides]
    return out_shape, out_strides


def _simplify(op: Op) -> None:
    """Copies and elementwise ops over as few dimensions as they need; a contiguous
    elementwise op becomes the plain ``ewise`` kernel."""
    f = op.fields
    if op.kind == "copy":
        f["shape"], (f["sx"], f["sy"]) = _coalesce(f["shape"], [f["sx"], f["sy"]])
        f["ndim"] = len(f["shape"])
    elif op.kind == "binary":
        shape, (sa, sb) = _coalesce(f["shape"], [f["sa"], f["sb"]])
        f.update(shape=shape, sa=sa, sb=sb, ndim=len(shape))
        if len(shape) == 1 and sa == [1] and (f["b_const"] or sb == [1]):
            op.kind = "ewise"
            f["n"] = shape[0]
    for key in ("shape", "sa", "sb", "sx", "sy"):
        if key in f:
            f[key] = f[key] + [0] * (6 - len(f[key]))


def _float(v: float) -> str:
    if math.isnan(v):
        return "NAN"
    if math.isinf(v):
        return "INFINITY" if v > 0 else "-INFINITY"
    text = f"{float(np.float32(v)):.9g}"
    return text + ("f" if "." in text or "e" in text else ".0f")


def _bytes(data: bytes) -> str:
    if not data:
        return "0"
    hexes = [str(b) for b in data]
    return ",\n".join(",".join(hexes[i : i + 24]) for i in range(0, len(hexes), 24))
