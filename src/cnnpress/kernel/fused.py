"""Fast SLBF inference on the CPU: a fused C++ kernel, built on first use, with a fallback.

The kernel (``csrc/slbf_kernel.cpp``) computes, for a tile of output pixels, the bank
responses ``z[j, t] = x_j * B[t]`` (``m*c*k*k`` MACs per pixel) and merges them into the ``n``
outputs, ``y_i = sum_j z[j, p(i, j)]`` (``n*s`` adds per pixel), while the tile is in cache;
items of work run on PyTorch's threads (``torch.set_num_threads``).

It is compiled just in time with ``torch.utils.cpp_extension.load`` (``-O3 -march=native
-fopenmp``) the first time it is needed, and cached in a build folder: PyTorch's extensions
folder by default (``TORCH_EXTENSIONS_DIR``), or the folder named by ``CNNPRESS_KERNEL_DIR``.
``CNNPRESS_KERNEL=0`` turns it off. When it cannot be built (no compiler, no ninja), the
layers use their pure PyTorch paths and :func:`status` says so and why; nothing else changes.

The kernel knows nothing of cnnpress's layer classes: it reads a layer through the small
:class:`StackedConv` interface (bank, selections, geometry and two PyTorch paths). In eval
mode such a layer whose ``path`` is ``"auto"`` (the default) runs, for each (shape,
batch-size bucket, thread count), the fastest of ``"kernel"``, ``"dense"`` and ``"stm"``,
measured once on the first such call and remembered in this process (:func:`choices`).
``layer.path = "kernel" | "dense" | "stm"`` (or ``cnnpress.methods.slbf.set_path`` on a whole
model) forces a path. The kernel computes no gradient: it is only used when none is needed
(``torch.no_grad()`` / ``torch.inference_mode()``, or nothing requires one), on float32 CPU
tensors, outside tracing, ``torch.compile`` and dispatch modes (such as the FLOP counter);
elsewhere the layer's dense path runs.
"""

from __future__ import annotations

import hashlib
import math
import os
import platform
import statistics
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import torch
from torch import nn

from cnnpress.errors import ConfigError

__all__ = [
    "BUILD_DIR_ENV",
    "DISABLE_ENV",
    "FLAGS",
    "SOURCE",
    "available",
    "choices",
    "choose_path",
    "clear_choices",
    "conv2d",
    "forward",
    "load",
    "plan",
    "status",
    "StackedConv",
]

#: Environment variable naming the build folder (default: PyTorch's extensions folder).
BUILD_DIR_ENV = "CNNPRESS_KERNEL_DIR"
#: Environment variable that turns the kernel off when set to 0, off, false or no.
DISABLE_ENV = "CNNPRESS_KERNEL"
#: The C++ source of the kernel.
SOURCE = Path(__file__).with_name("csrc") / "slbf_kernel.cpp"
#: Compiler flags (the linker gets ``-fopenmp`` too).
FLAGS = ("-O3", "-march=native", "-fopenmp")
#: The one line printed (to stderr) before the kernel is compiled.
BUILD_NOTICE = (
    "cnnpress: compiling the fast SLBF kernel for this CPU (once, about a minute); "
    f"{DISABLE_ENV}=0 skips it and uses the PyTorch paths"
)
#: Paths the automatic choice measures.
CANDIDATES = ("kernel", "dense", "stm")


class StackedConv(Protocol):
    """What the kernel reads of a layer whose filters are stacks of shared binary filters."""

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    slice_channels: int
    num_filters: int
    path: str
    binary_bank: torch.Tensor  # (m, d, kh, kw) of +-1; its version keys the prepared cache
    selection: torch.Tensor  # (n, s) bank indices
    scale: torch.Tensor | None
    bias: torch.Tensor | None

    def bank(self) -> torch.Tensor: ...  # (m, d, kh, kw) floats
    def indices(self) -> torch.Tensor: ...  # (n, s) indices into the bank per slice
    def forward_dense(self, x: torch.Tensor) -> torch.Tensor: ...
    def forward_stm(self, x: torch.Tensor) -> torch.Tensor: ...
    def parameters(self) -> Any: ...


