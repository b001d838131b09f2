"""The C runtime's interface, described once: the numbers the Python side writes into the
operation descriptors of ``model.c`` and the sizes of those descriptors.

The C side is the headers in ``csrc_c/`` (:data:`HEADERS`); ``tests/test_c_interface.py``
compiles a program against them that prints every constant below and ``sizeof`` of every
struct, and fails when the two disagree or when a header has a ``CNNP_*`` enum constant that
is not described here. Adding a kernel is one C file plus its rows here: an enum as
``{C constant: value}`` under :data:`ENUMS`, a descriptor as ``kind: (C type, bytes)`` under
:data:`STRUCTS`.
"""

from __future__ import annotations

__all__ = [
    "ACT",
    "BASE",
    "BN",
    "DEFINES",
    "ENUMS",
    "HEADERS",
    "OP",
    "POOL",
    "QMODE",
    "STRUCTS",
    "WEIGHT",
    "names",
]

#: The public headers this module describes (in ``cnnpress/runtime/csrc_c``).
HEADERS: tuple[str, ...] = ("cnnpress_rt.h", "cnnpress_q.h")

#: Each C enum: its name here -> {C constant: value}.
ENUMS: dict[str, dict[str, int]] = {
    # where a tensor is (cnnp_ref's base)
    "base": {"CNNP_ARENA": 0, "CNNP_INPUT": 1, "CNNP_LOGITS": 2},
    # how a conv's weights are stored (cnnp_conv_t.kind)
    "weight": {
        "CNNP_W_DENSE": 0,
        "CNNP_W_BINARY": 1,
        "CNNP_W_SPARSE": 2,
        "CNNP_W_KMEANS": 3,
        "CNNP_W_SLBF": 4,
    },
    # the batch norm of an epilogue (cnnp_epi.bn_kind)
    "bn": {"CNNP_BN_NONE": 0, "CNNP_BN_FOLDED": 1, "CNNP_BN_FULL": 2},
    # the activation of an epilogue (cnnp_epi.act)
    "act": {"CNNP_ACT_NONE": 0, "CNNP_ACT_RELU": 1, "CNNP_ACT_CLAMP": 2},
    # an elementwise operation (cnnp_binary_t.op, cnnp_ewise_t.op)
    "op": {"CNNP_ADD": 0, "CNNP_SUB": 1, "CNNP_MUL": 2},
    # a pooling (cnnp_pool_t.kind)
    "pool": {
        "CNNP_MAXPOOL": 0,
        "CNNP_AVGPOOL": 1,
        "CNNP_ADAPTIVE_AVG": 2,
        "CNNP_ADAPTIVE_MAX": 3,
    },
    # what an integer program's copy does (cnnp_q_t.mode, cnnpress_q.h)
    "qmode": {"CNNP_Q_COPY": 0, "CNNP_Q_QUANTIZE": 1, "CNNP_Q_DEQUANTIZE": 2},
}

#: Each operation descriptor: its kind (``Op.kind``) -> (C struct type, sizeof). The order is
#: that of the descriptor arrays in ``model.c``. Only 16- and 32-bit fields, so the sizes are
#: the same on 64-bit hosts and 32-bit microcontrollers.
STRUCTS: dict[str, tuple[str, int]] = {
    "conv": ("cnnp_conv_t", 120),
    "epi": ("cnnp_epi_t", 48),
    "binary": ("cnnp_binary_t", 132),
    "ewise": ("cnnp_ewise_t", 60),
    "copy": ("cnnp_copy_t", 84),
    "fill": ("cnnp_fill_t", 12),
    "pool": ("cnnp_pool_t", 40),
    # an integer program's parameters of every operation, beside its descriptor (cnnpress_q.h)
    "q": ("cnnp_q_t", 68),
}

#: Sizes the Python side must agree on: ``#define`` name -> value.
DEFINES: dict[str, int] = {
    "CNNP_MAX_DIMS": 6,
    "CNNP_TILE": 16,
    "CNNP_HUFF_MAX": 24,
    "CNNP_ADD_SHIFT": 20,
}


def names(enum: str, prefix: str) -> dict[str, int]:
    """The constants of ``ENUMS[enum]`` by their lower-case names without ``prefix``
    (``names("weight", "CNNP_W_")["slbf"] == 4``)."""
    return {c.removeprefix(prefix).lower(): v for c, v in ENUMS[enum].items()}


#: The enums by short name, as the lowering writes them.
BASE = names("base", "CNNP_")
WEIGHT = names("weight", "CNNP_W_")
BN = names("bn", "CNNP_BN_")
ACT = names("act", "CNNP_ACT_")
OP = names("op", "CNNP_")
POOL = names("pool", "CNNP_")
QMODE = names("qmode", "CNNP_Q_")
