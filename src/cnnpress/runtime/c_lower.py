"""Each graph node as calls of the C runtime's kernels (:class:`Lowerer`, used by
:meth:`cnnpress.runtime.c_plan.Plan.run`).

The layers map to the conv kernel's weight kinds: ``nn.Conv2d`` / ``nn.Linear`` dense
(floats as the file keeps them); a method's layer as its method's
:meth:`~cnnpress.methods.base.Method.c_weights` says (BinaryConnect and BWN signs with their
scale, magnitude pruning's kept values and positions, k-means indices into the codebook, SLBF
bank bits and selections), told the layer's geometry and arrays by a :class:`CLayer`. Anything
else is refused in one line.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar

import torch
from torch import nn

from cnnpress.geometry import numeric_padding, pair
from cnnpress.methods import method_for
from cnnpress.models.graph import FUNCTIONS
from cnnpress.runtime.c_interface import ACT, BN, DEFINES, OP, POOL, WEIGHT
from cnnpress.runtime.c_plan import ExportError, Op, Plan, View, movement_fn

__all__ = ["SUPPORTED", "CLayer", "Lowerer", "no_epi"]

#: What the C runtime runs, for messages.
SUPPORTED = (
    "fp32/float16/int8 layers, slbf, bwn, binaryconnect, magnitude_prune, kmeans, filter_prune"
)
ACT_FUNCS = {"F.relu", "torch.relu", "F.relu6", "F.hardtanh"}
BINARY = {"add": OP["add"], "torch.add": OP["add"], "sub": OP["sub"], "mul": OP["mul"]}
POOL_FUNCS = {
    "F.max_pool2d": ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
    "F.avg_pool2d": (
        "kernel_size",
        "stride",
        "padding",
        "ceil_mode",
        "count_include_pad",
        "divisor_override",
    ),
    "F.adaptive_avg_pool2d": ("output_size",),
    "F.adaptive_max_pool2d": ("output_size",),
}
POOL_KIND = {
    "F.max_pool2d": POOL["maxpool"],
    "F.avg_pool2d": POOL["avgpool"],
    "F.adaptive_avg_pool2d": POOL["adaptive_avg"],
    "F.adaptive_max_pool2d": POOL["adaptive_max"],
    nn.MaxPool2d: POOL["maxpool"],
    nn.AvgPool2d: POOL["avgpool"],
    nn.AdaptiveAvgPool2d: POOL["adaptive_avg"],
    nn.AdaptiveMaxPool2d: POOL["adaptive_max"],
}


def huff_ints(alphabet: int) -> int:
    """Scratch (32-bit words) of one Huffman decoder's tables (``CNNP_HUFF_INTS``)."""
    return 3 * 25 + (alphabet + 1) // 2


#: The geometry of a 1x1 window over a 1x1 output (a linear layer, a mean over rows).
POINTWISE = dict(oh=1, ow=1, kh=1, kw=1, sh=1, sw=1, ph=0, pw=0, dh=1, dw=1)

#: Output positions the SLBF kernel computes at once (``CNNP_TILE`` in cnnpress_rt.h).
TILE = DEFINES["CNNP_TILE"]


@dataclass
class CLayer:
    """What a method's :meth:`~cnnpress.methods.base.Method.c_weights` is told about one of
    its layers (it implements :class:`cnnpress.methods.base.CTarget`)."""

    weight_kinds: ClassVar[Mapping[str, int]] = MappingProxyType(WEIGHT)
    defines: ClassVar[Mapping[str, int]] = MappingProxyType(DEFINES)
    name: str
    geometry: dict[str, Any]
    huff: int
    lowerer: Lowerer

    def array(self, name: str) -> tuple[str, str] | None:
        return self.lowerer.key(self.name, name)

    def huff_ints(self, alphabet: int) -> int:
        return huff_ints(alphabet)


def lowers(module: nn.Module) -> bool:
    """Whether the conv kernel takes ``module``: a plain conv or linear layer (an exact one,
    else it is refused in :meth:`Lowerer.weights`), or a layer of a method with C kernels."""
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        return True
    method = method_for(module)
    return method is not None and bool(method.c_kinds)


def no_epi() -> dict[str, Any]:
    """An epilogue that does nothing."""
    return {
        "bn_kind": BN["none"],
        "bn": [None] * 4,
        "eps": 0.0,
        "act": ACT["none"],
        "lo": 0.0,
        "hi": 0.0,
    }


