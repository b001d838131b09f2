"""The C interface described once (``cnnpress.runtime.c_interface``) is the headers' own: a
program compiled against them prints every described enum constant, ``#define`` and
``sizeof`` of every descriptor struct, and they equal the description; every ``CNNP_*`` enum
constant and every descriptor struct of the headers is described, so a constant or struct
added to one side only fails here. The exporter and the lowering take their numbers from the
description, and the exporter copies every file of ``csrc_c/``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from cnnpress.runtime import c_export, c_interface, c_lower

CSRC = Path(c_interface.__file__).parent / "csrc_c"
CC = shutil.which("cc")
ARM_CC = shutil.which("arm-none-eabi-gcc")


def header_text() -> str:
    """The described headers, without their comments."""
    text = "\n".join((CSRC / name).read_text() for name in c_interface.HEADERS)
    return re.sub(r"/\*.*?\*/", " ", text, flags=re.S)


def header_enums() -> list[set[str]]:
    """The constants of each enum block of the headers."""
    blocks = re.findall(r"\benum\b[^{;]*\{([^}]*)\}", header_text())
    return [
        {item.split("=")[0].strip() for item in body.split(",") if item.strip()} for body in blocks
    ]


def expected() -> dict[str, int]:
    """Every number the description gives, by the C expression that must evaluate to it."""
    numbers = {c: v for enum in c_interface.ENUMS.values() for c, v in enum.items()}
    numbers.update(c_interface.DEFINES)
    numbers.update({f"sizeof({t})": size for t, size in c_interface.STRUCTS.values()})
    return numbers


def includes() -> str:
    return "".join(f'#include "{name}"\n' for name in c_interface.HEADERS)


def test_every_enum_constant_of_the_headers_is_described():
    blocks = header_enums()
    in_header = {c for block in blocks for c in block if c.startswith("CNNP_")}
    described = {c for enum in c_interface.ENUMS.values() for c in enum}
    assert in_header - described == set(), "in the headers, not in c_interface.ENUMS"
    assert described - in_header == set(), "in c_interface.ENUMS, not in the headers"
    # one described enum per C enum, with the same constants
    assert sorted(map(sorted, blocks)) == sorted(map(sorted, c_interface.ENUMS.values()))


def test_every_descriptor_struct_of_the_headers_is_described():
    in_header = set(re.findall(r"\}\s*(cnnp_\w+_t)\s*;", header_text()))
    assert in_header == {t for t, _ in c_interface.STRUCTS.values()}


@pytest.mark.skipif(CC is None, reason="no C compiler (cc) on this machine")
def test_the_described_numbers_are_the_compiled_headers(tmp_path):
    lines = [f'    printf("%s %ld\\n", "{e}", (long)({e}));' for e in expected()]
    source = "#include <stdio.h>\n" + includes() + "int main(void)\n{\n"
    source += "\n".join(lines) + "\n    return 0;\n}\n"
    (tmp_path / "interface.c").write_text(source)
    cmd = [CC, "-std=c99", "-Wall", "-Wextra", "-Werror", "-I", str(CSRC), "interface.c"]
    done = subprocess.run(
        [*cmd, "-o", "interface"], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, f"does not build against the headers:\n{done.stderr[:4000]}"
    out = subprocess.run(
        [str(tmp_path / "interface")], capture_output=True, text=True, check=True
    ).stdout
    compiled = {
        name: int(value)
        for name, value in (line.rsplit(" ", 1) for line in out.split("\n") if line)
    }
    assert compiled == expected()


@pytest.mark.skipif(ARM_CC is None, reason="no arm-none-eabi-gcc on this machine")
def test_the_descriptor_sizes_are_the_same_on_a_32_bit_microcontroller(tmp_path):
    checks = [
        f"typedef char check_{i}[({e}) == {v} ? 1 : -1];"
        for i, (e, v) in enumerate(expected().items())
    ]
    (tmp_path / "interface.c").write_text(includes() + "\n".join(checks) + "\n")
    cmd = [ARM_CC, "-mcpu=cortex-m3", "-mthumb", "-std=c99", "-I", str(CSRC), "-c", "interface.c"]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[:4000]


def test_the_exporter_and_the_lowering_take_the_described_numbers():
    assert {k: size for k, (_, size) in c_interface.STRUCTS.items()} == c_export.DESCRIPTOR_BYTES
    assert c_interface.DEFINES["CNNP_TILE"] == c_lower.TILE
    assert set(c_lower.POOL_KIND.values()) == set(c_interface.POOL.values())
    assert set(c_lower.BINARY.values()) == set(c_interface.OP.values())
    assert c_interface.WEIGHT == {"dense": 0, "binary": 1, "sparse": 2, "kmeans": 3, "slbf": 4}


def test_the_exporter_copies_every_file_of_the_runtime():
    on_disk = sorted(p.name for p in CSRC.iterdir() if p.suffix in (".c", ".h"))
    assert list(c_export.RUNTIME_FILES) == on_disk
    assert set(c_interface.HEADERS) <= set(on_disk)
    assert {"cnnpress_rt.h", "main.c"} <= set(on_disk)
