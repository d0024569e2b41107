"""vmlinux extraction: PVH boot of the uncompressed kernel skips self-decompression."""

import gzip
import struct

from matchlock.vm._vmlinux import extract_vmlinux, has_pvh_note
from matchlock.vm.kernel import debian_kernel


def _elf_with_note(name: bytes, ntype: int) -> bytes:
    desc = b"\0" * 4
    note = struct.pack("<III", len(name) + 1, len(desc), ntype) + name + b"\0" + desc
    note = note.ljust((len(note) + 3) & ~3, b"\0")
    ehdr = bytearray(64)
    ehdr[:5] = b"\x7fELF\x02"
    struct.pack_into("<Q", ehdr, 0x20, 64)  # e_phoff
    struct.pack_into("<HH", ehdr, 0x36, 56, 1)  # e_phentsize, e_phnum
    phdr = struct.pack("<IIQQQQQQ", 4, 0, 64 + 56, 0, 0, len(note), len(note), 4)
    return bytes(ehdr) + phdr + note


def test_pvh_note_detection():
    assert has_pvh_note(_elf_with_note(b"Xen", 18))
    assert not has_pvh_note(_elf_with_note(b"Xen", 5))
    assert not has_pvh_note(_elf_with_note(b"GNU", 18))
    assert not has_pvh_note(b"MZ not an elf" + b"\0" * 64)


def test_extract_from_gzip_payload(tmp_path):
    elf = _elf_with_note(b"Xen", 18)
    fake = tmp_path / "bzImage"
    fake.write_bytes(b"\0" * 512 + gzip.compress(elf) + b"trailer")
    out = tmp_path / "vmlinux"
    assert extract_vmlinux(fake, out)
    assert out.read_bytes() == elf


def test_extract_refuses_non_pvh(tmp_path):
    fake = tmp_path / "bzImage"
    fake.write_bytes(b"\0" * 512 + gzip.compress(_elf_with_note(b"GNU", 3)))
    assert not extract_vmlinux(fake, tmp_path / "vmlinux")
    assert not (tmp_path / "vmlinux").exists()


def test_debian_kernel_boots_as_vmlinux():
    k = debian_kernel()
    assert k.image.name == "vmlinux"
    assert has_pvh_note(k.image.read_bytes())
