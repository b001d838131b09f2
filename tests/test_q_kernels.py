"""The int8 (and 4-bit) C kernels of a quantized model (csrc_c/q_*.c) under AddressSanitizer
and UBSan: the logits equal PyTorch's integer forward bit for bit and no kernel reads or
writes past the arena and scratch the export sizes; and SLBF's integer kernel has no
multiplication in its inner loops, on the host and on a Cortex-M3, checked in the
disassembly.

The plain bit-exact check over every registry case is tests/test_quantize.py's.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import cnnpress
from cnnpress.runtime import c_export
from test_c_export import CASES, SHAPE, build, needs_cc, registry_model, run

CSRC = Path(c_export.__file__).parent / "csrc_c"
SANITIZE = ("-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-g")


def case(name: str, method: str | None, **settings) -> tuple:
    """The entry of test_c_export.CASES with these settings (so the two stay one list)."""
    found = [c for c in CASES if not hasattr(c, "marks") and c == (name, method, settings)]
    assert found, f"no case {(name, method, settings)} in test_c_export.CASES"
    return found[0]


#: A representative subset of CASES (ASan builds are slow): plain convs and residual ADDs,
#: every SLBF kernel variant (linear layers, Huffman-coded selections), Huffman-coded and
#: sparse weights, pooling and linear layers, depthwise convs, shuffles and concatenations.
SANITIZED = [
    case("resnet20", None),
    case("resnet20", "slbf", slice_channels=4, num_filters=8, include_linear=True),
    case("resnet20", "slbf", slice_channels=2, num_filters=16, entropy=True, skew=True),
    case("resnet20", "kmeans", bits=4, sparsity=0.6, entropy=True),
    case("resnet20", "magnitude_prune", sparsity=0.9, entropy=True),
    case("lenet5", "slbf", slice_channels=3, num_filters=4),
    case("lenet5", "kmeans", bits=2, include_linear=True, fold_batchnorm=True),
    case("mobilenetv2", None),
    case("shufflenetv2", "magnitude_prune", sparsity=0.7),
]
FOUR_BIT = [
    case("resnet20", "slbf", slice_channels=4, num_filters=8, include_linear=True),
    case("lenet5", None, float_bits=8),
]


def sanitized_logits_equal(tmp_path: Path, name, method, settings, bits: int) -> None:
    model, _ = registry_model(name, method, dict(settings))
    torch.manual_seed(1)
    q = cnnpress.quantize(model, torch.randn(64, *SHAPE), bits=bits)
    prog, _ = build(q, tmp_path / "c", flags=SANITIZE)
    x = torch.randn(8, *SHAPE)
    with torch.no_grad():
        ref = q.eval()(x).numpy()
    got = run(prog, x)  # a sanitizer's finding aborts the program: run's check fails
    assert got.shape == ref.shape
    assert np.array_equal(got, ref), f"max difference {np.abs(got - ref).max()}"
    assert len(np.unique(got)) > 1  # logits that depend on the input


@needs_cc
@pytest.mark.slow
@pytest.mark.parametrize(("name", "method", "settings"), SANITIZED)
def test_int8_kernels_are_bit_exact_inside_arena_and_scratch(tmp_path, name, method, settings):
    sanitized_logits_equal(tmp_path, name, method, settings, bits=8)


@needs_cc
@pytest.mark.slow
@pytest.mark.parametrize(("name", "method", "settings"), FOUR_BIT)
def test_4_bit_kernels_are_bit_exact_inside_arena_and_scratch(tmp_path, name, method, settings):
    sanitized_logits_equal(tmp_path, name, method, settings, bits=4)


# -- no multiplication in SLBF's inner loops ----------------------------------------------------
#: The functions of q_slbf.c whose loops run per tap, bank filter and position.
INNER = ("cnnp_q_patches", "cnnp_q_bank", "cnnp_q_responses", "cnnp_q_gather")
#: Multiply instructions by mnemonic: x86 (imul, mul, mulx, pmul*, vpmul*, mulss..., pmadd*,
#: vfmadd*) and ARM (mul, muls, mla, mls, smull, umull, smlal, umlal, smul*, smla*, smmul*,
#: umaal; with a condition or a .w/.n width suffix).
X86_MUL = re.compile(r"mul|madd")
ARM_MUL = re.compile(r"^(mul|mla|mls|[su]mull|[su]mlal|smul|smla|smml|smmul|smmla|umaal)")
TOOLCHAINS = {
    "x86-64": ("cc", (), "objdump", X86_MUL),
    "cortex-m3": (
        "arm-none-eabi-gcc",
        ("-mcpu=cortex-m3", "-mthumb"),
        "arm-none-eabi-objdump",
        ARM_MUL,
    ),
}


def multiplies(source: Path, target: str, out: Path) -> dict[str, list[str]]:
    """Each function of ``source`` compiled for ``target`` (-O2, nothing inlined), with the
    multiply instructions its disassembly holds (GCC's clones, ``f.isra.0``, count as ``f``)."""
    cc, flags, objdump, pattern = TOOLCHAINS[target]
    if shutil.which(cc) is None or shutil.which(objdump) is None:
        pytest.skip(f"no {cc} or {objdump} on this machine")
    obj = out / f"{source.stem}-{target}.o"
    cmd = [cc, "-std=c99", "-O2", "-fno-inline", *flags, f"-I{CSRC}", "-c", str(source)]
    done = subprocess.run([*cmd, "-o", str(obj)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[:4000]
    listing = subprocess.run(
        [objdump, "-d", "--no-show-raw-insn", str(obj)], capture_output=True, text=True, check=True
    ).stdout
    found: dict[str, list[str]] = {}
    current = None
    for line in listing.splitlines():
        head = re.match(r"^[0-9a-f]+ <([^>]+)>:$", line)
        if head:
            current = head.group(1).split(".")[0]
            found.setdefault(current, [])
            continue
        parts = line.split("\t")
        if current is None or len(parts) < 2 or not re.match(r"^\s*[0-9a-f]+:$", parts[0]):
            continue
        mnemonic = parts[1].split()[0] if parts[1].split() else ""
        if pattern.search(mnemonic):
            found[current].append(line.strip())
    return found


PLANTED = r"""
/* Named as the kernel's functions, so the check reads them as it reads the kernel. */
int cnnp_q_bank(const int *a, int n, int k)
{
    int s = 0, i;
    for (i = 0; i < n; i++) s += a[i] * k; /* a multiplication in an inner loop */
    return s;
}

int cnnp_q_gather(const int *a, const unsigned char *sel, int n, int k)
{
    int s = 0, i;
    for (i = 0; i < n; i++) s += a[sel[i] * k]; /* an index multiplication (not a running one) */
    return s;
}

int cnnp_q_responses(const int *a, int n, int k)
{
    int s = 0, i;
    for (i = 0; i < n; i += k) s += a[i]; /* additions only */
    return s;
}
"""


@pytest.mark.parametrize("target", TOOLCHAINS)
def test_the_check_finds_a_planted_multiplication(tmp_path, target):
    source = tmp_path / "planted.c"
    source.write_text(PLANTED)
    found = multiplies(source, target, tmp_path)
    assert found["cnnp_q_bank"], found
    assert found["cnnp_q_gather"], found
    assert found["cnnp_q_responses"] == []


@pytest.mark.parametrize("target", TOOLCHAINS)
def test_slbf_int8_inner_loops_have_no_multiplication(tmp_path, target):
    """The bank responses of int8 inputs are additions and subtractions (DESIGN, Integer
    inference), their index arithmetic included; the requantization's multiply is elsewhere."""
    found = multiplies(CSRC / "q_slbf.c", target, tmp_path)
    missing = [f for f in INNER if f not in found]
    assert not missing, f"{missing} not in the object file (inlined or renamed?)"
    assert {f: found[f] for f in INNER if found[f]} == {}
    assert found["cnnp_q_mul"], "the requantization multiplies: the check sees multiplies"


@needs_cc
@pytest.mark.parametrize("bits", [None, 8])
def test_the_profiling_hook_runs_after_every_operation_in_order(tmp_path, bits):
    """A build that defines CNNP_AFTER_OP(i) (a board's per-layer instruction counter) sees
    every operation of cnnp_predict once, in order, and the logits do not change."""
    model, _ = registry_model("resnet20", "slbf", {"slice_channels": 4, "num_filters": 8})
    if bits:
        model = cnnpress.quantize(model, torch.randn(16, *SHAPE), bits=bits)
    x = torch.randn(1, *SHAPE)
    plain, info = build(model, tmp_path / "plain")
    hooked = tmp_path / "hooked"
    hooked.mkdir()
    (hooked / "hook.h").write_text("void cnnp_after(int i);\n")
    (hooked / "hook.c").write_text(
        '#include <stdio.h>\nvoid cnnp_after(int i) { fprintf(stderr, "%d\\n", i); }\n'
    )
    flags = ("-DCNNP_AFTER_OP(i)=cnnp_after(i)", "-include", str(hooked / "hook.h"))
    prog, _ = build(model, hooked, flags=flags)
    done = subprocess.run(
        [str(prog)], input=x.numpy().astype("<f4").tobytes(), capture_output=True, check=True
    )
    assert done.stderr.decode().split() == [str(i) for i in range(info["ops"])]
    assert np.array_equal(np.frombuffer(done.stdout, dtype="<f4"), run(plain, x)[0])
