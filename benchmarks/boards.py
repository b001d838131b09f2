"""The C program of ``cnnpress export --c`` on emulated microcontroller boards with their real
memory maps: whether it fits (the linker decides), its flash and RAM with the measured stack,
and the instructions one inference executes, in total and per layer (QEMU ``-icount``).

The boards (``benchmarks/boards/``: one linker script per part, the start-up, the counter and
the main that reads ``input.bin`` and writes ``logits.bin`` through semihosting):

- ``lm3s6965evb``: TI Stellaris LM3S6965, Cortex-M3, 256 KiB flash at 0x0, 64 KiB SRAM;
- ``microbit``: BBC micro:bit v1, nRF51822, Cortex-M0, 256 KiB flash at 0x0, 16 KiB RAM;
- ``netduinoplus2``: Netduino Plus 2, STM32F405RG, Cortex-M4F, 1 MiB flash at 0x08000000,
  128 KiB SRAM (its 64 KiB core-coupled RAM unused); ``netduinoplus2-fpu`` is the same part
  built for its FPU (``-mfloat-abi=hard -mfpu=fpv4-sp-d16``), the others use soft float;
- ``mps2-an385``: not a real part: the Cortex-M3's instruction counts of programs too large
  for one. QEMU's ARM MPS2 FPGA image AN385 (Cortex-M3) with 4 MiB of code memory at 0x0 and
  4 MiB of RAM at 0x20000000 (the map of ``benchmarks/cortex_m3/link.ld``): the dense int8
  ResNet-20 (about 290 KB of flash) fits no Cortex-M3 above, and this board counts its
  instructions beside the SLBF program's. Its rows have ``real_part: false`` (the others
  ``true``): their ``fits`` is about that synthetic map, not about a microcontroller.

Each script puts the stack (2 KiB) in RAM after ``.bss``, so a program whose data + bss +
stack exceed the RAM, or whose code + constants exceed the flash, fails to link; such a row
has ``fits: false`` and GNU ld's overflow in bytes per region (its sizes come from the same
link kept with ``--noinhibit-exec``). The RAM of a program that fits is ``.data + .bss`` plus
the stack it used: the reset handler paints the reservation, and after the inferences the
deepest word overwritten is its high-water mark (``stack_bytes``). The harness's own input
and logits buffers count (the null model's row in ``boards`` gives the harness alone).

Instructions: QEMU runs with ``-icount shift=0``, which advances virtual time 1 ns per executed
instruction, and SysTick counts the processor clock in virtual time (its 24-bit wraps counted
by its interrupt). The instructions per tick are measured on each board from a loop of known
length (``subs``/``bne``: 2 instructions an iteration; measured with QEMU 7.2: 80 on the
lm3s6965evb, whose clock is 12.5 MHz out of reset, 62.5 on the micro:bit's 16 MHz, 5.95 on the
STM32F405's 168 MHz, 40 on the mps2-an385's 25 MHz) and the cost of one counter reading
subtracted. A reading is exact to a tick, so a total is exact to about a tick and a layer to a
tick per operation. Per layer: the build defines ``CNNP_AFTER_OP(i)`` (``profile.h``), which
adds the ticks since the previous reading to operation i; its own cost, measured by calling it
512 times, is subtracted from each operation. The total comes from a build without the hook,
run twice: the two runs must count the same (``deterministic``). Instructions are not cycles:
QEMU counts instructions, and a Cortex-M3 or M4 takes more than one cycle for a load, a taken
branch or a long multiply, a Cortex-M0 more still (and it has no long multiply at all).

Per row: the board (``real_part``), the model, its method (``fp32`` for a plain model), its
activations (the float program and the int8 one of ``cnnpress.quantize`` with 1,000 training
images of Fashion-MNIST), its ``accuracy`` in percent over the first ``accuracy_images`` test
images (``--test-images``, by default all 10,000; computed once per model in PyTorch: the float
model for the float32 rows, the quantized model's integer forward, which is the int8 program
bit for bit, for the int8 rows), fits and overflow, flash and RAM, the stack, instructions per
inference (mean over the images; ``instructions_per_image`` gives each, they differ slightly
with the data) and per layer, instructions per dense-equivalent MAC (of the fp32 ResNet-20,
from PyTorch's FLOP counter), and the emulated logits against the host build of the same
program (``bit_equal``, ``same_class``). The instructions are counted on ``--images`` test
images (2 by default); with ``--check-images N`` the int8 programs that fit the ``lm3s6965evb``
also run there on the first N test images (a build without the hook, run once), and that row
records ``check_images`` and ``check_bit_equal``: the emulated logits equal to PyTorch's
integer forward, every bit. Installs its packages itself (as root, with apt) where they are
missing::

    python benchmarks/boards.py --out benchmarks/results/boards.json --check-images 200

``--table PATH`` prints the docs/results.md tables of a results file (markdown): every row's
fits, flash, RAM, instructions and accuracy, and the per-layer instructions of the SLBF and
dense int8 programs on the mps2-an385. docs/results.md holds them after the comment
(``MARKER``)::

    <!-- boards tables: python benchmarks/boards.py --table benchmarks/results/boards.json -->

The models: the shipped fp32 ResNet-20 and the ``--files`` (by default the trained SLBF 50x,
100x and BWN files of ``recipes/compare-fmnist-slbf.yaml`` that exist), each as its float and
its int8 program.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

import cnnpress
from cnnpress.data import get_spec, load_dataset, normalize
from cnnpress.provenance import (
    ALLOW_DIRTY_HELP,
    require_clean_or_exit,
    script_provenance,
    write_result,
)
from cnnpress.runtime import export_c
from cnnpress.runtime.c_export import RUNTIME_FILES, CProgram

HARNESS = Path(__file__).parent / "boards"
HARNESS_SOURCES = ("startup.c", "semihost.c", "ticks.c", "main_board.c")
PACKAGES = ["gcc-arm-none-eabi", "libnewlib-arm-none-eabi", "qemu-system-arm"]
TOOLS = ["arm-none-eabi-gcc", "arm-none-eabi-size", "qemu-system-arm"]
FLAGS = [
    "-mthumb",
    "-O2",
    "-std=c99",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-ffunction-sections",
    "-fdata-sections",
]
LINK = ["-Wl,--gc-sections", "--specs=nano.specs", "-nostartfiles"]
SHAPE = (1, 28, 28)
KERNELS = [n for n in RUNTIME_FILES if n.endswith(".c") and n != "main.c"]
RUNS = "runs/compare-fmnist-slbf"
FILES = [f"{RUNS}/slbf-50x-kd/model.cnnp", f"{RUNS}/slbf-100x-kd/model.cnnp"]
FILES.append(f"{RUNS}/bwn-kd/model.cnnp")
OVERFLOW = re.compile(r"region `(\w+)' overflowed by (\d+) bytes")
NOT_CYCLES = (
    "instructions executed as QEMU counts them (-icount shift=0), not cycles: a Cortex-M3/M4 "
    "takes more than one cycle for loads, taken branches and long multiplies, a Cortex-M0 more"
)


@dataclass(frozen=True)
class Board:
    """A part: the QEMU machine that emulates it, its linker script, its compiler flags."""

    name: str
    machine: str
    part: str
    cpu: tuple[str, ...]
    flash_bytes: int
    ram_bytes: int
    core: str  # the core of cnnpress.runtime.boards.CODE_BYTES
    real_part: bool = True  # False: a synthetic map, for counting instructions only

    @property
    def script(self) -> str:
        return f"{self.machine}.ld"


KIB = 1024
BOARDS = {
    b.name: b
    for b in (
        Board(
            "lm3s6965evb",
            "lm3s6965evb",
            "TI Stellaris LM3S6965 (Cortex-M3)",
            ("-mcpu=cortex-m3", "-mfloat-abi=soft"),
            256 * KIB,
            64 * KIB,
            "cortex-m3",
        ),
        Board(
            "microbit",
            "microbit",
            "BBC micro:bit v1, Nordic nRF51822 (Cortex-M0)",
            ("-mcpu=cortex-m0", "-mfloat-abi=soft"),
            256 * KIB,
            16 * KIB,
            "cortex-m0",
        ),
        Board(
            "netduinoplus2",
            "netduinoplus2",
            "Netduino Plus 2, ST STM32F405RG (Cortex-M4F), soft float",
            ("-mcpu=cortex-m4", "-mfloat-abi=soft"),
            1024 * KIB,
            128 * KIB,
            "cortex-m4",
        ),
        Board(
            "netduinoplus2-fpu",
            "netduinoplus2",
            "Netduino Plus 2, ST STM32F405RG (Cortex-M4F), its FPU",
            ("-mcpu=cortex-m4", "-mfloat-abi=hard", "-mfpu=fpv4-sp-d16"),
            1024 * KIB,
            128 * KIB,
            "cortex-m4f",
        ),
        Board(
            "mps2-an385",
            "mps2-an385",
            "not a real part: the Cortex-M3's instruction counts of programs too large for one "
            "(QEMU mps2-an385, 4 MiB of code memory, 4 MiB of RAM)",
            ("-mcpu=cortex-m3", "-mfloat-abi=soft"),
            4096 * KIB,
            4096 * KIB,
            "cortex-m3",
            real_part=False,
        ),
    )
}
CHECK_BOARD = "lm3s6965evb"  # where --check-images runs the int8 programs
SYNTHETIC = "mps2-an385"  # the per-layer table's board
MARKER = (
    "<!-- boards tables: python benchmarks/boards.py --table benchmarks/results/boards.json -->"
)


def have_toolchain() -> bool:
    return all(shutil.which(t) for t in TOOLS)


def install_toolchain() -> None:
    """apt-get the cross compiler, newlib and QEMU (about 0.9 GB without recommends)."""
    if have_toolchain():
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        sys.exit(
            f"needs {', '.join(TOOLS)}: apt-get install --no-install-recommends "
            f"{' '.join(PACKAGES)} (as root)"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(
        ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )


# -- building ---------------------------------------------------------------------------------
@dataclass
class Build:
    """A linked program (``fits``) or the overflow per region of one that does not link."""

    elf: Path
    fits: bool
    overflow: dict[str, int]
    sizes: dict[str, int]


def overflows(log: str) -> dict[str, int]:
    """GNU ld's ``region `RAM' overflowed by N bytes`` lines: {region: N}."""
    return {m[1]: int(m[2]) for m in OVERFLOW.finditer(log)}


def sizes(elf: Path) -> dict[str, int]:
    """Flash (code, constants, the initial values of .data), .data, .bss, the stack
    reservation and the RAM the link takes (from the start of .data to the stack's top)."""
    rows = subprocess.run(
        ["arm-none-eabi-size", "-A", str(elf)], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    cells = [r.split() for r in rows]
    sec = {c[0]: (int(c[1]), int(c[2])) for c in cells if len(c) == 3 and c[1].isdigit()}
    (text, _), (exidx, _) = sec[".text"], sec.get(".ARM.exidx", (0, 0))
    (data, ram), (bss, _), (stack, stack_at) = sec[".data"], sec[".bss"], sec[".stack"]
    return {
        "flash_bytes": text + exidx + data,
        "data_bytes": data,
        "bss_bytes": bss,
        "stack_reserved_bytes": stack,
        "ram_linked_bytes": stack_at + stack - ram,
    }


def gcc(board: Board, sources: list[str], elf: str, ops: int, keep: bool) -> list[str]:
    """The command that compiles and links ``sources`` (in the folder it runs in, whose
    ``model.h`` the main includes) with the harness; ``ops`` > 0: with the per-operation
    hook; ``keep``: write the program even if it overflows the board (to measure it)."""
    hook = [f"-DCNNP_OPS={ops}", "-include", str(HARNESS / "profile.h")] if ops else []
    return [
        "arm-none-eabi-gcc",
        *board.cpu,
        *FLAGS,
        "-I.",
        *hook,
        *LINK,
        *(["-Wl,--noinhibit-exec"] if keep else []),
        f"-L{HARNESS}",
        "-T",
        board.script,
        *sources,
        *(str(HARNESS / s) for s in HARNESS_SOURCES),
        "-lm",
        "-o",
        elf,
    ]


def build(folder: Path, board: Board, sources: list[str], ops: int = 0) -> Build:
    """Cross-compile the program in ``folder`` for ``board``; a link that overflows the
    board's flash or RAM fails, and its overflow is returned with the sizes it would take."""
    elf = f"{board.name}{'-profile' if ops else ''}.elf"
    done = subprocess.run(
        gcc(board, sources, elf, ops, keep=False),
        cwd=folder,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode == 0:
        return Build(folder / elf, True, {}, sizes(folder / elf))
    over = overflows(done.stderr)
    if not over:
        raise RuntimeError(f"{board.name}: the build failed:\n{done.stderr[-3000:]}")
    kept = f"overflow-{elf}"
    subprocess.run(
        gcc(board, sources, kept, ops, keep=True), cwd=folder, capture_output=True, check=True
    )
    return Build(folder / kept, False, over, sizes(folder / kept))


# -- running ----------------------------------------------------------------------------------
@dataclass
class Run:
    """One QEMU run: the logits, and the counter's words turned into instructions."""

    logits: np.ndarray
    raw: bytes  # counts.bin as written
    per_tick: float  # instructions per SysTick tick, measured
    read: float  # instructions of one counter reading
    hook: float  # instructions of one CNNP_AFTER_OP call
    instructions: np.ndarray  # per image, of cnnp_predict (the counter's reading subtracted)
    op_instructions: np.ndarray  # images x ops (the hook's cost subtracted); none unhooked
    stack_bytes: int
    stack_reserved_bytes: int


def parse_counts(raw: bytes, logits: np.ndarray) -> Run:
    """``counts.bin`` (``benchmarks/boards/main_board.c`` describes its words) as a Run."""
    w = np.frombuffer(raw, dtype="<u4").astype(np.int64)
    ops, short, long_, t_short, t_long, calls, hook, read = (int(v) for v in w[:8])
    per_tick = 2 * (long_ - short) / (t_long - t_short)
    body = w[8:-2].reshape(len(logits), 1 + ops)
    read_cost, hook_cost = read * per_tick / calls, hook * per_tick / calls
    return Run(
        logits=logits,
        raw=raw,
        per_tick=per_tick,
        read=read_cost,
        hook=hook_cost,
        instructions=body[:, 0] * per_tick - read_cost,
        op_instructions=body[:, 1:] * per_tick - hook_cost,
        stack_bytes=int(w[-2]),
        stack_reserved_bytes=int(w[-1]),
    )


def run_qemu(board: Board, elf: Path, x: np.ndarray, outputs: int, timeout: float) -> Run | None:
    """Run ``elf`` on ``board``'s QEMU machine over the images ``x`` (float32, in the ELF's
    folder as ``input.bin``); None when it runs past ``timeout`` seconds."""
    folder = elf.parent
    (folder / "input.bin").write_bytes(np.ascontiguousarray(x, dtype="<f4").tobytes())
    for name in ("logits.bin", "counts.bin"):
        (folder / name).unlink(missing_ok=True)
    cmd = ["qemu-system-arm", "-M", board.machine, "-nographic", "-icount", "shift=0"]
    cmd += ["-semihosting-config", "enable=on,target=native", "-kernel", elf.name]
    try:
        done = subprocess.run(
            cmd, cwd=folder, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return None
    if done.returncode != 0:
        raise RuntimeError(f"QEMU ended with status {done.returncode}: {done.stderr[-500:]}")
    logits = np.frombuffer((folder / "logits.bin").read_bytes(), dtype="<f4")
    return parse_counts((folder / "counts.bin").read_bytes(), logits.reshape(len(x), outputs))


def run_host(folder: Path, x: np.ndarray) -> np.ndarray:
    """The logits of the same program built for this machine (its own ``main.c``)."""
    sources = ["model.c", *KERNELS, "main.c"]
    cmd = ["cc", "-std=c99", "-O2", "-Wall", "-Wextra", "-Werror", *sources, "-lm", "-o", "host"]
    subprocess.run(cmd, cwd=folder, check=True)
    done = subprocess.run(
        [str(folder / "host")],
        input=np.ascontiguousarray(x, dtype="<f4").tobytes(),
        capture_output=True,
        check=True,
    )
    return np.frombuffer(done.stdout, dtype="<f4").reshape(len(x), -1)


# -- measuring --------------------------------------------------------------------------------
@dataclass
class Program:
    """A model's exported C program and what the rows need of it."""

    model: str
    file: str | None
    method: str
    activations: str
    folder: Path
    modules: list[str]  # the layer of each operation of cnnp_predict ("" = graph-level)
    memory: dict
    host: np.ndarray = field(repr=False)
    sources: list[str] = field(default_factory=lambda: ["model.c", *KERNELS])
    accuracy: float | None = None  # percent, over accuracy_images test images (PyTorch)
    accuracy_images: int = 0
    check_x: np.ndarray | None = field(default=None, repr=False)  # --check-images
    check_logits: np.ndarray | None = field(default=None, repr=False)  # PyTorch's, of those


def method_of(model: torch.nn.Module) -> str:
    base = getattr(model, "float_model", model)
    return (getattr(base, "cnnpress_method", None) or {}).get("name", "fp32")


def short_name(file: str) -> str:
    """A run's folder name for its ``model.cnnp`` (``slbf-50x-kd``), else the file's stem."""
    path = Path(file)
    return path.parent.name if path.name == "model.cnnp" else path.stem


def program(
    name: str,
    model: torch.nn.Module,
    folder: Path,
    x: np.ndarray,
    file: str | None = None,
    **extra,
) -> Program:
    """Export ``model``'s C program into ``folder`` and run its host build on ``x``;
    ``extra``: more fields of the Program (its accuracy, the images to check)."""
    info = export_c(model, folder, SHAPE)
    modules = [op.module for op in CProgram(model, SHAPE).plan.ops]
    assert len(modules) == info["ops"]
    memory = {k: v for k, v in info.items() if k not in ("layers", "files")}
    return Program(
        name,
        file,
        method_of(model),
        info["activations"],
        folder,
        modules,
        memory,
        run_host(folder, x),
        **extra,
    )


def dense_macs(model: torch.nn.Module) -> int:
    """Multiply-accumulates of ``model`` on one 1x28x28 image (PyTorch's FLOPs / 2)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval()(torch.zeros(1, *SHAPE))
    return counter.get_total_flops() // 2


def per_layer(ops: np.ndarray, modules: list[str]) -> list[dict]:
    """Instructions per layer (mean over the images), in the order the layers first run."""
    layers: dict[str, dict] = {}
    for module, count in zip(modules, ops.mean(axis=0), strict=True):
        key = module or "(graph)"
        row = layers.setdefault(key, {"layer": key, "ops": 0, "instructions": 0.0})
        row["ops"] += 1
        row["instructions"] += float(count)
    return [{**r, "instructions": round(r["instructions"])} for r in layers.values()]


def timed_out(row: dict, what: str, timeout: float) -> dict:
    print(f"  {row['board']} {row['model']} {row['activations']}: {what} timed out", flush=True)
    return {**row, "timeout": f"{what}: over {timeout:g} s"}


def fit_fields(b: Build) -> dict:
    """A build's fits, overflow and linked sizes, as row fields."""
    return {
        "fits": b.fits,
        **({"overflow_bytes": b.overflow} if b.overflow else {}),
        **b.sizes,
    }


def check(board: Board, prog: Program, elf: Path, timeout: float) -> dict:
    """The program's emulated logits of its ``check_x`` against PyTorch's (``check_logits``),
    every bit (one run of the build without the hook)."""
    assert prog.check_x is not None and prog.check_logits is not None
    got = run_qemu(board, elf, prog.check_x, prog.check_logits.shape[1], timeout)
    if got is None:
        print(f"  {board.name} {prog.model} {prog.activations}: the check timed out", flush=True)
        return {"check_images": len(prog.check_x), "check_timeout": f"over {timeout:g} s"}
    return {
        "check_images": len(prog.check_x),
        "check_bit_equal": bool(np.array_equal(got.logits, prog.check_logits)),
    }


def measure(board: Board, prog: Program, x: np.ndarray, macs: int, timeout: float) -> dict:
    """One row: link ``prog`` for ``board``; if it fits, run it twice without the hook (the
    total and the determinism check) and once with it (per layer); on the CHECK_BOARD, run an
    int8 program's ``check_x`` too."""
    row = {
        "board": board.name,
        "real_part": board.real_part,
        "model": prog.model,
        **({"file": prog.file} if prog.file else {}),
        "method": prog.method,
        "activations": prog.activations,
        "accuracy": prog.accuracy,
        "accuracy_images": prog.accuracy_images,
        "arena_bytes": prog.memory["arena_bytes"],
    }
    plain = build(prog.folder, board, prog.sources)
    row.update(fit_fields(plain))
    if not plain.fits:
        return row
    if board.name == CHECK_BOARD and prog.check_x is not None:
        row.update(check(board, prog, plain.elf, timeout))
    first = run_qemu(board, plain.elf, x, prog.host.shape[1], timeout)
    if first is None:
        return timed_out(row, "the run", timeout)
    second = run_qemu(board, plain.elf, x, prog.host.shape[1], timeout)
    if second is None:
        return timed_out(row, "the second run", timeout)
    row.update(
        deterministic=first.raw == second.raw and np.array_equal(first.logits, second.logits),
        ram_bytes=row["data_bytes"] + row["bss_bytes"] + first.stack_bytes,
        stack_bytes=first.stack_bytes,
        stack_exhausted=first.stack_bytes >= first.stack_reserved_bytes,
        images=len(x),
        instructions=round(float(first.instructions.mean())),
        instructions_per_image=[round(float(v)) for v in first.instructions],
        instructions_per_mac=round(float(first.instructions.mean()) / macs, 2),
        instructions_per_tick=round(first.per_tick, 4),
        bit_equal=bool(np.array_equal(first.logits, prog.host)),
        same_class=int((first.logits.argmax(1) == prog.host.argmax(1)).sum()),
        max_abs_diff_from_host=float(np.abs(first.logits - prog.host).max()),
    )
    return {**row, **profile(board, prog, x, first, timeout)}


def profile(board: Board, prog: Program, x: np.ndarray, plain: Run, timeout: float) -> dict:
    """Per-layer instructions from the build with the hook, and how its sum (with the hook's
    measured cost subtracted per operation) compares with the total of the plain build."""
    hooked = build(prog.folder, board, prog.sources, ops=len(prog.modules))
    if not hooked.fits:
        return {"per_layer": None, "profile_overflow_bytes": hooked.overflow}
    run = run_qemu(board, hooked.elf, x, prog.host.shape[1], timeout)
    if run is None:
        return {"per_layer": None, "profile_timeout": f"over {timeout:g} s"}
    total = float(plain.instructions.mean())
    summed = float(run.op_instructions.sum(axis=1).mean())
    return {
        "per_layer": per_layer(run.op_instructions, prog.modules),
        "hook_instructions_per_op": round(run.hook, 2),
        "per_layer_sum": round(summed),
        "per_layer_sum_minus_total": round(summed - total),
        "profiled_logits_equal": bool(np.array_equal(run.logits, plain.logits)),
    }


def calibrate(board: Board, folder: Path, timeout: float) -> dict:
    """The board's counter and the harness alone, from the null model (one copy, no
    weights): instructions per tick, the cost of a reading and of the hook, determinism,
    and the harness's flash, RAM and stack."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("model.c", "model.h"):
        shutil.copyfile(HARNESS / "null" / name, folder / name)
    x = np.array([[1.5], [-2.0]], dtype=np.float32)
    plain, hooked = build(folder, board, ["model.c"]), build(folder, board, ["model.c"], ops=1)
    runs = [run_qemu(board, plain.elf, x, 1, timeout) for _ in range(2)]
    hook = run_qemu(board, hooked.elf, x, 1, timeout)
    if None in (*runs, hook):
        return {"board": board.name, "timeout": f"over {timeout:g} s"}
    first = runs[0]
    return {
        "machine": board.machine,
        "part": board.part,
        "real_part": board.real_part,
        "flags": list(board.cpu),
        "flash_bytes": board.flash_bytes,
        "ram_bytes": board.ram_bytes,
        "instructions_per_tick": round(first.per_tick, 4),
        "counter_read_instructions": round(first.read, 2),
        "hook_instructions": round(hook.hook, 2),
        "deterministic": runs[0].raw == runs[1].raw,
        "harness": {**plain.sizes, "stack_bytes": first.stack_bytes},
    }


# -- the run ----------------------------------------------------------------------------------
def test_split(count: int) -> tuple[torch.Tensor, np.ndarray]:
    """The first ``count`` Fashion-MNIST test images, normalized (N x 1 x 28 x 28), and their
    labels."""
    spec = get_spec("fashion-mnist")
    ds = load_dataset("fashion-mnist", "test")
    return normalize(ds.images[:count], spec.mean, spec.std), ds.labels[:count].numpy()


def images(count: int) -> np.ndarray:
    """The first ``count`` Fashion-MNIST test images, normalized (N x 1 x 28 x 28)."""
    return test_split(count)[0].numpy()


def accuracy(model: torch.nn.Module, x: torch.Tensor, labels: np.ndarray) -> float:
    """Percent of ``x`` that ``model`` (in eval mode) classifies as ``labels``, 2 decimals."""
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(b).argmax(1) for b in x.split(500)]).numpy()
    return round(100.0 * float((pred == labels).mean()), 2)


def calibration_images() -> torch.Tensor:
    """The first 1,000 training images, normalized: what ``cnnpress.quantize`` calibrates on."""
    spec = get_spec("fashion-mnist")
    ds = load_dataset("fashion-mnist", "train")
    return normalize(ds.images[:1000], spec.mean, spec.std)


def programs(
    name: str,
    folder: Path,
    x: np.ndarray,
    test: tuple[torch.Tensor, np.ndarray],
    check_x: torch.Tensor,
) -> list[Program]:
    """The float program of the model ``name`` (a ``.cnnp`` file or a ``pretrained:``
    name) and its int8 program (``cnnpress.quantize``, 8 bits), with their accuracies on
    ``test`` (PyTorch: the float model, the integer forward of the quantized one) and, where
    ``check_x`` holds images, the integer forward's logits of them."""
    model = cnnpress.load(name).eval()
    q = cnnpress.quantize(model, calibration_images(), bits=8).eval()
    file = None if name.startswith("pretrained:") else name
    short = short_name(name) if file else name
    slug = re.sub(r"[^A-Za-z0-9.-]+", "_", short)
    scored = {"accuracy_images": len(test[0])}
    checked = {}
    if len(check_x):
        with torch.no_grad():
            reference = q(check_x).numpy()
        checked = {"check_x": check_x.numpy(), "check_logits": reference}
    float_acc, int8_acc = accuracy(model, *test), accuracy(q, *test)
    print(f"{short}: accuracy float {float_acc}%, int8 {int8_acc}%", flush=True)
    return [
        program(short, model, folder / f"{slug}-float", x, file, accuracy=float_acc, **scored),
        program(short, q, folder / f"{slug}-int8", x, file, accuracy=int8_acc, **scored, **checked),
    ]


def summary(row: dict) -> str:
    where = f"{row['board']:18} {row['model']:27} {row['activations']:8}"
    if not row["fits"]:
        over = ", ".join(f"{k} by {v:,} B" for k, v in row["overflow_bytes"].items())
        return f"{where} does not fit: {over}"
    if "timeout" in row:
        return f"{where} fits; {row['timeout']}"
    return (
        f"{where} flash {row['flash_bytes']:>9,} RAM {row['ram_bytes']:>7,} (stack "
        f"{row['stack_bytes']:,}) {row['instructions']:>14,} instr ({row['instructions_per_mac']}"
        f"/MAC) {'bit-equal' if row['bit_equal'] else 'DIFFERS'}"
        f"{'' if row['deterministic'] else ' NOT DETERMINISTIC'}"
        f"{checked(row)}"
    )


def checked(row: dict) -> str:
    if "check_images" not in row:
        return ""
    if "check_bit_equal" not in row:
        return f"; check on {row['check_images']}: {row['check_timeout']}"
    same = "bit-equal" if row["check_bit_equal"] else "DIFFERS"
    return f"; {same} to PyTorch on {row['check_images']}"


# -- the tables of docs/results.md ------------------------------------------------------------
def _fits(row: dict) -> str:
    if row["fits"]:
        return "yes"
    return "no: " + ", ".join(f"{k} +{v:,}" for k, v in row["overflow_bytes"].items())


def _board(row: dict) -> str:
    return row["board"] if row.get("real_part", True) else f"{row['board']} (not a real part)"


def _count(row: dict) -> str:
    if "instructions" in row:
        return f"{row['instructions']:,}"
    return "timed out" if "timeout" in row else "-"


def tables(path: str) -> str:
    """The tables of docs/results.md (markdown) from a results file of this script: a row per
    model and activations; then the per-layer instructions of the SLBF and dense int8
    programs on the mps2-an385 (a column per model)."""
    rows = json.loads(Path(path).read_text())["rows"]
    out = [
        "| board | model | method | activations | fits | flash bytes | RAM bytes (data + bss + "
        "stack used; linked where it does not run) | instructions per inference | per dense MAC "
        "| accuracy |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ram = f"{r['ram_bytes']:,}" if "ram_bytes" in r else f"{r['ram_linked_bytes']:,} linked"
        mac = f"{r['instructions_per_mac']:.2f}" if "instructions_per_mac" in r else "-"
        acc = f"{r['accuracy']:.2f}%" if r.get("accuracy") is not None else "-"
        out.append(
            f"| {_board(r)} | {r['model']} | {r['method']} | {r['activations']} | {_fits(r)} | "
            f"{r['flash_bytes']:,} | {ram} | {_count(r)} | {mac} | {acc} |"
        )
    profiled = [
        r
        for r in rows
        if r["board"] == SYNTHETIC
        and r["activations"] == "int8"
        and r["method"] in ("slbf", "fp32")
        and r.get("per_layer")
    ]
    if not profiled:
        return "\n".join(out)
    profiled.sort(key=lambda r: r["method"] != "fp32")  # the dense program first
    cells = [{layer["layer"]: layer["instructions"] for layer in r["per_layer"]} for r in profiled]
    layers = list(dict.fromkeys(name for c in cells for name in c))
    heads = [
        f"{r['model']} ({'dense' if r['method'] == 'fp32' else r['method']})" for r in profiled
    ]
    out += [
        "",
        f"| layer (int8, instructions on {SYNTHETIC}) | " + " | ".join(heads) + " |",
        "|---" * (1 + len(heads)) + "|",
    ]
    for layer in layers:
        row = [f"{c[layer]:,}" if layer in c else "-" for c in cells]
        out.append(f"| {layer} | " + " | ".join(row) + " |")
    out.append(
        "| sum of the layers | " + " | ".join(f"{r['per_layer_sum']:,}" for r in profiled) + " |"
    )
    out.append(
        "| per inference (built without the hook) | "
        + " | ".join(f"{r['instructions']:,}" for r in profiled)
        + " |"
    )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2, help="test images per run")
    parser.add_argument("--test-images", type=int, default=10000, help="for the accuracies")
    parser.add_argument(
        "--check-images",
        type=int,
        default=0,
        help=f"test images on which the int8 programs that fit {CHECK_BOARD} are checked "
        "against PyTorch's integer forward (0: none)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (accuracies)")
    parser.add_argument("--files", nargs="*", default=None, help=".cnnp files (see the doc)")
    parser.add_argument("--boards", nargs="*", default=list(BOARDS), choices=list(BOARDS))
    parser.add_argument("--timeout", type=float, default=600, help="seconds per QEMU run")
    parser.add_argument("--out", default=None)
    parser.add_argument("--allow-dirty", action="store_true", help=ALLOW_DIRTY_HELP)
    parser.add_argument(
        "--table", default=None, help="print the docs/results.md tables of a result"
    )
    args = parser.parse_args()
    if args.table:
        print(tables(args.table))
        return
    require_clean_or_exit(args.allow_dirty or not args.out)  # a results file: clean tree
    provenance = script_provenance(args.out, args.allow_dirty)  # the tree the run starts from
    install_toolchain()
    torch.set_num_threads(args.threads)
    files = args.files if args.files is not None else [f for f in FILES if Path(f).exists()]
    boards = [BOARDS[b] for b in args.boards]
    x = images(args.images)
    test = test_split(args.test_images)
    check_x = test_split(args.check_images)[0]
    fp32 = cnnpress.load("pretrained:resnet20-fmnist").eval()
    macs = dense_macs(fp32)
    rows, calibrations = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for board in boards:
            calibrations[board.name] = calibrate(board, folder / f"null-{board.name}", args.timeout)
            print(f"{board.name}: {calibrations[board.name]}", flush=True)
        for name in ["pretrained:resnet20-fmnist", *files]:
            for prog in programs(name, folder, x, test, check_x):
                for board in boards:
                    rows.append(measure(board, prog, x, macs, args.timeout))
                    print(summary(rows[-1]), flush=True)
    result = {
        **provenance,
        "compiler": subprocess.run(
            ["arm-none-eabi-gcc", "--version"], capture_output=True, text=True, check=True
        ).stdout.splitlines()[0],
        "qemu": subprocess.run(
            ["qemu-system-arm", "--version"], capture_output=True, text=True, check=True
        ).stdout.splitlines()[0],
        "flags": FLAGS + LINK,
        "instructions": NOT_CYCLES,
        "dense_macs": macs,
        "images": args.images,
        "accuracy_images": len(test[0]),
        "check_images": args.check_images,
        "check_board": CHECK_BOARD,
        "boards": calibrations,
        "rows": rows,
    }
    write_result(args.out, result)


if __name__ == "__main__":
    main()
