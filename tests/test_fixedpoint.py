"""The fixed-point arithmetic of integer activations (cnnpress.fixedpoint) against an exact
integer reference written from gemmlowp's definitions, its rounding-error bound, and its C
twin (csrc_c/cnnpress_q.h) element for element: ``cnnp_q_mul``, ``cnnp_q_requant`` and
``cnnp_q_add`` compiled from the header, the input quantization through an exported program.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import types
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import cnnpress
from cnnpress import fixedpoint
from cnnpress.fixedpoint import (
    add_multipliers,
    choose_qparams,
    dequantize,
    multiply,
    qrange,
    quantize_input,
    quantize_multiplier,
)
from cnnpress.runtime import c_quant

CC = shutil.which("cc")
needs_cc = pytest.mark.skipif(CC is None, reason="no C compiler (cc) on this machine")
CSRC = Path(fixedpoint.__file__).parent / "runtime" / "csrc_c"
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
PROPERTY = settings(max_examples=300, deadline=None)

reals = st.one_of(
    st.floats(1e-9, 1e4, allow_nan=False, allow_infinity=False),
    st.floats(-1e4, -1e-9, allow_nan=False, allow_infinity=False),
)
int32s = st.one_of(
    st.integers(-(2**28), 2**28), st.integers(INT32_MIN, INT32_MAX), st.sampled_from([0, 1, -1])
)


# -- an exact integer reference, from gemmlowp's definitions -------------------------------------
def trunc_div(a: int, b: int) -> int:
    """a / b rounded toward zero (C's integer division; Python's // floors)."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b > 0) else -q


def ref_multiply(x: int, m: int, shift: int) -> int:
    """gemmlowp: a saturating left shift, SaturatingRoundingDoublingHighMul, then
    RoundingDivideByPOT, in Python integers."""
    left, right = max(shift, 0), max(-shift, 0)
    x = min(INT32_MAX, max(INT32_MIN, x * 2**left))
    if x == INT32_MIN and m == INT32_MIN:  # the one product SRDHM saturates
        return INT32_MAX
    ab = x * m
    nudge = 2**30 if ab >= 0 else 1 - 2**30
    high = trunc_div(ab + nudge, 2**31)
    mask = 2**right - 1
    remainder = high & mask  # the low bits of high's two's complement
    threshold = (mask >> 1) + (1 if high < 0 else 0)
    return (high >> right) + (1 if remainder > threshold else 0)


def meaning(x: int, m: int, shift: int) -> int:
    """What the two steps mean, in exact fractions: the high product rounds half up, the
    division by 2**right rounds half away from zero."""
    left, right = max(shift, 0), max(-shift, 0)
    x = min(INT32_MAX, max(INT32_MIN, x * 2**left))
    high = math.floor(Fraction(x * m, 2**31) + Fraction(1, 2))
    v = Fraction(high, 2**right)
    return int(math.floor(abs(v) + Fraction(1, 2))) * (1 if v >= 0 else -1)


def test_the_reference_rounds_as_gemmlowp_documents():
    """Known values: ties of the high product go up, ties of the shift away from zero."""
    half = 2**30  # m = 2**30 is the multiplier 1/2 at shift 0
    assert ref_multiply(1, half, 0) == 1  # 0.5 -> 1
    assert ref_multiply(-1, half, 0) == 0  # -0.5 -> 0 (half up)
    assert ref_multiply(3, half, 0) == 2  # 1.5 -> 2
    assert ref_multiply(-3, half, 0) == -1  # -1.5 -> -1
    assert ref_multiply(6, 2**31 - 1, -2) == 2  # 6 / 4 = 1.5 -> 2 (away from zero)
    assert ref_multiply(-6, 2**31 - 1, -2) == -2
    assert ref_multiply(-5, 2**31 - 1, -1) == -3  # -2.5 -> -3
    assert ref_multiply(2**30, 2**30, 4) == 2**30  # x * 16 saturates: INT32_MAX / 2, rounded


# -- quantize_multiplier ------------------------------------------------------------------------
@PROPERTY
@given(reals)
def test_quantize_multiplier_is_within_2_pow_minus_30_relative(real):
    m, shift = quantize_multiplier(real)
    assert 2**30 <= abs(m) < 2**31
    assert (m > 0) == (real > 0)
    approx = Fraction(m) * Fraction(2) ** (shift - 31)
    assert abs(approx - Fraction(real)) <= abs(Fraction(real)) * Fraction(1, 2**30)


@pytest.mark.parametrize("real", [0.0, -0.0, 2.0**-32, -(2.0**-32), 1e-12, 5e-324])
def test_quantize_multiplier_of_zero_and_tiny_values_is_zero(real):
    assert quantize_multiplier(real) == (0, 0)


def test_quantize_multiplier_rounding_up_to_a_power_of_two_moves_the_shift():
    m, shift = quantize_multiplier(1.0 - 2.0**-40)  # rounds to 2**31: normalised to 2**30
    assert (m, shift) == (2**30, 1)
    assert quantize_multiplier(0.5) == (2**30, 0)
    assert quantize_multiplier(-0.25) == (-(2**30), -1)


def test_quantize_multiplier_rejects_a_multiplier_too_large_for_a_shift():
    with pytest.raises(ValueError, match="too large"):
        quantize_multiplier(2.0**31)


# -- multiply -----------------------------------------------------------------------------------
@PROPERTY
@given(int32s, reals)
def test_multiply_equals_the_integer_reference_and_rounds_within_one(x, real):
    m, shift = quantize_multiplier(real)
    got = int(multiply(torch.tensor([x]), m, shift)[0])
    want = ref_multiply(x, m, shift)
    assert got == want
    assert want == meaning(x, m, shift)
    if abs(x) * 2 ** max(shift, 0) <= INT32_MAX:  # no saturation: one step of rounding error
        assert abs(got - round(Fraction(x) * Fraction(real))) <= 1


@PROPERTY
@given(st.lists(int32s, min_size=1, max_size=40), st.lists(reals, min_size=1, max_size=40))
def test_multiply_broadcasts_per_channel_multipliers(xs, rs):
    n = min(len(xs), len(rs))
    pairs = [quantize_multiplier(r) for r in rs[:n]]
    m = torch.tensor([p[0] for p in pairs])
    shift = torch.tensor([p[1] for p in pairs])
    got = multiply(torch.tensor(xs[:n]), m, shift).tolist()
    assert got == [ref_multiply(x, *p) for x, p in zip(xs[:n], pairs, strict=True)]


# -- choose_qparams -----------------------------------------------------------------------------
ranges = st.floats(0, 1e4, allow_nan=False).filter(lambda v: v == 0 or v >= 1e-20)


@PROPERTY
@given(ranges, ranges, st.sampled_from([4, 8]))
def test_choose_qparams_represents_zero_and_reaches_both_ends(neg, hi, bits):
    lo = -neg
    scale, zero = choose_qparams(lo, hi, bits)
    qmin, qmax = qrange(bits)
    assert qmin <= zero <= qmax
    zeros = quantize_input(torch.zeros(3), 1.0 / scale, zero, bits)
    assert zeros.tolist() == [zero] * 3
    assert float(dequantize(zeros, scale, zero)[0]) == 0.0
    if lo == hi == 0:
        assert (scale, zero) == (1.0, 0)
        return
    assert scale > 0
    # the ends of the integer range are within one step of lo and hi
    assert abs((qmin - zero) * scale - lo) <= scale * (1 + 1e-9)
    assert abs((qmax - zero) * scale - hi) <= scale * (1 + 1e-9)


def test_choose_qparams_widens_to_hold_zero_and_refuses_non_finite_ranges():
    assert choose_qparams(0.0, 0.0, 8) == (1.0, 0)
    scale, zero = choose_qparams(2.0, 5.1, 8)  # widened to [0, 5.1]: zero at the bottom
    assert (zero, scale) == (-128, pytest.approx(5.1 / 255))
    scale, zero = choose_qparams(-3.0, -1.0, 4)  # widened to [-3, 0]: zero at the top
    assert (zero, scale) == (7, pytest.approx(3.0 / 15))
    for lo, hi in [(-math.inf, 1.0), (0.0, math.nan), (-1.0, math.inf)]:
        with pytest.raises(ValueError, match="non-finite"):
            choose_qparams(lo, hi, 8)


# -- the C twin ---------------------------------------------------------------------------------
HARNESS = r"""
#include <stdio.h>
#include "cnnpress_q.h"

/* Reads operations from stdin, one a line, and prints each result:
 *   M x m shift                                   cnnp_q_mul
 *   R acc m bias packed                           cnnp_q_requant (one channel)
 *   A a za b zb m1 s1 m2 s2 mo so zo lo hi        cnnp_q_add */
int main(void)
{
    char op;
    long long v[13];
    int i, n;
    while (scanf(" %c", &op) == 1) {
        n = op == 'M' ? 3 : op == 'R' ? 4 : 13;
        for (i = 0; i < n; i++)
            if (scanf("%lld", &v[i]) != 1) return 2;
        if (op == 'M') {
            printf("%ld\n", (long)cnnp_q_mul((int32_t)v[0], (int32_t)v[1], (int32_t)v[2]));
        } else if (op == 'R') {
            int32_t rq[3];
            rq[0] = (int32_t)v[1];
            rq[1] = (int32_t)v[2];
            rq[2] = (int32_t)v[3];
            printf("%ld\n", (long)cnnp_q_requant(rq, 0, (int32_t)v[0]));
        } else {
            cnnp_q_t q = {0};
            q.zb = (int32_t)v[3];
            q.m1 = (int32_t)v[4];
            q.s1 = (int32_t)v[5];
            q.m2 = (int32_t)v[6];
            q.s2 = (int32_t)v[7];
            q.mo = (int32_t)v[8];
            q.so = (int32_t)v[9];
            q.zo = (int32_t)v[10];
            q.lo = (int32_t)v[11];
            q.hi = (int32_t)v[12];
            printf("%ld\n", (long)cnnp_q_add(&q, (int32_t)v[1], (int32_t)v[0], (int32_t)v[2]));
        }
    }
    return 0;
}
"""


@pytest.fixture(scope="module")
def harness(tmp_path_factory) -> Path:
    if CC is None:
        pytest.skip("no C compiler (cc) on this machine")
    out = tmp_path_factory.mktemp("q_harness")
    (out / "harness.c").write_text(HARNESS)
    flags = ["-std=c99", "-O2", "-Wall", "-Wextra", "-Werror", "-fsanitize=undefined"]
    cmd = [CC, *flags, "-fno-sanitize-recover=all", f"-I{CSRC}", str(out / "harness.c")]
    done = subprocess.run([*cmd, "-o", str(out / "h")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[:4000]
    return out / "h"


def run_harness(prog: Path, lines: list[str]) -> list[int]:
    done = subprocess.run(
        [str(prog)], input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr[:2000]
    return [int(v) for v in done.stdout.split()]


def mul_triples(seed: int, n: int) -> list[tuple[int, int, int]]:
    """Random (x, m, shift) with multipliers as quantize_multiplier makes them, shifts from -30
    to +10, and the edge cases: x in {0, +-1, +-(2**31 - 1), -2**31}, the extreme m."""
    rng = np.random.default_rng(seed)
    triples = []
    edges_x = [0, 1, -1, INT32_MAX, -INT32_MAX, INT32_MIN, 2**28, -(2**28)]
    edges_m = [2**30, 2**31 - 1, -(2**30), -(2**31 - 1), 0, 1, -1]
    for shift in range(-30, 11):
        for x in edges_x:
            for m in edges_m:
                triples.append((x, m, shift))
    for _ in range(n):
        real = float(np.exp(rng.uniform(math.log(2.0**-31), math.log(2.0**10))))
        m, shift = quantize_multiplier(real if rng.random() < 0.8 else -real)
        if rng.random() < 0.5:
            shift = int(rng.integers(-30, 11))
        bound = [2**8, 2**20, 2**28, 2**31][rng.integers(4)]
        x = int(rng.integers(-bound, bound))
        triples.append((x, m, shift))
    return triples


@needs_cc
def test_cnnp_q_mul_equals_multiply_element_for_element(harness):
    triples = mul_triples(0, 5000)
    got = run_harness(harness, [f"M {x} {m} {s}" for x, m, s in triples])
    x, m, s = (torch.tensor(c) for c in zip(*triples, strict=True))
    want = multiply(x, m, s).tolist()
    assert len(got) == len(want) == len(triples)
    bad = [(t, g, w) for t, g, w in zip(triples, got, want, strict=True) if g != w]
    assert not bad, f"{len(bad)} differ, e.g. (x, m, shift), C, PyTorch: {bad[:5]}"
    # and both are the reference (a sample: the Python reference is slow)
    assert all(ref_multiply(*t) == g for t, g in list(zip(triples, got, strict=True))[::7])


@needs_cc
def test_cnnp_q_requant_decodes_the_documented_packing(harness):
    """qdata holds per channel ``m``, ``B`` and ``shift + 256 * C`` (c_quant's module doc); the
    header and PyTorch's forward both give ``C + multiply(acc + B, m, shift)``."""
    rng = np.random.default_rng(1)
    rows = []
    for _ in range(2000):
        real = float(np.exp(rng.uniform(math.log(2.0**-31), math.log(2.0**8))))
        m, shift = quantize_multiplier(real if rng.random() < 0.9 else -real)
        acc = int(rng.integers(-(2**24), 2**24))
        bias = int(rng.integers(-(2**20), 2**20))
        offset = int(rng.integers(-(2**22), 2**22 + 1)) if rng.random() < 0.3 else 0
        rows.append((acc, m, bias, shift, offset))
    got = run_harness(harness, [f"R {a} {m} {b} {s + 256 * c}" for a, m, b, s, c in rows])
    want = [c + ref_multiply(a + b, m, s) for a, m, b, s, c in rows]
    assert got == want
    for a, m, b, s, c in rows[:200]:
        qdata = torch.tensor([m, b, s + 256 * c])
        assert int(c_quant._requant(torch.tensor([[a]]), qdata, 0, 1)[0, 0]) == c + ref_multiply(
            a + b, m, s
        )


def test_the_lowering_packs_what_the_requantization_decodes():
    """A channel's requantization as the lowering stores it decodes to its own multiplier,
    bias and offset (packed ``(shift & 255) + 256 * C``, a negative shift decoded ``C + 1``:
    C and PyTorch agreed, both one step off)."""
    lowering = types.SimpleNamespace(program=c_quant.IntegerProgram(8, [], {}))
    a = np.array([0.01, 0.3, 2.5, 0.02])  # shifts -6, -1, 2, -5
    b = np.array([0.05, -0.6, 1.0, 2.0**21])  # the last bias too big: an output offset C
    at = c_quant._Lowering.requant(lowering, a, b, 1.0)
    qdata = torch.tensor(lowering.program.qdata)
    acc = torch.tensor([[100, -7, 3, 50]])
    got = c_quant._requant(acc, qdata, at, 4)[0].tolist()
    want = []
    for ac, bc, x in zip(a, b, acc[0].tolist(), strict=True):
        m, shift = quantize_multiplier(ac)
        big = abs(bc) >= c_quant.BIAS_LIMIT * ac
        bias, offset = (0, c_quant._round(bc)) if big else (c_quant._round(bc / ac), 0)
        want.append(offset + ref_multiply(x + bias, m, shift))
    assert got == want


@needs_cc
def test_cnnp_q_add_equals_the_integer_forward_and_the_real_sum(harness):
    """TFLite ADD (and SUB, a negative multiplier for b) in C equals PyTorch's, and is within
    one output step of the real sum."""
    rng = np.random.default_rng(2)
    rows = []
    for _ in range(3000):
        bits = 8 if rng.random() < 0.7 else 4
        qmin, qmax = qrange(bits)
        s_a, s_b, s_out = (float(np.exp(rng.uniform(-6, 1))) for _ in range(3))
        ma, sa, mb, sb, mo, so = add_multipliers(s_a, s_b, s_out)
        sign = -1 if rng.random() < 0.3 else 1
        za, zb, zo, a, b = (int(rng.integers(qmin, qmax + 1)) for _ in range(5))
        lo = zo if rng.random() < 0.3 else qmin  # ReLU or none
        rows.append((a, za, b, zb, ma, sa, sign * mb, sb, mo, so, zo, lo, qmax, s_a, s_b, s_out))
    got = run_harness(harness, ["A " + " ".join(str(v) for v in r[:13]) for r in rows])
    cols = list(zip(*rows, strict=True))
    keys = ("m1", "s1", "m2", "s2", "mo", "so", "zo", "lo", "hi")  # columns 4 to 12
    q = {k: torch.tensor(cols[i]) for i, k in enumerate(keys, start=4)}
    q.update(zi=torch.tensor(cols[1]), zb=torch.tensor(cols[3]))
    want = c_quant._add(torch.tensor(cols[0]), torch.tensor(cols[2]), q).tolist()
    assert got == want
    for (a, za, b, zb, _, _, m2, _, _, _, zo, lo, hi, s_a, s_b, s_out), g in zip(
        rows, got, strict=True
    ):
        real = (s_a * (a - za) + (1 if m2 > 0 else -1) * s_b * (b - zb)) / s_out
        assert abs(g - min(hi, max(lo, zo + round(real)))) <= 1


@needs_cc
def test_the_c_program_quantizes_its_input_as_quantize_input(tmp_path):
    """A model that only flattens: its logits are its quantized input, dequantized. Inputs at
    the rounding ties (in float32) and just beside them, and beyond the range."""
    from test_c_export import build, run

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten()).eval()
    q = cnnpress.quantize(model, torch.randn(64, 1, 28, 28), bits=8, observer="minmax")
    prog, _ = build(q, tmp_path / "c")
    scale, zero = q.cnnpress_activations["tensors"]["input_1"]
    inv = torch.tensor(1.0 / scale, dtype=torch.float32)
    k = torch.arange(-140, 140, dtype=torch.float32) + 0.5 - zero
    near = (k / inv).to(torch.float32)
    up, down = torch.tensor(math.inf), torch.tensor(-math.inf)
    x = torch.cat(
        [
            near,
            torch.nextafter(near, up),
            torch.nextafter(near, down),
            torch.nextafter(torch.nextafter(near, up), up),
            torch.tensor([0.0, -0.0, 1e30, -1e30, 1e-30, 2 * scale]),
        ]
    )
    v = x * inv
    assert int((v - v.floor() == 0.5).sum()) > 50  # exact ties in float32, as C computes
    x = torch.cat([x, torch.randn(784 * 2 - len(x))]).reshape(2, 1, 28, 28)
    want = dequantize(quantize_input(x.reshape(2, -1), 1.0 / scale, zero, 8), scale, zero)
    got = run(prog, x)
    assert np.array_equal(got, want.numpy())
    with torch.no_grad():
        assert np.array_equal(got, q(x).numpy())
    assert len(np.unique(got)) == 256  # every integer comes through, the clamps included
