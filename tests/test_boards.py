"""``benchmarks/boards.py`` on its emulated boards: a small int8 program linked to the real
memory maps of a Cortex-M3 and a Cortex-M0 part runs bit-equal to the host build; a program
that exceeds the micro:bit's RAM (with its stack, or without) fails to link and the overflow
is reported in bytes; the instruction counts repeat exactly, the per-operation counts add up
to the total, and the same program counts about the same instructions on the Cortex-M4, whose
clock gives 13 times fewer instructions per SysTick tick; on the mps2-an385 (not a real part:
a Cortex-M3 with 4 MiB of code memory, for programs too large for one) the same program runs
bit-equal and counts the instructions the lm3s6965evb counts."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

import cnnpress
from cnnpress.runtime.boards import BOARDS, CODE_BYTES, program_memory
from helpers import load_benchmark

boards = load_benchmark("boards")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not all(shutil.which(t) for t in (*boards.TOOLS, "cc")),
        reason="no gcc-arm-none-eabi / qemu-system-arm / cc (benchmarks/boards.py installs "
        "the first two)",
    ),
]
M3, M0, M4, BIG = (
    boards.BOARDS[b] for b in ("lm3s6965evb", "microbit", "netduinoplus2", "mps2-an385")
)


@pytest.fixture(scope="module")
def tiny_model():
    """A ResNet-20 of width 4 with int8 activations (a 9 KB arena: it fits the micro:bit)."""
    torch.manual_seed(0)
    model = cnnpress.models.create("resnet20", 1, 10, width=4).eval()
    return cnnpress.quantize(model, torch.randn(64, *boards.SHAPE), bits=8)


@pytest.fixture(scope="module")
def tiny(tiny_model, tmp_path_factory):
    """The int8 program of :func:`tiny_model` and two random images."""
    x = torch.randn(2, *boards.SHAPE).numpy()
    return boards.program("tiny", tiny_model, tmp_path_factory.mktemp("tiny"), x), x


def run(board, prog, x, ops=0):
    built = boards.build(prog.folder, board, prog.sources, ops=ops)
    assert built.fits, built.overflow
    return boards.run_qemu(board, built.elf, x, prog.host.shape[1], timeout=120)


@pytest.mark.parametrize("board", [M3, M0], ids=lambda b: b.name)
def test_a_small_int8_program_fits_and_runs_bit_equal_to_the_host(tiny, board):
    prog, x = tiny
    built = boards.build(prog.folder, board, prog.sources)
    assert built.fits and built.overflow == {}
    assert built.sizes["flash_bytes"] <= board.flash_bytes
    assert built.sizes["ram_linked_bytes"] <= board.ram_bytes
    assert built.sizes["bss_bytes"] >= prog.memory["arena_bytes"]
    got = boards.run_qemu(board, built.elf, x, 10, timeout=120)
    assert np.array_equal(got.logits, prog.host)
    assert 0 < got.stack_bytes < got.stack_reserved_bytes == built.sizes["stack_reserved_bytes"]


STATIC = """#include <stdint.h>
#include "model.h"
static volatile uint8_t big[%d];
int cnnp_predict(const float *input, float *logits)
{
    big[0] = (uint8_t)input[0];
    logits[0] = big[sizeof big - 1];
    return 0;
}
"""


@pytest.mark.parametrize("array", [20000, 15000], ids=["over-the-RAM", "over-with-the-stack"])
def test_a_program_over_the_ram_does_not_link_and_the_overflow_is_counted(tmp_path, array):
    shutil.copyfile(boards.HARNESS / "null" / "model.h", tmp_path / "model.h")
    (tmp_path / "model.c").write_text(STATIC % array)
    built = boards.build(tmp_path, M0, ["model.c"])
    assert not built.fits and not (tmp_path / "microbit.elf").exists()
    assert set(built.overflow) == {"RAM"}
    assert built.overflow["RAM"] == built.sizes["ram_linked_bytes"] - M0.ram_bytes > 0
    assert built.sizes["bss_bytes"] >= array
    if array < M0.ram_bytes:  # the array alone fits: the stack reservation does not
        assert built.overflow["RAM"] <= built.sizes["stack_reserved_bytes"]
    ld = "ld: region `FLASH' overflowed by 12 bytes\nld: region `RAM' overflowed by 3 bytes"
    assert boards.overflows(ld) == {"FLASH": 12, "RAM": 3}


def test_instruction_counts_repeat_add_up_and_agree_across_clocks(tiny):
    prog, x = tiny
    first, second = run(M3, prog, x), run(M3, prog, x)
    assert first.raw == second.raw  # every tick of every image and of the calibration
    profiled = run(M3, prog, x, ops=len(prog.modules))
    assert np.array_equal(profiled.logits, first.logits)
    tick = first.per_tick
    assert profiled.op_instructions.shape == (len(x), len(prog.modules))
    summed = profiled.op_instructions.sum(axis=1)
    assert np.allclose(summed, first.instructions, rtol=0, atol=4 * tick)
    assert 10 < profiled.hook < 60  # instructions of one CNNP_AFTER_OP, measured
    m4 = run(M4, prog, x)
    assert m4.per_tick < tick / 5  # 168 MHz against 12.5 MHz: another tick altogether
    assert m4.instructions.mean() == pytest.approx(first.instructions.mean(), rel=0.02)
    assert np.array_equal(m4.logits, first.logits)


def test_the_synthetic_cortex_m3_runs_the_program_bit_equal_and_counts_as_the_real_one(tiny):
    prog, x = tiny
    assert not BIG.real_part and all(b.real_part for b in boards.BOARDS.values() if b != BIG)
    assert BIG.cpu == M3.cpu and BIG.flash_bytes == BIG.ram_bytes == 4 * 1024 * 1024
    big, m3 = run(BIG, prog, x), run(M3, prog, x)
    assert np.array_equal(big.logits, prog.host)
    assert big.per_tick == pytest.approx(40, rel=1e-3)  # 25 MHz against the M3's 12.5 MHz
    assert big.instructions.mean() == pytest.approx(m3.instructions.mean(), rel=0.02)
    # the same code at the same addresses: equal to the reading of the coarser tick
    assert np.allclose(big.instructions, m3.instructions, rtol=0, atol=2 * m3.per_tick)


def test_the_library_knows_each_real_board_of_the_benchmark_with_its_memory_and_core():
    for b in boards.BOARDS.values():
        assert b.core in CODE_BYTES, b.name
        if b.real_part and b.name in BOARDS:
            part = BOARDS[b.name]
            assert (part.flash_bytes, part.ram_bytes, part.machine) == (
                b.flash_bytes,
                b.ram_bytes,
                b.machine,
            )
    assert BOARDS["netduinoplus2"].core == boards.BOARDS["netduinoplus2-fpu"].core


@pytest.mark.parametrize("name", ["lm3s6965evb", "microbit", "netduinoplus2-fpu"])
def test_the_estimated_flash_and_ram_bound_the_linked_program(tiny_model, tiny, name):
    prog, _ = tiny
    board = boards.BOARDS[name]
    built = boards.build(prog.folder, board, prog.sources)
    estimate = program_memory(tiny_model, boards.SHAPE, board.core)
    assert built.sizes["flash_bytes"] <= estimate["flash_bytes"]
    assert built.sizes["flash_bytes"] > estimate["flash_bytes"] - 2500  # and not far above
    assert built.sizes["ram_linked_bytes"] <= estimate["ram_bytes"]
    assert built.sizes["ram_linked_bytes"] > estimate["ram_bytes"] - 300


BUDGET_LD = """MEMORY
{
    FLASH (rx) : ORIGIN = 0x00000000, LENGTH = %d
    RAM (rwx)  : ORIGIN = 0x20000000, LENGTH = %d
}
STACK_SIZE = 2K;
INCLUDE sections.ld
"""


def test_a_model_planned_for_a_flash_and_ram_budget_links_within_both(tmp_path):
    torch.manual_seed(0)
    net = cnnpress.models.create("resnet20", 1, 10, width=8).eval()
    flash, ram = 24_000, 24_000  # int8 activations: the float maps alone need 57 KB
    small = cnnpress.compress(
        net,
        "slbf",
        target_flash=flash,
        target_ram=ram,
        input_shape=boards.SHAPE,
        core="cortex-m3",
        float_bits=8,
        fold_batchnorm=True,
        entropy=True,
    )
    assert small.cnnpress_device["activation_bits"] == 8
    q = cnnpress.quantize(small, torch.randn(64, *boards.SHAPE), bits=8)
    x = torch.randn(2, *boards.SHAPE).numpy()
    prog = boards.program("planned", q, tmp_path, x)
    (tmp_path / "budget.ld").write_text(BUDGET_LD % (flash, ram))
    part = boards.Board("budget", "budget", "the budget", M3.cpu, flash, ram, "cortex-m3")
    built = boards.build(tmp_path, part, prog.sources)
    assert built.fits, built.overflow
    tighter = boards.Board("tight", "tight", "a smaller budget", M3.cpu, flash, ram, "cortex-m3")
    (tmp_path / "tight.ld").write_text(BUDGET_LD % (built.sizes["flash_bytes"] - 64, ram))
    assert not boards.build(tmp_path, tighter, prog.sources).fits  # the linker does enforce it