def _bind(names: tuple[str, ...], args: list[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    bound = dict(zip(names, args, strict=False))
    bound.update(kwargs)
    return bound


class Lowerer:
    """Turns nodes into :class:`Op` s; ``arrays`` holds the file's arrays by (module, name)."""

    def __init__(self, model: nn.Module, arrays: dict[tuple[str, str], Any]) -> None:
        self.model, self.arrays = model, arrays

    def key(self, module: str, name: str) -> tuple[str, str] | None:
        return (module, name) if (module, name) in self.arrays else None

    def coded(self, module: str, name: str) -> bool:
        """Whether the file Huffman-codes that stream (``entropy``)."""
        return self.arrays.get((module, name), ("",))[0].startswith("h")

    def __call__(
        self, plan: Plan, index: int, node: list[Any], args: list[Any], kwargs: dict[str, Any]
    ) -> tuple[Any, Any]:
        op, target, raw_args, raw_kwargs = node
        with torch.no_grad():
            if op == "module":
                module = self.model.get_submodule(target)
                value = module(*args, **kwargs)
                return value, self.module(plan, index, target, module, raw_args, value)
            fn = FUNCTIONS[target] if op == "function" else None
            value = fn(*args, **kwargs) if fn else getattr(args[0], target)(*args[1:], **kwargs)
        if not _has_tensor(value):
            return value, None
        moves = movement_fn(op, target)
        if moves is not None:
            return value, plan.movement(moves, raw_args, raw_kwargs, index)
        return value, self.function(plan, index, op, target, raw_args, raw_kwargs, value)

    # -- modules ------------------------------------------------------------------------------
    def module(
        self, plan: Plan, index: int, name: str, module: nn.Module, raw_args: list[Any], value: Any
    ) -> View:
        if lowers(module):
            return self.conv(plan, name, module, plan.arg_view(raw_args[0]), value)
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            return self.epilogue(plan, index, raw_args[0], self.batchnorm(name, module), name)
        if isinstance(module, (nn.ReLU, nn.ReLU6, nn.Hardtanh)):
            lo, hi = (
                (0.0, math.inf) if isinstance(module, nn.ReLU) else (module.min_val, module.max_val)
            )
            return self.epilogue(plan, index, raw_args[0], _act(lo, hi), name)
        if isinstance(module, (nn.Identity, nn.Dropout)):
            return plan.arg_view(raw_args[0])
        if isinstance(module, nn.Flatten):
            return plan.movement(module, raw_args, {}, index)
        if type(module) in POOL_KIND:
            settings = {
                k: getattr(module, k, None)
                for k in POOL_FUNCS["F.max_pool2d"] + POOL_FUNCS["F.avg_pool2d"]
            }
            return self.pool(plan, POOL_KIND[type(module)], raw_args[0], settings, value, name)
        raise ExportError(
            f"layer {name} ({type(module).__name__}) has no C kernel; the C export runs {SUPPORTED}"
        )

    def batchnorm(self, name: str, bn: nn.Module) -> dict[str, Any]:
        if bn.running_mean is None:
            raise ExportError(f"{name}: a BatchNorm without running statistics has no C kernel")
        if self.key(name, "scale"):
            folded = [(name, "scale"), (name, "shift"), None, None]
            return {"bn_kind": BN["folded"], "bn": folded, "eps": 0.0}
        keys = [self.key(name, k) for k in ("weight", "bias", "running_mean", "running_var")]
        return {"bn_kind": BN["full"], "bn": keys, "eps": float(bn.eps)}

    def conv(self, plan: Plan, name: str, m: nn.Module, x: View, value: torch.Tensor) -> View:
        x = plan.contiguous(x, name)
        f = self.geometry(name, m, x, tuple(value.shape))
        f.update(self.weights(name, m, f))
        out = plan.new_storage(tuple(value.shape))
        op = plan.add(Op("conv", f, [x], out, name, scratch=f.pop("scratch", 0), epi=no_epi()))
        plan.owner[plan.nodes[plan.step][0]] = op
        return out

    def geometry(self, name: str, m: nn.Module, x: View, out: tuple[int, ...]) -> dict[str, Any]:
        # a linear layer, as the dense runtime tells them apart: a conv has stride and padding
        if not all(hasattr(m, a) for a in ("kernel_size", "stride", "padding")):
            features = x.shape[-1]
            if x.numel != features:
                raise ExportError(f"{name}: the C linear kernel takes one vector per image")
            return dict(c=features, h=1, w=1, n=out[-1], groups=1, **POINTWISE)
        if len(x.shape) != 4 or getattr(m, "padding_mode", "zeros") != "zeros":
            raise ExportError(f"{name}: the C conv kernel takes N x C x H x W and zero padding")
        padding = numeric_padding(m) if isinstance(m.padding, str) else pair(m.padding)
        if padding is None:
            raise ExportError(f"{name}: uneven 'same' padding has no C kernel")
        (kh, kw), (sh, sw), (dh, dw) = pair(m.kernel_size), pair(m.stride), pair(m.dilation)
        return dict(
            c=x.shape[1],
            h=x.shape[2],
            w=x.shape[3],
            n=out[1],
            oh=out[2],
            ow=out[3],
            kh=kh,
            kw=kw,
            sh=sh,
            sw=sw,
            ph=padding[0],
            pw=padding[1],
            dh=dh,
            dw=dw,
            groups=getattr(m, "groups", 1),
        )

    def weights(self, name: str, m: nn.Module, g: dict[str, Any]) -> dict[str, Any]:
        k = self.key
        f = dict(
            kind=WEIGHT["dense"],
            wt=None,
            code=None,
            code_bits=0,
            pos=None,
            pos_bits=0,
            pos_count=0,
            kept=0,
            sel=None,
            d=0,
            m=0,
            scale=None,
            scale_n=0,
            bias=k(name, "bias"),
            huff=int(self.coded(name, "indices")) + 2 * int(self.coded(name, "positions")),
            res=0,
        )
        if type(m) in (nn.Conv2d, nn.Linear):
            f.update(kind=WEIGHT["dense"], wt=k(name, "weight"))
            return f
        method = method_for(m)
        got = None if method is None else method.c_weights(m, CLayer(name, g, f["huff"], self))
        if isinstance(got, str):
            raise ExportError(f"{name}: {got} ({SUPPORTED})")
        if got is None:
            raise ExportError(f"layer {name} ({type(m).__name__}) has no C kernel ({SUPPORTED})")
        f.update(got)
        return f

    # -- epilogues: batch norm and activations, fused where they can be -----------------------
    def epilogue(self, plan: Plan, index: int, arg: Any, part: dict[str, Any], name: str) -> View:
        """Batch norm or an activation (``part``): fused into the op that made its input
        when nothing else reads that (batch norm into a conv or an addition only), else an
        epilogue op of its own, in place where its input dies here."""
        source = arg["node"] if isinstance(arg, dict) else None
        owner = plan.owner.get(source)
        x = plan.arg_view(arg)
        is_bn = "bn_kind" in part and part["bn_kind"] != BN["none"]
        fusable = (
            owner is not None
            and plan.users.get(source) == [index]
            and (owner.epi["act"] == ACT["none"])
            and (
                not is_bn
                or (owner.kind in ("conv", "binary") and owner.epi["bn_kind"] == BN["none"])
            )
            and not (is_bn and owner.fields.get("res"))  # its batch norm comes before the add
        )
        if fusable:
            owner.epi.update(part)
            plan.owner[plan.nodes[index][0]] = owner
            return x
        x = plan.contiguous(x, name)
        channels = x.shape[1] if is_bn and len(x.shape) >= 2 else 1
        out = x if plan.dies_here(x, index) else plan.new_storage(x.shape)
        fields = {"c": channels, "plane": x.numel // channels}
        op = plan.add(Op("epi", fields, [x], out, name, epi={**no_epi(), **part}))
        plan.owner[plan.nodes[index][0]] = op
        return out

    # -- functions and methods ----------------------------------------------------------------
    def function(
        self,
        plan: Plan,
        index: int,
        op: str,
        target: str,
        args: list[Any],
        kwargs: dict[str, Any],
        value: Any,
    ) -> View:
        if target in ACT_FUNCS or (op == "method" and target == "relu"):
            if target == "F.hardtanh":
                b = _bind(("input", "min_val", "max_val"), args, kwargs)
                lo, hi = float(b.get("min_val", -1.0)), float(b.get("max_val", 1.0))
            else:
                lo, hi = 0.0, 6.0 if target == "F.relu6" else math.inf
            return self.epilogue(plan, index, args[0], _act(lo, hi), target)
        if target in BINARY or (op == "method" and target in ("add", "mul")):
            if "alpha" in kwargs or len(args) > 2:
                raise ExportError(f"{target} with alpha has no C kernel")
            return self.binary(plan, index, BINARY.get(target, OP["add"]), args, value)
        if target in POOL_FUNCS:
            bound = _bind(("input", *POOL_FUNCS[target]), args, kwargs)
            settings = {k: plan.stand_in(v) for k, v in bound.items() if k != "input"}
            return self.pool(plan, POOL_KIND[target], args[0], settings, value, target)
        if target == "torch.cat":
            return self.cat(plan, args, kwargs, value)
        if target == "F.pad":
            return self.pad(plan, args, kwargs, value)
        if op == "method" and target == "mean":
            return self.mean(plan, args, kwargs, value)
        raise ExportError(f"the operation {target} has no C kernel in cnnpress's C export")

    def binary(self, plan: Plan, index: int, code: int, args: list[Any], value: Any) -> View:
        shape = tuple(value.shape)
        tensors = [
            isinstance(a, dict) and "node" in a and isinstance(plan.views.get(a["node"]), View)
            for a in args
        ]
        if not tensors[0]:
            if code == OP["sub"] or not tensors[1]:
                raise ExportError("a constant minus a tensor has no C kernel")
            args = [args[1], args[0]]
        if len(shape) > 6:
            raise ExportError(f"an elementwise operation on {len(shape)} dimensions (at most 6)")
        if code == OP["add"] and all(tensors):
            for conv, residual in (args, args[::-1]):
                fused = _fuse_residual(plan, index, conv["node"], residual["node"], shape)
                if fused is not None:
                    return fused
        a = plan.arg_view(args[0])
        b = plan.arg_view(args[1]) if all(tensors) else None
        sa = plan.view_of(plan.dummy(a).broadcast_to(shape)).strides
        sb = plan.view_of(plan.dummy(b).broadcast_to(shape)).strides if b else (0,) * len(shape)
        inplace = (
            a.contiguous
            and a.shape == shape
            and plan.dies_here(a, index)
            and (b is None or b.sid != a.sid or b == a)
        )
        out = a if inplace else plan.new_storage(shape)
        const = None if b else float(plan.stand_in(args[1]))
        fields = {
            "op": code,
            "ndim": len(shape),
            "b_const": int(b is None),
            "b_value": const or 0.0,
            "shape": list(shape),
            "sa": list(sa),
            "sb": list(sb),
            "channels": shape[1] if len(shape) >= 2 else 1,
            "a": a,
            "b": b,
        }
        node = plan.add(Op("binary", fields, [a] + ([b] if b else []), out, "", epi=no_epi()))
        plan.owner[plan.nodes[index][0]] = node
        return out

    def pool(
        self, plan: Plan, kind: int, arg: Any, s: dict[str, Any], value: Any, name: str
    ) -> View:
        x = plan.contiguous(plan.arg_view(arg), name)
        if len(x.shape) != 4 or s.get("return_indices") or s.get("divisor_override"):
            raise ExportError(f"{name}: the C pooling kernel takes N x C x H x W, no indices")
        out = plan.new_storage(tuple(value.shape))
        kh, kw = pair(s.get("kernel_size") or 1)
        stride = s.get("stride") or (kh, kw)
        (sh, sw), (ph, pw) = pair(stride), pair(s.get("padding") or 0)
        dh, dw = pair(s.get("dilation") or 1)
        include = s.get("count_include_pad")
        fields = dict(
            kind=kind,
            c=x.shape[1],
            h=x.shape[2],
            w=x.shape[3],
            oh=value.shape[2],
            ow=value.shape[3],
            kh=kh,
            kw=kw,
            sh=sh,
            sw=sw,
            ph=ph,
            pw=pw,
            dh=dh,
            dw=dw,
            count_include_pad=int(True if include is None else include),
        )
        plan.add(Op("pool", fields, [x], out, name))
        return out

    def mean(self, plan: Plan, args: list[Any], kwargs: dict[str, Any], value: Any) -> View:
        x = plan.contiguous(plan.arg_view(args[0]))
        b = _bind(("self", "dim", "keepdim"), args, kwargs)
        dims = plan.stand_in(b.get("dim"))
        dims = list(range(len(x.shape))) if dims is None else dims
        dims = sorted(d % len(x.shape) for d in ([dims] if isinstance(dims, int) else dims))
        if dims != list(range(len(x.shape) - len(dims), len(x.shape))) or b.get("dtype"):
            raise ExportError("mean over other than the last dimensions has no C kernel")
        inner = math.prod(x.shape[d] for d in dims)
        out = plan.new_storage(tuple(value.shape))
        fields = dict(
            kind=POOL["adaptive_avg"],
            c=x.numel // inner,
            h=inner,
            w=1,
            count_include_pad=1,
            **POINTWISE,
        )
        plan.add(Op("pool", fields, [x], out, "mean"))
        return out

    def cat(self, plan: Plan, args: list[Any], kwargs: dict[str, Any], value: Any) -> View:
        b = _bind(("tensors", "dim"), args, kwargs)
        parts = b["tensors"]
        parts = parts.get("tuple") if isinstance(parts, dict) else parts
        dim = int(plan.stand_in(b.get("dim", 0))) % value.dim()
        out = plan.new_storage(tuple(value.shape))
        start = 0
        for part in parts:
            v = plan.arg_view(part)
            region = plan.view_of(plan.dummy(out).narrow(dim, start, v.shape[dim]))
            plan.add(Op("copy", _copy(v, region), [v], region, "cat"))
            start += v.shape[dim]
        return out

    def pad(self, plan: Plan, args: list[Any], kwargs: dict[str, Any], value: Any) -> View:
        b = _bind(("input", "pad", "mode", "value"), args, kwargs)
        x, pads = plan.arg_view(b["input"]), list(plan.stand_in(b["pad"]))
        if b.get("mode", "constant") != "constant" or min(pads) < 0:
            raise ExportError("F.pad has a C kernel for constant, non-negative padding only")
        out = plan.new_storage(tuple(value.shape))
        fill = float(b.get("value") or 0.0)
        plan.add(Op("fill", {"n": out.numel, "value": fill}, [], out, "pad"))
        region = plan.dummy(out)
        for i in range(len(pads) // 2):
            dim = value.dim() - 1 - i
            region = region.narrow(dim, pads[2 * i], x.shape[dim])
        inner = plan.view_of(region)
        plan.add(Op("copy", _copy(x, inner), [x], inner, "pad"))
        return out


def _fuse_residual(
    plan: Plan, index: int, conv: str, residual: str, shape: tuple[int, ...]
) -> View | None:
    """``conv + residual`` as the conv writing its output over the residual (a ResNet block
    then holds two maps, not three): where nothing else reads the conv's output, the
    residual exists before the conv runs, dies here and no op between reads or writes it."""
    op, r = plan.owner.get(conv), plan.views.get(residual)
    if op is None or op.kind != "conv" or op.epi["act"] != ACT["none"] or op.fields.get("res"):
        return None
    if plan.users.get(conv) != [index] or not isinstance(r, View) or not r.contiguous:
        return None
    after = plan.ops[next(i for i, o in enumerate(plan.ops) if o is op) + 1 :]
    ok = (
        r.shape == shape == op.out.shape
        and r.sid != op.out.sid
        and plan.storages[r.sid].first < op.step
        and plan.dies_here(r, index)
        and all(r.sid != v.sid for later in after for v in [*later.reads, later.out])
        and all(r.sid != v.sid for v in op.reads)
    )
    if not ok:
        return None
    plan.storages[op.out.sid].size = 0  # the conv's own output is not needed
    f = op.fields
    op.scratch += 2 * f["n"] if f["kind"] == WEIGHT["slbf"] else f["oh"] * f["ow"]
    op.fields["res"], op.fields["pre"], op.out = 1, conv, r  # pre: the value before the add
    plan.add(op, again=True)
    plan.owner[plan.nodes[index][0]] = op
    return r


def _copy(src: View, dst: View) -> dict[str, Any]:
    return {"shape": list(src.shape), "sx": list(src.strides), "sy": list(dst.strides)}


def _act(lo: float, hi: float) -> dict[str, Any]:
    act = ACT["relu"] if (lo == 0.0 and hi == math.inf) else ACT["clamp"]
    return {"act": act, "lo": float(lo), "hi": float(hi)}


def _has_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    return isinstance(value, (tuple, list)) and any(_has_tensor(v) for v in value)
