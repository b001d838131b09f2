"""A flash and RAM budget of the C program: the planner picks the activations and the largest
SLBF file whose program fits, refuses in one line with the smallest programs, and ``summary
--board`` says whether a file fits a named board and by how many bytes. (That the estimates
bound the linked programs is checked in ``tests/test_boards.py`` where the toolchain is.)"""

from __future__ import annotations

import json

import pytest
import torch

import cnnpress
from cnnpress.cli.main import main
from cnnpress.errors import ConfigError
from cnnpress.runtime import c_memory
from cnnpress.runtime.boards import (
    BOARDS,
    CODE_BYTES,
    STACK_BYTES,
    board_fit,
    fit_budget,
    program_memory,
)

SHAPE = (1, 28, 28)
SLBF = {"float_bits": 8, "fold_batchnorm": True, "entropy": True}


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return cnnpress.models.create("resnet20", 1, 10, width=8).eval()


def test_the_program_needs_the_model_the_code_the_stack_and_the_buffers(net):
    mem, c = program_memory(net, SHAPE, "cortex-m0"), c_memory(net, SHAPE)
    assert mem["flash_bytes"] == c["flash_bytes"] + CODE_BYTES["cortex-m0"]["float32"]
    assert mem["ram_bytes"] >= c["arena_bytes"] + STACK_BYTES + 4 * (28 * 28 + 10)
    q = cnnpress.quantize(net, torch.randn(16, *SHAPE), bits=8)
    qmem = program_memory(q, SHAPE, "cortex-m0")
    assert qmem["activations"] == "int8" and qmem["arena_bytes"] < mem["arena_bytes"] / 3
    assert qmem["code_bytes"] == CODE_BYTES["cortex-m0"]["int8"]
    fit = board_fit(q, "microbit", SHAPE)
    assert fit["board_ram_bytes"] == BOARDS["microbit"].ram_bytes == 16 * 1024
    assert fit["ram_left_bytes"] == 16 * 1024 - qmem["ram_bytes"]
    assert fit["fits"] == (fit["ram_left_bytes"] >= 0 and fit["flash_left_bytes"] >= 0)


def test_a_flash_budget_buys_the_largest_file_that_fits_and_the_ram_picks_the_activations(
    net, tmp_path
):
    float_ram = program_memory(net, SHAPE)["ram_bytes"]
    plans = {}
    for flash in (18_000, 20_000):  # this net's largest SLBF program needs about 21,400
        small = cnnpress.compress(
            net, "slbf", target_flash=flash, target_ram=float_ram, input_shape=SHAPE, **SLBF
        )
        plan = small.cnnpress_device
        assert plan["activation_bits"] is None  # float32 fits that RAM
        assert program_memory(small, SHAPE) == {k: plan[k] for k in program_memory(small, SHAPE)}
        assert plan["flash_bytes"] <= flash and plan["ram_bytes"] <= float_ram
        assert plan["flash_bytes"] > flash - 500  # the budget is spent, not left over
        plans[flash] = small
    sizes = {f: cnnpress.save(m, tmp_path / f"{f}.cnnp") for f, m in plans.items()}
    assert sizes[20_000] > sizes[18_000] + 1500
    # Below every float program's RAM (about 57 KB: two 8 x 28 x 28 float maps and more),
    # only int8 activations fit.
    small = cnnpress.compress(
        net, "slbf", target_flash=24_000, target_ram=40_000, input_shape=SHAPE, **SLBF
    )
    plan = small.cnnpress_device
    assert plan["activation_bits"] == 8 and plan["activations"] == "int8"
    assert plan["ram_bytes"] < float_ram / 2 and plan["flash_bytes"] <= 24_000


def test_a_budget_that_cannot_be_met_names_the_smallest_programs_in_one_line(net):
    with pytest.raises(ConfigError) as err:
        cnnpress.compress(net, "slbf", target_flash="64KB", target_ram="4KB", input_shape=SHAPE)
    text = str(err.value)
    assert "\n" not in text and "4,000 bytes of RAM" in text
    assert "float32: " in text and "int8: " in text  # the smallest program of each width
    with pytest.raises(ConfigError, match="needs input_shape"):
        cnnpress.compress(net, "slbf", target_flash="64KB")


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_summary_board_says_whether_the_file_fits_and_by_how_much(capsys):
    code, out, _ = run(capsys, "summary", "pretrained:resnet20-fmnist", "--board", "microbit")
    assert code == 0
    line = next(x for x in out.splitlines() if x.startswith("microbit "))
    assert "does NOT fit" in line and "over by" in line
    code, out, _ = run(
        capsys, "summary", "pretrained:resnet20-fmnist", "--board", "netduinoplus2", "--json"
    )
    fit = json.loads(out)["board"]
    assert code == 0 and fit["board"] == "netduinoplus2" and fit["core"] == "cortex-m4f"
    # 1.08 MB of float weights: over the 1 MiB of flash, under the 128 KiB of RAM
    assert fit["flash_left_bytes"] < 0 < fit["ram_left_bytes"] and fit["fits"] is False
    code, _, err = run(capsys, "summary", "pretrained:resnet20-fmnist", "--board", "nano")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "invalid choice" in err


def test_compress_refuses_a_bad_device_budget_in_one_line(tmp_path, capsys):
    argv = ["compress", "--method", "slbf", "--model", "lenet5", "--data", "synthetic"]
    argv += ["--out", str(tmp_path / "r")]
    code, _, err = run(capsys, *argv, "--flash", "lots")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "'lots'" in err
    recipe = tmp_path / "r.yaml"
    recipe.write_text("device: {flash: 64KB, watts: 3}\n")
    code, _, err = run(capsys, *argv, "--recipe", str(recipe))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "watts" in err


def test_compress_with_flash_and_ram_trains_the_planned_program_and_records_its_fit(
    tmp_path, capsys
):
    out = tmp_path / "run"
    argv = ["compress", "--method", "slbf", "--model", "resnet20", "--data", "synthetic"]
    argv += ["--epochs", "1", "--threads", "1", "--out", str(out), "--json"]
    code, text, _ = run(capsys, *argv, "--flash", "40KB", "--ram", "20KB", "--int8")
    assert code == 0, text
    result = json.loads(text)
    plan = result["budget"]["device"]["plan"]
    assert plan["activation_bits"] == 8 and result["activations"]["bits"] == 8
    program = result["device_program"]
    assert program["fits"] and program["flash_bytes"] <= 40_000 and program["ram_bytes"] <= 20_000
    # the record is the saved file's program: the int8 program that was planned
    saved = cnnpress.load(out / "model.cnnp")
    assert saved.cnnpress_activations["bits"] == 8
    assert program_memory(saved, (1, 16, 16)) == {k: program[k] for k in program_memory(saved)}
    code, _, err = run(capsys, "compress", "--out", str(out), "--resume", "--threads", "1")
    assert code == 0 and "resuming" in err


def test_a_budget_without_a_ram_limit_leaves_it_out_as_none():
    memory = {"flash_bytes": 1000, "ram_bytes": 10**9}
    fit = fit_budget(memory, 1500, None)
    assert fit == {"fits": True, "flash_left_bytes": 500, "ram_left_bytes": None}
    assert fit_budget(memory, 900, None)["fits"] is False
    json.dumps(fit, allow_nan=False)  # result.json stays JSON