class _Runtime:
    """The loaded extension, why it is (not) there, and the measured choices of this process."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.tried = False
        self.module: ModuleType | None = None
        self.reason = "not loaded yet: it is built on first use (or by load())"
        self.name = ""
        self.build_directory: str | None = None
        self.build_seconds: float | None = None
        self.choices: dict[tuple, str] = {}
        self.timings: dict[tuple, dict[str, float]] = {}
        self.prepared: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


_RT = _Runtime()


def _cpu_tag() -> str:
    """A short hash of the CPU model and flags: -march=native builds differ between CPUs."""
    text = platform.machine() + platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features"))]
        text += "".join(sorted(set(lines)))
    except OSError:
        pass
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def load(verbose: bool = False) -> ModuleType | None:
    """Build (first time) and import the kernel; ``None`` when it cannot be had.

    The attempt is made once per process; :func:`status` tells the outcome and the reason.

    Args:
        verbose: Show the compiler's output.

    Returns:
        The extension module, or ``None`` (the PyTorch paths are used instead).
    """
    if _RT.tried:
        return _RT.module
    with _RT.lock:
        if _RT.tried:
            return _RT.module
        flag = os.environ.get(DISABLE_ENV, "").strip().lower()
        if flag in ("0", "off", "false", "no"):
            _RT.reason = f"turned off by {DISABLE_ENV}={os.environ[DISABLE_ENV]}"
        else:
            _build(verbose)
        _RT.tried = True
    return _RT.module


def _with_venv_on_path() -> None:
    """Put this interpreter's scripts folder on PATH: torch looks for ``ninja`` there, and
    the ``ninja`` dependency installs it into the virtual environment, not the system."""
    scripts = os.path.dirname(sys.executable)
    if scripts not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = scripts + os.pathsep + os.environ.get("PATH", "")


def _build(verbose: bool) -> None:
    _RT.name = f"cnnpress_slbf_{_cpu_tag()}"
    _with_venv_on_path()
    try:
        from torch.utils import cpp_extension

        build_dir = os.environ.get(BUILD_DIR_ENV) or None
        if build_dir:
            os.makedirs(build_dir, exist_ok=True)
        _RT.build_directory = build_dir or cpp_extension._get_build_directory(_RT.name, False)
        if not _built(_RT.build_directory, _RT.name):
            print(BUILD_NOTICE, file=sys.stderr, flush=True)
        start = time.perf_counter()
        module = cpp_extension.load(
            name=_RT.name,
            sources=[str(SOURCE)],
            extra_cflags=list(FLAGS),
            extra_ldflags=["-fopenmp"],
            build_directory=build_dir,
            verbose=verbose,
        )
        _RT.build_seconds = round(time.perf_counter() - start, 2)
        _RT.module = module
        _RT.reason = f"compiled for {module.build_info()}"
    except Exception as err:  # no compiler, no ninja, a build or import error
        detail = str(err).strip().splitlines()
        detail = detail[-1] if detail else type(err).__name__
        _RT.reason = f"could not build the kernel ({type(err).__name__}: {detail[:300]})"
        warnings.warn(
            f"cnnpress: {_RT.reason}; SLBF layers use their PyTorch paths "
            f"(see cnnpress.kernel.status())",
            RuntimeWarning,
            stacklevel=3,
        )


def _built(build_directory: str, name: str) -> bool:
    """Whether a build of this source for this CPU is cached (loading it takes a moment)."""
    return any(Path(build_directory).glob(f"{name}*.so"))


def available() -> bool:
    """Whether the compiled kernel can be used (builds it on the first call)."""
    return load() is not None


def status(build: bool = True) -> dict[str, Any]:
    """Which inference path SLBF layers get here, and why.

    Args:
        build: Try to build or load the kernel first when no attempt was made yet.

    Returns:
        JSON-ready: ``available``, ``path`` (``"kernel"`` or ``"pytorch"``), ``reason``, the
        extension ``name``, ``build_directory``, ``build_seconds`` (of this process's load;
        small when the cached build was reused), ``flags``, ``threads`` and the number of
        measured ``choices``.
    """
    if build:
        load()
    return {
        "available": _RT.module is not None,
        "path": "kernel" if _RT.module is not None else "pytorch",
        "reason": _RT.reason,
        "name": _RT.name,
        "build_directory": _RT.build_directory,
        "build_seconds": _RT.build_seconds,
        "flags": list(FLAGS),
        "threads": torch.get_num_threads(),
        "choices": len(_RT.choices),
    }


# -- calling the kernel ------------------------------------------------------------------------
def _prepared(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The bank as (d*kh*kw, m) floats and the selections as int32, cached per weight version."""
    bank, sel = layer.binary_bank, layer.selection
    key = (bank._version, bank.data_ptr(), sel._version, sel.data_ptr())
    entry = _RT.prepared.get(layer)
    if entry is None or entry[0] != key:
        with torch.no_grad():
            bank = layer.bank().reshape(layer.num_filters, -1).t().contiguous().float()
            idx = layer.indices().to(torch.int32).contiguous()
        entry = (key, bank, idx)
        _RT.prepared[layer] = entry
    return entry[1], entry[2]


def _run(module: ModuleType, layer: nn.Module, x: torch.Tensor, mode: int = 0) -> torch.Tensor:
    bank, idx = _prepared(layer)
    scale = None if layer.scale is None else layer.scale.detach()
    bias = None if layer.bias is None else layer.bias.detach()
    return module.slbf_conv2d(
        x,
        bank,
        idx,
        scale,
        bias,
        list(layer.kernel_size),
        list(layer.stride),
        list(layer.padding),
        list(layer.dilation),
        mode,
    )


def conv2d(layer: nn.Module, x: torch.Tensor, mode: str = "auto") -> torch.Tensor:
    """Run ``layer`` on ``x`` through the kernel, without gradient.

    Args:
        layer: A :class:`StackedConv`.
        x: Float32 CPU input (N, C, H, W).
        mode: ``"auto"``, ``"direct"`` (tiles of the padded grid) or ``"packed"`` (patch
            matrices per tile; used for small images).

    Returns:
        The layer's output.

    Raises:
        RuntimeError: The kernel is not available (see :func:`status`).
    """
    module = load()
    if module is None:
        raise RuntimeError(f"the SLBF kernel is not available: {_RT.reason}")
    modes = {"auto": 0, "direct": 1, "packed": 2}
    if mode not in modes:
        raise ConfigError(f"mode must be one of {sorted(modes)}, got {mode!r}")
    with torch.no_grad():
        return _run(module, layer, x, modes[mode])


