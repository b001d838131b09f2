"""Microcontroller boards with their real memory maps, and what a model's C program needs on
one: flash (the model's constants plus the runtime's code) and RAM (the arena plus the stack,
the input and logits buffers and the runtime's statics).

The boards (``benchmarks/boards/`` has one linker script per part, which enforces these maps,
and the QEMU machine that emulates it):

- ``lm3s6965evb``: TI Stellaris LM3S6965, Cortex-M3, 256 KiB flash, 64 KiB SRAM;
- ``microbit``: BBC micro:bit v1, Nordic nRF51822, Cortex-M0, 256 KiB flash, 16 KiB RAM;
- ``netduinoplus2``: Netduino Plus 2, ST STM32F405RG, Cortex-M4F, 1 MiB flash, 128 KiB SRAM
  (its 64 KiB core-coupled RAM unused).

:data:`CODE_BYTES` is the flash the runtime's code takes beside the model's constants, per
core and activation type: ``.text`` of the linked program minus :func:`c_memory`'s
``flash_bytes``, measured by ``benchmarks/boards.py`` (``arm-none-eabi-gcc -O2 -mthumb``,
``--gc-sections``, newlib-nano, with the benchmark's start-up, semihosting I/O and counter:
what a minimal application adds): the most measured over ResNet-20, LeNet-5, MobileNetV2
and ShuffleNetV2, each dense, SLBF and k-means (the code varies by about 2 KiB with the
kernels a model links), plus about 500 bytes. ``tests/test_boards.py`` checks that it
bounds the linked programs where the toolchain is present. It is an upper bound of an estimate; the
linker's map is the truth, and ``benchmarks/boards.py`` links.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from cnnpress.errors import CnnpressError
from cnnpress.runtime.c_export import c_memory

__all__ = [
    "BOARDS",
    "CODE_BYTES",
    "STACK_BYTES",
    "STATIC_BYTES",
    "Board",
    "board",
    "board_fit",
    "fit_budget",
    "program_memory",
]

KIB = 1024
#: The stack the linker scripts reserve after ``.bss``; the deepest use measured on the
#: emulated boards stays below it.
STACK_BYTES = 2 * KIB
#: The runtime's and the application's own ``.data`` + ``.bss`` (counters, semihosting
#: blocks; measured: 112 bytes), bounded.
STATIC_BYTES = 256
#: Flash of the runtime's code per core and activation type (module docstring), bytes.
CODE_BYTES = {
    "cortex-m0": {"float32": 16_900, "int8": 14_700},
    "cortex-m3": {"float32": 12_900, "int8": 12_000},
    "cortex-m4": {"float32": 13_100, "int8": 12_200},  # soft float
    "cortex-m4f": {"float32": 11_400, "int8": 10_700},  # its FPU (fpv4-sp-d16, hard float)
}


@dataclass(frozen=True)
class Board:
    """A part: its flash and RAM, its core and the QEMU machine that emulates it."""

    name: str
    part: str
    core: str
    flash_bytes: int
    ram_bytes: int
    machine: str


BOARDS = {
    b.name: b
    for b in (
        Board("lm3s6965evb", "TI Stellaris LM3S6965", "cortex-m3", 256 * KIB, 64 * KIB,
              "lm3s6965evb"),
        Board("microbit", "BBC micro:bit v1 (Nordic nRF51822)", "cortex-m0", 256 * KIB,
              16 * KIB, "microbit"),
        Board("netduinoplus2", "Netduino Plus 2 (ST STM32F405RG)", "cortex-m4f", 1024 * KIB,
              128 * KIB, "netduinoplus2"),
    )
}  # fmt: skip


def board(name: str) -> Board:
    """The board called ``name``; a :class:`CnnpressError` naming the known ones otherwise."""
    if name not in BOARDS:
        raise CnnpressError(f"unknown board {name!r}; known boards: {', '.join(BOARDS)}")
    return BOARDS[name]


def program_memory(
    model: nn.Module, input_shape: tuple[int, int, int] | None = None, core: str = "cortex-m3"
) -> dict[str, Any]:
    """What ``model``'s C program needs on a ``core``: ``flash_bytes`` (the model's constants,
    :func:`c_memory`, plus :data:`CODE_BYTES`) and ``ram_bytes`` (the arena, plus the float32
    input and logits buffers of the application, :data:`STACK_BYTES` and
    :data:`STATIC_BYTES`), with the parts they add up from."""
    if core not in CODE_BYTES:
        raise CnnpressError(f"unknown core {core!r}; known cores: {', '.join(CODE_BYTES)}")
    mem = c_memory(model, input_shape)
    kind = "float32" if mem["activations"] == "float32" else "int8"
    code = CODE_BYTES[core][kind]
    buffers = 4 * (mem["input_floats"] + mem["logits"])
    return {
        "core": core,
        "activations": mem["activations"],
        "model_flash_bytes": mem["flash_bytes"],
        "code_bytes": code,
        "flash_bytes": mem["flash_bytes"] + code,
        "arena_bytes": mem["arena_bytes"],
        "io_bytes": buffers,
        "stack_bytes": STACK_BYTES,
        "static_bytes": STATIC_BYTES,
        "ram_bytes": mem["arena_bytes"] + buffers + STACK_BYTES + STATIC_BYTES,
    }


def fit_budget(
    memory: dict[str, Any], flash_bytes: int | None, ram_bytes: int | None
) -> dict[str, Any]:
    """Whether a :func:`program_memory` fits ``flash_bytes`` and ``ram_bytes`` (``None``: no
    limit), and the bytes left in each (negative: over by that many; ``None``: no limit)."""
    flash_left = None if flash_bytes is None else flash_bytes - memory["flash_bytes"]
    ram_left = None if ram_bytes is None else ram_bytes - memory["ram_bytes"]
    return {
        "fits": all(left is None or left >= 0 for left in (flash_left, ram_left)),
        "flash_left_bytes": flash_left,
        "ram_left_bytes": ram_left,
    }


def board_fit(
    model: nn.Module, name: str, input_shape: tuple[int, int, int] | None = None
) -> dict[str, Any]:
    """:func:`program_memory` of ``model`` on the board ``name``, with :func:`fit_budget`
    against its flash and RAM."""
    b = board(name)
    memory = program_memory(model, input_shape, b.core)
    return {
        "board": b.name,
        "part": b.part,
        "board_flash_bytes": b.flash_bytes,
        "board_ram_bytes": b.ram_bytes,
        **memory,
        **fit_budget(memory, b.flash_bytes, b.ram_bytes),
    }
