"""A network as data: a small versioned graph of operations that a file can hold.

:func:`trace` turns a user's CNN (any ``nn.Module`` that ``torch.fx`` can trace) into plain
JSON: its leaf modules in ``named_modules`` order, each with its constructor arguments, and
its operations as nodes over them. :func:`build` turns that JSON back into a
:class:`GraphNet`, an ``nn.Module`` with the same module names (so a method's per-layer
settings and a file's array layout apply unchanged) whose forward runs the nodes. Nothing is
pickled and nothing is evaluated: every module type and operation comes from the allow-lists
below, and anything else is refused with one line naming it and where it is.

Graph format 1::

    {"version": 1,
     "modules": [[name, type, {constructor arguments}], ...],
     "nodes": [[name, op, target, args, kwargs], ...]}

``op`` is ``input``, ``module`` (``target`` a module name), ``function`` (``target`` a name
of :data:`FUNCTIONS`), ``method`` (a tensor method of :data:`METHODS`) or ``output``. In
``args``/``kwargs`` a node's value is ``{"node": name}``, a tuple ``{"tuple": [...]}``, a
slice ``{"slice": [start, stop, step]}`` and ``Ellipsis`` ``{"ellipsis": true}``.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from cnnpress.errors import ConfigError

__all__ = [
    "FUNCTIONS",
    "GRAPH_VERSION",
    "LEAVES",
    "METHODS",
    "GraphNet",
    "build",
    "run_nodes",
    "trace",
]

GRAPH_VERSION = 1

#: Module types a graph holds, with the constructor arguments recorded for each.
LEAVES: dict[str, tuple[type[nn.Module], tuple[str, ...]]] = {
    "Conv2d": (
        nn.Conv2d,
        (
            "in_channels",
            "out_channels",
            "kernel_size",
            "stride",
            "padding",
            "dilation",
            "groups",
            "bias",
            "padding_mode",
        ),
    ),
    "Linear": (nn.Linear, ("in_features", "out_features", "bias")),
    "BatchNorm2d": (
        nn.BatchNorm2d,
        ("num_features", "eps", "momentum", "affine", "track_running_stats"),
    ),
    "BatchNorm1d": (
        nn.BatchNorm1d,
        ("num_features", "eps", "momentum", "affine", "track_running_stats"),
    ),
    "ReLU": (nn.ReLU, ("inplace",)),
    "ReLU6": (nn.ReLU6, ("inplace",)),
    "Hardtanh": (nn.Hardtanh, ("min_val", "max_val", "inplace")),
    "Identity": (nn.Identity, ()),
    "Dropout": (nn.Dropout, ("p", "inplace")),
    "Flatten": (nn.Flatten, ("start_dim", "end_dim")),
    "MaxPool2d": (nn.MaxPool2d, ("kernel_size", "stride", "padding", "dilation", "ceil_mode")),
    "AvgPool2d": (
        nn.AvgPool2d,
        ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad"),
    ),
    "AdaptiveAvgPool2d": (nn.AdaptiveAvgPool2d, ("output_size",)),
    "AdaptiveMaxPool2d": (nn.AdaptiveMaxPool2d, ("output_size",)),
}

#: Functions a graph may call, by the name the file records.
FUNCTIONS: dict[str, Any] = {
    "add": operator.add,
    "sub": operator.sub,
    "mul": operator.mul,
    "getitem": operator.getitem,
    "torch.add": torch.add,
    "torch.cat": torch.cat,
    "torch.flatten": torch.flatten,
    "torch.relu": torch.relu,
    "torch.transpose": torch.transpose,
    "torch.chunk": torch.chunk,
    "F.relu": F.relu,
    "F.relu6": F.relu6,
    "F.hardtanh": F.hardtanh,
    "F.pad": F.pad,
    "F.max_pool2d": F.max_pool2d,
    "F.avg_pool2d": F.avg_pool2d,
    "F.adaptive_avg_pool2d": F.adaptive_avg_pool2d,
    "F.adaptive_max_pool2d": F.adaptive_max_pool2d,
    "F.dropout": F.dropout,
    "floordiv": operator.floordiv,
    "getattr": lambda x, name: _shape(x, name),
}
_NAMES = {id(fn): name for name, fn in FUNCTIONS.items()}
_NAMES[id(getattr)] = "getattr"
#: The only attribute a graph may read (``n, c, h, w = x.shape``).
ATTRIBUTES = ("shape",)


def _shape(x: torch.Tensor, name: str) -> Any:
    if name not in ATTRIBUTES:
        raise ConfigError(f"a graph reads only {', '.join(ATTRIBUTES)} of a tensor, not {name!r}")
    return x.shape


#: Tensor methods a graph may call.
METHODS = frozenset(
    {
        "view",
        "reshape",
        "flatten",
        "transpose",
        "permute",
        "contiguous",
        "chunk",
        "size",
        "mean",
        "relu",
        "add",
        "mul",
    }
)

#: Limits on what a file's graph may ask for.
MAX_NODES = 10_000
MAX_MODULES = 5_000


# -- tracing -----------------------------------------------------------------------------------
class _Tracer(fx.Tracer):
    """Stops at the allow-listed module types and remembers, for every node, the module whose
    forward made it (for the error that names an unsupported operation's module)."""

    def __init__(self) -> None:
        super().__init__()
        self.current = ""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return type(m) in _LEAF_TYPES

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        outer, self.current = self.current, self.path_of_module(m)
        try:
            return super().call_module(m, forward, args, kwargs)
        finally:
            self.current = outer

    def create_node(self, *args: Any, **kwargs: Any) -> fx.Node:
        node = super().create_node(*args, **kwargs)
        node.meta["scope"] = self.current
        return node


_LEAF_TYPES = {cls: name for name, (cls, _) in LEAVES.items()}


def _where(model: nn.Module, scope: str) -> str:
    module = model.get_submodule(scope) if scope else model
    return f"{scope or 'the model'} ({type(module).__name__})"


def trace(model: nn.Module) -> dict[str, Any]:
    """The graph (format 1) of ``model``: leaf modules with their arguments, and operations.

    Raises:
        ConfigError: ``model`` cannot be traced by ``torch.fx`` (for example, control flow on
            tensor values), or uses a module type or operation outside the graph's set.
    """
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as err:  # torch.fx raises TraceError, TypeError, ... on untraceable code
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(
            f"{type(model).__name__} cannot be traced by torch.fx, so its file cannot hold it "
            f"({type(err).__name__}: {first[:200]})"
        ) from None
    modules = []
    for name, m in model.named_modules():
        if type(m) in _LEAF_TYPES:
            modules.append([name, _LEAF_TYPES[type(m)], _arguments(m)])
        elif any(True for _ in m.parameters(recurse=False)) or any(
            True for _ in m.buffers(recurse=False)
        ):
            raise ConfigError(
                f"{_where(model, name)} holds its own parameters or buffers; a cnnpress file "
                f"holds them only in these module types: {', '.join(LEAVES)}"
            )
    nodes = [_node(model, n) for n in graph.nodes]
    return {"version": GRAPH_VERSION, "modules": modules, "nodes": nodes}


def _arguments(module: nn.Module) -> dict[str, Any]:
    _, names = LEAVES[_LEAF_TYPES[type(module)]]
    out = {}
    for name in names:
        value = getattr(module, name)
        if name == "bias":
            value = value is not None
        out[name] = list(value) if isinstance(value, tuple) else value
    return out


def _node(model: nn.Module, node: fx.Node) -> list[Any]:
    where = _where(model, node.meta.get("scope", ""))
    if node.op == "placeholder":
        return [node.name, "input", None, [], {}]
    if node.op == "output":
        return [node.name, "output", None, [_encode(node.args[0], where)], {}]
    if node.op == "call_module":
        target = node.target
    elif node.op == "call_function":
        target = _NAMES.get(id(node.target))
        if target is None:
            name = getattr(node.target, "__name__", str(node.target))
            raise ConfigError(
                f"{where} calls {name}, which a cnnpress file cannot hold; supported: "
                f"{', '.join(sorted(FUNCTIONS))}"
            )
    elif node.op == "call_method" and node.target in METHODS:
        target = node.target
    else:
        what = f"tensor method .{node.target}()" if node.op == "call_method" else node.op
        detail = f" {node.target}" if node.op == "get_attr" else ""
        raise ConfigError(f"{where} uses {what}{detail}, which a cnnpress file cannot hold")
    if target == "getattr" and (len(node.args) != 2 or node.args[1] not in ATTRIBUTES):
        raise ConfigError(f"{where} reads the attribute {node.args[1:]!r} of a tensor")
    op = {"call_module": "module", "call_function": "function", "call_method": "method"}
    args = [_encode(a, where) for a in node.args]
    kwargs = {k: _encode(v, where) for k, v in node.kwargs.items()}
    return [node.name, op[node.op], target, args, kwargs]


def _encode(value: Any, where: str) -> Any:
    if isinstance(value, fx.Node):
        return {"node": value.name}
    if isinstance(value, tuple):
        return {"tuple": [_encode(v, where) for v in value]}
    if isinstance(value, list):
        return [_encode(v, where) for v in value]
    if isinstance(value, slice):
        return {"slice": [_encode(v, where) for v in (value.start, value.stop, value.step)]}
    if value is Ellipsis:
        return {"ellipsis": True}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ConfigError(f"{where} passes a {type(value).__name__}, which a cnnpress file cannot hold")


# -- building ----------------------------------------------------------------------------------
class GraphNet(nn.Module):
    """A network rebuilt from its graph: the leaf modules under their recorded names, and a
    forward that runs the recorded operations in order."""

    def __init__(self, graph: dict[str, Any]) -> None:
        super().__init__()
        for name, kind, arguments in graph["modules"]:
            _place(self, name, _make(name, kind, arguments))
        self.nodes = [list(n) for n in graph["nodes"]]
        _check_nodes(self, self.nodes)

    def forward(self, *inputs: torch.Tensor) -> Any:
        return run_nodes(self, self.nodes, inputs)


def run_nodes(model: nn.Module, nodes: list[list[Any]], inputs: Any, visit: Any = None) -> Any:
    """Run a graph's ``nodes`` over ``model``'s modules on ``inputs``; ``visit(name, value)``,
    where given, is called on (and returns) every tensor a node makes."""
    env: dict[str, Any] = {}
    given = iter(inputs)
    for name, op, target, args, kwargs in nodes:
        if op == "input":
            value = next(given)
        else:
            a = [_decode(v, env) for v in args]
            k = {key: _decode(v, env) for key, v in kwargs.items()}
            if op == "output":
                return a[0]
            if op == "module":
                value = model.get_submodule(target)(*a, **k)
            elif op == "function":
                value = FUNCTIONS[target](*a, **k)
            else:
                value = getattr(a[0], target)(*a[1:], **k)
        if visit is not None and isinstance(value, torch.Tensor):
            value = visit(name, value)
        env[name] = value
    raise ConfigError("the graph has no output")


def build(graph: Any) -> GraphNet:
    """The :class:`GraphNet` of a graph from a file (checked; one line per problem)."""
    if not isinstance(graph, dict) or graph.get("version") != GRAPH_VERSION:
        version = graph.get("version") if isinstance(graph, dict) else None
        raise ConfigError(f"graph version {version!r} is not one this cnnpress reads (1)")
    modules, nodes = graph.get("modules"), graph.get("nodes")
    if not isinstance(modules, list) or not isinstance(nodes, list):
        raise ConfigError("the graph needs lists of modules and nodes")
    if len(modules) > MAX_MODULES or len(nodes) > MAX_NODES:
        raise ConfigError(f"the graph has {len(modules)} modules and {len(nodes)} nodes: too many")
    return GraphNet(graph)


def _make(name: str, kind: Any, arguments: Any) -> nn.Module:
    if kind not in LEAVES or not isinstance(arguments, dict):
        raise ConfigError(f"module {name!r}: {kind!r} is not a module type a graph holds")
    cls, names = LEAVES[kind]
    unknown = sorted(set(arguments) - set(names))
    if unknown:
        raise ConfigError(f"module {name!r} ({kind}): unknown argument(s) {unknown}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in arguments.items()}
    try:
        return cls(**values)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ConfigError(f"module {name!r} ({kind}): {err}") from None


def _place(root: nn.Module, name: Any, module: nn.Module) -> None:
    """Put ``module`` at the dotted ``name`` under ``root``, making the containers on the way."""
    parts = name.split(".") if isinstance(name, str) and name else []
    if not parts or not all(p.isidentifier() or p.isdigit() for p in parts):
        raise ConfigError(f"module name {name!r} is not a dotted module path")
    parent = root
    for part in parts[:-1]:
        child = parent._modules.get(part)
        if child is None:
            child = nn.Module()
            parent.add_module(part, child)
        parent = child
    if parts[-1] in parent._modules or hasattr(nn.Module, parts[-1]) or parts[-1] == "nodes":
        raise ConfigError(f"module name {name!r} appears twice or is reserved")
    parent.add_module(parts[-1], module)


def _check_nodes(net: GraphNet, nodes: list[list[Any]]) -> None:
    seen: set[str] = set()
    for node in nodes:
        if len(node) != 5 or not isinstance(node[0], str) or not isinstance(node[3], list):
            raise ConfigError(f"graph node {node!r:.80} is not [name, op, target, args, kwargs]")
        name, op, target, args, kwargs = node
        if op == "module" and not _is_module(net, target):
            raise ConfigError(f"graph node {name!r} calls module {target!r}, which it lacks")
        if op == "function" and target not in FUNCTIONS:
            raise ConfigError(f"graph node {name!r} calls {target!r}, which a graph cannot")
        if op == "method" and target not in METHODS:
            raise ConfigError(f"graph node {name!r} calls .{target}(), which a graph cannot")
        if op not in ("input", "output", "module", "function", "method"):
            raise ConfigError(f"graph node {name!r} has unknown op {op!r}")
        if not isinstance(kwargs, dict):
            raise ConfigError(f"graph node {name!r}: kwargs must be a mapping")
        missing = (_refs(args) | _refs(list(kwargs.values()))) - seen
        if missing:
            raise ConfigError(f"graph node {name!r} uses {sorted(missing)} before they exist")
        seen.add(name)
    if not nodes or nodes[-1][1] != "output":
        raise ConfigError("the graph has no output")


def _is_module(net: nn.Module, target: Any) -> bool:
    try:
        return isinstance(target, str) and net.get_submodule(target) is not net
    except AttributeError:
        return False


def _refs(values: list[Any]) -> set[str]:
    found: set[str] = set()
    for v in values:
        if isinstance(v, dict):
            if isinstance(v.get("node"), str):
                found.add(v["node"])
            found |= _refs(list(v.get("tuple") or v.get("slice") or []))
        elif isinstance(v, list):
            found |= _refs(v)
    return found


def _decode(value: Any, env: dict[str, Any]) -> Any:
    if isinstance(value, dict):
        if "node" in value:
            return env[value["node"]]
        if "tuple" in value:
            return tuple(_decode(v, env) for v in value["tuple"])
        if "slice" in value:
            return slice(*(_decode(v, env) for v in value["slice"]))
        if value.get("ellipsis"):
            return Ellipsis
    if isinstance(value, list):
        return [_decode(v, env) for v in value]
    return value