def plan(layer: nn.Module, input_shape: tuple[int, int, int, int]) -> dict[str, int | str]:
    """How the kernel would cut the work for ``layer`` on inputs of ``input_shape`` (N,C,H,W)."""
    module = load()
    if module is None:
        raise RuntimeError(f"the SLBF kernel is not available: {_RT.reason}")
    values = module.slbf_plan(
        list(input_shape),
        layer.out_channels,
        layer.num_filters,
        layer.slice_channels,
        list(layer.kernel_size),
        list(layer.stride),
        list(layer.padding),
        list(layer.dilation),
        0,
        torch.get_num_threads(),
    )
    keys = ("mode", "vectors", "bands", "groups", "splits", "slices_per_chunk", "threads")
    out: dict[str, int | str] = dict(zip(keys, values, strict=True))
    out["mode"] = "packed" if values[0] == 2 else "direct"
    return out


# -- dispatch from the layer's forward ----------------------------------------------------------
def _supported(layer: nn.Module, x: torch.Tensor) -> bool:
    """Whether the kernel may run: no gradient wanted, float32 CPU, no tracing or modes."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 4:
        return False
    if torch.is_grad_enabled() and (
        x.requires_grad or any(p.requires_grad for p in layer.parameters())
    ):
        return False
    if torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False
    try:
        return torch._C._len_torch_dispatch_stack() == 0
    except AttributeError:  # pragma: no cover - older torch
        return True


def _bucket(batch: int) -> int:
    return 1 if batch <= 1 else 2 ** math.ceil(math.log2(batch))


def _key(layer: nn.Module, x: torch.Tensor) -> tuple:
    return (
        layer.in_channels,
        layer.out_channels,
        tuple(layer.kernel_size),
        tuple(layer.stride),
        tuple(layer.padding),
        tuple(layer.dilation),
        layer.slice_channels,
        layer.num_filters,
        layer.scale is not None,
        layer.bias is not None,
        tuple(x.shape[2:]),
        _bucket(x.shape[0]),
        torch.get_num_threads(),
    )


def _paths(layer: nn.Module, module: ModuleType | None) -> dict[str, Callable]:
    paths: dict[str, Callable] = {}
    if module is not None:
        paths["kernel"] = lambda x: _run(module, layer, x)
    paths["dense"] = layer.forward_dense
    paths["stm"] = layer.forward_stm
    return paths


def _measure(paths: dict[str, Callable], x: torch.Tensor, budget: float = 0.5) -> dict[str, float]:
    """Median seconds per path; runs interleaved, at least 3 rounds, more within ``budget``."""
    times: dict[str, list[float]] = {name: [] for name in paths}
    with torch.no_grad():
        for fn in paths.values():  # warm-up
            fn(x)
        start = time.perf_counter()
        for r in range(15):
            for name, fn in paths.items():
                t0 = time.perf_counter()
                fn(x)
                times[name].append(time.perf_counter() - t0)
            if r >= 2 and time.perf_counter() - start > budget:
                break
    return {name: statistics.median(v) for name, v in times.items()}


def choose_path(layer: nn.Module, x: torch.Tensor) -> str:
    """The fastest path for ``layer`` on inputs like ``x`` (measured once, then remembered)."""
    key = _key(layer, x)
    choice = _RT.choices.get(key)
    if choice is None:
        timings = _measure(_paths(layer, load()), x)
        choice = min(timings, key=timings.__getitem__)
        _RT.choices[key] = choice
        _RT.timings[key] = timings
    return choice


def choices() -> list[dict[str, Any]]:
    """The choices measured in this process: shape key, chosen path, median seconds per path."""
    names = ("in", "out", "kernel", "stride", "padding", "dilation", "d", "m", "scale", "bias")
    names += ("hw", "batch_bucket", "threads")
    return [
        {**dict(zip(names, key, strict=True)), "path": path, "seconds": _RT.timings.get(key)}
        for key, path in _RT.choices.items()
    ]


def clear_choices() -> None:
    """Forget the measured choices (they are measured again when next needed)."""
    _RT.choices.clear()
    _RT.timings.clear()


def forward(layer: StackedConv, x: torch.Tensor) -> torch.Tensor:
    """Eval-mode forward of a :class:`StackedConv` whose ``path`` is ``"auto"`` or ``"kernel"``."""
    if not _supported(layer, x):
        return layer.forward_dense(x)
    if layer.path == "kernel":
        module = load()
        return layer.forward_dense(x) if module is None else _run(module, layer, x)
    path = choose_path(layer, x)
    if path == "kernel":
        return _run(_RT.module, layer, x)
    return layer.forward_stm(x) if path == "stm" else layer.forward_dense(x)
