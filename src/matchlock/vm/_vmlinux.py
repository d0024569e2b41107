"""Extract the uncompressed `vmlinux` (an ELF with a PVH entry note) from a bzImage.

Booting the ELF directly skips the kernel's self-decompression, which under TCG costs
~0.5 s per boot (measured: 2.31 s -> 1.69 s wall for a boot-to-poweroff).
"""

from __future__ import annotations

import logging
import lzma
import os
import struct
import zlib
from pathlib import Path

log = logging.getLogger(__name__)

_LZ4_LEGACY = b"\x02\x21\x4c\x18"
_LZ4_BLOCK = 8 << 20  # the legacy format's fixed uncompressed block size
_XEN_PVH_NOTE = 18  # XEN_ELFNOTE_PHYS32_ENTRY: QEMU needs it to boot the ELF directly


def _lz4_legacy(data: bytes, start: int) -> bytes:
    import lz4.block

    out = bytearray()
    pos = start + 4
    while pos + 4 <= len(data):
        (size,) = struct.unpack_from("<I", data, pos)
        if size == struct.unpack("<I", _LZ4_LEGACY)[0]:
            pos += 4  # concatenated stream
            continue
        if size == 0 or pos + 4 + size > len(data):
            break
        try:
            out += lz4.block.decompress(data[pos + 4 : pos + 4 + size],
                                        uncompressed_size=_LZ4_BLOCK)
        except lz4.block.LZ4BlockError:
            break  # trailing bytes of the bzImage, not a block
        pos += 4 + size
    return bytes(out)


def _decompressors(data: bytes):
    i = data.find(_LZ4_LEGACY)
    if i >= 0:
        yield lambda: _lz4_legacy(data, i)
    i = data.find(b"\x1f\x8b\x08")
    if i >= 0:
        # decompressobj stops at the end of the stream; the bzImage has bytes after it.
        yield lambda: zlib.decompressobj(wbits=31).decompress(data[i:])
    i = data.find(b"\xfd7zXZ\x00")
    if i >= 0:
        yield lambda: lzma.LZMADecompressor().decompress(data[i:])
    i = data.find(b"\x28\xb5\x2f\xfd")
    if i >= 0:
        import zstandard

        yield lambda: zstandard.ZstdDecompressor().decompressobj().decompress(data[i:])


def has_pvh_note(elf: bytes) -> bool:
    if elf[:4] != b"\x7fELF" or elf[4] != 2:  # 64-bit only
        return False
    if len(elf) < 64:
        return False
    (phoff,) = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for k in range(phnum):
        if phoff + (k + 1) * phentsize > len(elf):
            break
        p_type, _, p_offset, _, _, p_filesz = struct.unpack_from(
            "<IIQQQQ", elf, phoff + k * phentsize)
        if p_type != 4:  # PT_NOTE
            continue
        pos, end = p_offset, min(p_offset + p_filesz, len(elf))
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12 : pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and ntype == _XEN_PVH_NOTE:
                return True
            pos += 12 + ((namesz + 3) & ~3) + ((descsz + 3) & ~3)
    return False


def find_payload(data: bytes) -> bytes | None:
    """The decompressed ELF kernel inside a bzImage's bytes, or None."""
    for decompress in _decompressors(data):
        try:
            elf = decompress()
        except Exception as e:  # noqa: BLE001 - try the next format
            log.debug("bzImage payload attempt failed: %s", e)
            continue
        if elf[:4] == b"\x7fELF":
            return elf
    return None


def extract_vmlinux(bzimage: Path, out: Path) -> bool:
    """Write `out` (atomically) and return True when a PVH-bootable ELF was found."""
    data = bzimage.read_bytes()
    for decompress in _decompressors(data):
        try:
            elf = decompress()
        except Exception as e:  # noqa: BLE001 - try the next format
            log.debug("vmlinux extraction attempt failed: %s", e)
            continue
        if has_pvh_note(elf):
            tmp = out.with_name(out.name + ".tmp")
            tmp.write_bytes(elf)
            os.replace(tmp, out)
            return True
    return False
