"""Minimal Debian package (.deb) reader: the `ar` container plus its data tarball.

A .deb is an `ar` archive holding `debian-binary`, `control.tar.*` and `data.tar.*`.
We read it in Python so unpacking needs neither `dpkg` nor `ar`; only a zstd-compressed
data tarball needs help (the `zstandard` module, or else the `zstd` program).
"""

from __future__ import annotations

import gzip
import io
import lzma
import os
import shutil
import subprocess
import tarfile
import threading
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from matchlock.errors import DependencyError, MatchlockError

AR_MAGIC = b"!<arch>\n"
_HEADER_LEN = 60


class DebFormatError(MatchlockError):
    """The file is not a well-formed .deb / ar archive."""


@dataclass(frozen=True, slots=True)
class ArMember:
    name: str
    offset: int  # where the member's data starts in the archive
    size: int
    mode: int
    mtime: int


def ar_members(f: BinaryIO) -> list[ArMember]:
    """List the members of the `ar` archive `f` (common/System V format, as dpkg writes it)."""
    f.seek(0)
    if f.read(len(AR_MAGIC)) != AR_MAGIC:
        raise DebFormatError("not an ar archive (bad magic); is this really a .deb file?")
    members: list[ArMember] = []
    gnu_names = b""
    pos = len(AR_MAGIC)
    while True:
        f.seek(pos)
        hdr = f.read(_HEADER_LEN)
        if not hdr:
            break
        if len(hdr) < _HEADER_LEN or hdr[58:60] != b"`\n":
            raise DebFormatError(f"corrupt ar header at offset {pos}; re-download the package")
        raw_name = hdr[0:16].rstrip(b" ")
        try:
            size = int(hdr[48:58].strip() or b"0")
            mtime = int(hdr[16:28].strip() or b"0")
            mode = int(hdr[40:48].strip() or b"0", 8)
        except ValueError as e:
            raise DebFormatError(f"corrupt ar header at offset {pos}: {e}") from None
        data_off = pos + _HEADER_LEN
        if raw_name.startswith(b"#1/"):  # BSD: name stored in front of the data
            n = int(raw_name[3:])
            f.seek(data_off)
            name = f.read(n).rstrip(b"\0").decode()
            data_off += n
            size -= n
        elif raw_name == b"//":  # GNU long-name table
            f.seek(data_off)
            gnu_names = f.read(size)
            name = ""
        elif raw_name.startswith(b"/") and raw_name[1:].isdigit():  # GNU long name reference
            start = int(raw_name[1:])
            end = gnu_names.find(b"/\n", start)
            name = gnu_names[start : end if end >= 0 else None].decode()
        elif raw_name == b"/":  # GNU symbol table
            name = ""
        else:
            name = raw_name.decode().removesuffix("/")
        if name:
            members.append(ArMember(name, data_off, size, mode, mtime))
        pos = data_off + size + (size & 1)  # data is padded to an even offset
    return members


class _Window(io.RawIOBase):
    """A read-only view of `size` bytes of `f` starting at `offset`."""

    def __init__(self, f: BinaryIO, offset: int, size: int) -> None:
        self._f = f
        self._start = offset
        self._size = size
        self._pos = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[override]
        n = min(len(b), self._size - self._pos)
        if n <= 0:
            return 0
        self._f.seek(self._start + self._pos)
        data = self._f.read(n)
        b[: len(data)] = data
        self._pos += len(data)
        return len(data)


def _find(members: list[ArMember], prefix: str) -> ArMember:
    for m in members:
        if m.name.startswith(prefix):
            return m
    raise DebFormatError(f"no {prefix}* member in the package; re-download it")


@contextmanager
def _zstd_reader(raw: io.RawIOBase) -> Iterator[BinaryIO]:
    try:
        import zstandard  # type: ignore[import-not-found]
    except ImportError:
        zstandard = None
    if zstandard is not None:
        with zstandard.ZstdDecompressor().stream_reader(raw) as r:
            yield r  # type: ignore[misc]
        return
    exe = shutil.which("zstd")
    if exe is None:
        raise DependencyError(
            "the package's data is zstd-compressed and neither the `zstandard` Python module "
            "nor the `zstd` program is available; pip install zstandard, or apt-get install zstd"
        )
    proc = subprocess.Popen(
        [exe, "-dcq"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdin is not None and proc.stdout is not None

    def pump() -> None:
        try:
            shutil.copyfileobj(raw, proc.stdin, 1 << 20)  # type: ignore[arg-type]
        except BrokenPipeError:
            pass
        finally:
            try:
                proc.stdin.close()  # type: ignore[union-attr]
            except BrokenPipeError:
                pass

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    ok = False
    try:
        yield proc.stdout  # type: ignore[misc]
        ok = True
    finally:
        if ok:
            while proc.stdout.read(1 << 20):  # drain so the pump can finish
                pass
        else:
            proc.kill()
        t.join()
        proc.stdout.close()
        err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
        rc = proc.wait()
        if ok and rc != 0:
            raise DebFormatError(f"zstd failed to decompress the package data: {err or rc}")


@contextmanager
def open_data_tar(deb: str | os.PathLike) -> Iterator[tarfile.TarFile]:
    """Open the package's data tarball as a *streaming* TarFile (iterate it once, in order)."""
    with open(deb, "rb") as f:
        member = _find(ar_members(f), "data.tar")
        raw = _Window(f, member.offset, member.size)
        buffered = io.BufferedReader(raw, 1 << 20)
        ext = member.name.removeprefix("data.tar")
        if ext == ".zst":
            with _zstd_reader(buffered) as stream, tarfile.open(fileobj=stream, mode="r|") as t:
                yield t
            return
        modes = {"": "r|", ".gz": "r|gz", ".xz": "r|xz", ".bz2": "r|bz2"}
        if ext not in modes:
            raise DebFormatError(f"unsupported data member compression: {member.name}")
        try:
            with tarfile.open(fileobj=buffered, mode=modes[ext]) as t:
                yield t
        except (tarfile.TarError, EOFError, lzma.LZMAError, zlib.error, gzip.BadGzipFile) as e:
            raise DebFormatError(f"corrupt package data ({member.name}): {e}") from None


def _norm(name: str) -> str:
    return name.removeprefix("./").lstrip("/")


def extract_deb(
    deb: str | os.PathLike,
    dest: str | os.PathLike,
    select: Callable[[str], str | None],
) -> list[Path]:
    """Extract chosen regular files and directories of the package's data into `dest`.

    `select` gets each member's path (no leading "./") and returns the relative path to
    write it to under `dest`, or None to skip it. Symlinks, devices and hard links are
    skipped. Returns the regular files written.
    """
    dest = Path(dest)
    written: list[Path] = []
    with open_data_tar(deb) as tar:
        for info in tar:
            name = _norm(info.name)
            if not name or not (info.isfile() or info.isdir()):
                continue
            rel = select(name)
            if rel is None:
                continue
            rel_path = Path(rel)
            if rel_path.is_absolute() or ".." in rel_path.parts:
                raise DebFormatError(f"unsafe path in package: {info.name}")
            out = dest / rel_path
            if info.isdir():
                out.mkdir(parents=True, exist_ok=True)
                continue
            out.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(info)
            assert src is not None
            with src, open(out, "wb") as w:
                shutil.copyfileobj(src, w, 1 << 20)
            os.chmod(out, (info.mode & 0o777) | 0o400)
            written.append(out)
    return written
