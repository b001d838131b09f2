"""The ``.cnnp`` file format: bit packing, array layout and the container."""

from __future__ import annotations

from cnnpress.format.bitpack import pack_bits, packed_size, unpack_bits
from cnnpress.format.container import FORMAT_VERSION, FormatError, load, read_info, save

__all__ = [
    "FORMAT_VERSION",
    "FormatError",
    "load",
    "pack_bits",
    "packed_size",
    "read_info",
    "save",
    "unpack_bits",
]
