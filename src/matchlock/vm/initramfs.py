"""Build the guest initramfs: the guest runtime as /init plus the kernel modules it loads.

Layout of the archive (newc cpio, uncompressed, reproducible: uid/gid/mtime 0)::

    /dev /dev/console /proc /sys /run /tmp      (empty dirs; console node c 5 1)
    /init                                       the guest binary, mode 0755
    /modules/<name>.ko                          the module closure
    /modules/order                              one .ko file name per line, load in this order

Built archives are cached at ``cache_dir()/initramfs/<sha256>.cpio``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from matchlock.errors import MatchlockError, NotFoundError
from matchlock.paths import cache_dir
from matchlock.vm.kernel import Kernel

DEFAULT_MODULES = (
    "virtio_pci",
    "virtio_mmio",
    "virtio_blk",
    "virtio_console",
    "virtio_net",
    "overlay",
    "fuse",
)

_FORMAT = 2  # bump when the archive layout changes (invalidates the cache)


# --------------------------------------------------------------------------- cpio


@dataclass(frozen=True, slots=True)
class CpioEntry:
    """One archive member. `name` is relative ("modules/x.ko"); a leading "/" is dropped.

    `mode` is a full st_mode (type bits + permissions). For regular files the contents are
    `data`, or the bytes of `source` if given; for symlinks `data` is the target.
    """

    name: str
    mode: int
    data: bytes = b""
    source: Path | None = None
    rdev: tuple[int, int] = (0, 0)  # (major, minor) for device nodes

    @classmethod
    def dir(cls, name: str, perm: int = 0o755) -> CpioEntry:
        return cls(name, stat.S_IFDIR | perm)

    @classmethod
    def file(
        cls, name: str, data: bytes = b"", *, source: Path | None = None, perm: int = 0o644
    ) -> CpioEntry:
        return cls(name, stat.S_IFREG | perm, data, source)

    @classmethod
    def symlink(cls, name: str, target: str) -> CpioEntry:
        return cls(name, stat.S_IFLNK | 0o777, target.encode())

    @classmethod
    def chardev(cls, name: str, major: int, minor: int, perm: int = 0o600) -> CpioEntry:
        return cls(name, stat.S_IFCHR | perm, rdev=(major, minor))


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def _header(ino: int, mode: int, nlink: int, size: int, rdev: tuple[int, int], name: bytes):
    fields = (ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev[0], rdev[1], len(name) + 1, 0)
    hdr = b"070701" + b"".join(b"%08X" % f for f in fields)
    return hdr + name + b"\0" + _pad4(len(hdr) + len(name) + 1)


def write_cpio(entries: Iterable[CpioEntry], out: BinaryIO) -> None:
    """Write a newc ("070701") cpio archive, ending with TRAILER!!! and padded to 512 bytes.

    Owners, mtimes and device numbers are 0, inode numbers count up from 1, so the same
    entries always give the same bytes. Parent directories must come before their
    contents (the kernel's unpacker does not create them).
    """
    written = 0

    def put(b: bytes) -> None:
        nonlocal written
        out.write(b)
        written += len(b)

    for ino, e in enumerate(entries, 1):
        name = e.name.lstrip("/").encode()
        if not name or name == b"TRAILER!!!":
            raise ValueError(f"bad cpio entry name {e.name!r}")
        fmt = stat.S_IFMT(e.mode)
        if fmt == stat.S_IFREG:
            data = e.source.read_bytes() if e.source is not None else e.data
        elif fmt == stat.S_IFLNK:
            data = e.data
        elif fmt in (stat.S_IFDIR, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO):
            data = b""
        else:
            raise ValueError(f"unsupported cpio entry type {oct(e.mode)} for {e.name!r}")
        nlink = 2 if fmt == stat.S_IFDIR else 1
        put(_header(ino, e.mode, nlink, len(data), e.rdev, name))
        put(data)
        put(_pad4(len(data)))
    put(_header(0, 0, 1, 0, (0, 0), b"TRAILER!!!"))
    put(b"\0" * (-written % 512))


# --------------------------------------------------------------------------- modules


def read_modinfo(ko: Path) -> list[tuple[str, str]]:
    """The key=value pairs of a kernel module's `.modinfo` ELF section, in order."""
    blob = ko.read_bytes()
    if blob[:4] != b"\x7fELF":
        raise MatchlockError(f"{ko} is not an ELF kernel module; delete the kernel cache")
    is64 = blob[4] == 2
    end = "<" if blob[5] == 1 else ">"
    try:
        if is64:
            (shoff,) = struct.unpack_from(end + "Q", blob, 0x28)
            shentsize, shnum, shstrndx = struct.unpack_from(end + "HHH", blob, 0x3A)
            sec = end + "IIQQQQIIQQ"
        else:
            (shoff,) = struct.unpack_from(end + "I", blob, 0x20)
            shentsize, shnum, shstrndx = struct.unpack_from(end + "HHH", blob, 0x2E)
            sec = end + "IIIIIIIIII"

        def section(i: int) -> tuple[int, int, int]:  # (name offset, file offset, size)
            f = struct.unpack_from(sec, blob, shoff + i * shentsize)
            return f[0], f[4], f[5]

        _, stroff, strsize = section(shstrndx)
        strtab = blob[stroff : stroff + strsize]
        for i in range(shnum):
            nameoff, off, size = section(i)
            if strtab[nameoff : strtab.index(b"\0", nameoff)] == b".modinfo":
                raw = blob[off : off + size]
                break
        else:
            return []
    except (struct.error, ValueError):
        raise MatchlockError(f"{ko} is a corrupt ELF file; delete the kernel cache") from None
    pairs = []
    for item in raw.split(b"\0"):
        if b"=" in item:
            k, v = item.decode(errors="replace").split("=", 1)
            pairs.append((k, v))
    return pairs


def module_depends(ko: Path) -> list[str]:
    """Module names from the `depends=` entry of the module's .modinfo."""
    deps: list[str] = []
    for k, v in read_modinfo(ko):
        if k == "depends":
            deps.extend(d for d in v.split(",") if d)
    return deps


def module_closure(kernel: Kernel, names: Sequence[str]) -> list[Path]:
    """.ko files for `names` and their dependencies: dependencies first, no duplicates.

    Built-in modules (and everything when the kernel has no modules dir) are skipped.
    """
    result: list[Path] = []
    done: set[str] = set()
    active: set[str] = set()

    def visit(name: str) -> None:
        key = name.replace("-", "_")
        if key in done or key in active:  # `active`: guards against a dependency cycle
            return
        path = kernel.module_path(key)
        if path is None:
            done.add(key)
            return
        active.add(key)
        for dep in module_depends(path):
            visit(dep)
        active.discard(key)
        done.add(key)
        result.append(path)

    for n in names:
        visit(n)
    return result


# --------------------------------------------------------------------------- build


_SIG_MAGIC = b"~Module signature appended~\n"


def strip_signature(ko: bytes) -> bytes:
    """Drop the appended module signature: checking it costs boot time under TCG, and
    the modules come from the package we verified (apt) ourselves."""
    if not ko.endswith(_SIG_MAGIC) or len(ko) < len(_SIG_MAGIC) + 12:
        return ko
    # struct module_signature (12 bytes) precedes the magic; sig_len is its last field.
    info = ko[-len(_SIG_MAGIC) - 12 : -len(_SIG_MAGIC)]
    sig_len = int.from_bytes(info[8:12], "big")
    end = len(ko) - len(_SIG_MAGIC) - 12 - sig_len
    return ko[:end] if end > 0 else ko


def initramfs_entries(guest: bytes, modules: Sequence[Path]) -> list[CpioEntry]:
    entries = [
        CpioEntry.dir("dev"),
        CpioEntry.chardev("dev/console", 5, 1),
        CpioEntry.dir("proc", 0o555),
        CpioEntry.dir("sys", 0o555),
        CpioEntry.dir("run"),
        CpioEntry.dir("tmp", 0o1777),
        CpioEntry.file("init", guest, perm=0o755),
        CpioEntry.dir("modules"),
    ]
    names = [p.name for p in modules]
    if len(set(names)) != len(names):
        raise MatchlockError(f"duplicate module file names in {names}")
    entries += [CpioEntry.file(f"modules/{p.name}", strip_signature(p.read_bytes()))
                for p in modules]
    entries.append(CpioEntry.file("modules/order", "".join(n + "\n" for n in names).encode()))
    return entries


def build_initramfs(
    kernel: Kernel, guest_binary: Path, modules: Sequence[str] = DEFAULT_MODULES
) -> Path:
    """The (cached) initramfs for this kernel, guest binary and module list."""
    guest_binary = Path(guest_binary)
    try:
        guest = guest_binary.read_bytes()
    except FileNotFoundError:
        raise NotFoundError(
            f"guest binary {guest_binary} does not exist; rebuild matchlock's guest runtime"
        ) from None
    closure = module_closure(kernel, modules)
    key = hashlib.sha256(
        json.dumps(
            {
                "format": _FORMAT,
                "kernel": kernel.version,
                "guest": hashlib.sha256(guest).hexdigest(),
                "modules": list(modules),
                "closure": [p.name for p in closure],
            },
            sort_keys=True,
        ).encode()
    ).hexdigest()
    out_dir = cache_dir() / "initramfs"
    target = out_dir / f"{key}.cpio"
    if target.is_file():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    import tempfile  # not at the top: `run` starts without it

    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".cpio", dir=out_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            write_cpio(initramfs_entries(guest, closure), f)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return target
