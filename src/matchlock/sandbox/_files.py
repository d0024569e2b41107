"""Guest file operations (write_file, read_file, list_files) over exec, as root.

They run the image's `sh`, `cat`, `chmod` and `stat`, so they need an image with a shell;
errors come back as FileOpError in the reference's wording (`guest file operation: ...`).
"""

from __future__ import annotations

import stat as statmod
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from matchlock._aio import spawn
from matchlock.errors import FileOpError, UsageError
from matchlock.sandbox._exec import ExecRequest, Process

if TYPE_CHECKING:
    from matchlock.sandbox._sandbox import Sandbox

MAX_READ_FILE = 16 << 20  # as the reference: read_file is for files, not streams
MAX_LIST_OUTPUT = 16 << 20
STDIN_CHUNK = 1 << 16

_WRITE = ('case "$1" in */*) mkdir -p -- "${1%/*}" || exit 1;; esac; '
          'cat > "$1" && chmod "$2" -- "$1"')
_READ = ('if [ ! -e "$1" ]; then echo "open $1: no such file or directory" >&2; exit 2; fi; '
         'if [ ! -f "$1" ]; then echo "read_file only supports regular files: $1" >&2; '
         'exit 2; fi; exec cat -- "$1"')
_LIST = ('cd -- "$1" 2>/dev/null || { echo "open $1: no such file or directory" >&2; exit 2; }; '
         'for f in * .[!.]* ..?*; do [ -e "$f" ] || [ -L "$f" ] || continue; '
         'stat -c "%s %f %Y %n" -- "$f" || exit 3; done')


def _check_path(path: str) -> None:
    if not path.startswith("/") or "\0" in path:
        raise UsageError(f"path must be absolute: {path!r}")


async def _collect(proc: Process, limit: int) -> tuple[bytes, bytes, bool]:
    out, err = bytearray(), bytearray()
    over = False
    while (chunk := await proc.read()) is not None:
        fd, data = chunk
        buf = out if fd == 1 else err
        if len(buf) + len(data) > limit:
            over = True
            await proc.cancel()
            continue
        buf += data
    return bytes(out), bytes(err), over


def _fail(err: bytes, fallback: str) -> FileOpError:
    text = err.decode(errors="replace").strip().splitlines()
    return FileOpError(f"guest file operation: {text[-1] if text else fallback}")


async def write_file(sb: Sandbox, path: str, data: bytes, mode: int = 0o644) -> None:
    _check_path(path)
    proc = await sb.exec(ExecRequest(argv=("sh", "-c", _WRITE, "sh", path, f"{mode:o}"),
                                     stdin=True, user="", cwd="/"))
    reader = spawn(_collect(proc, 1 << 16), name="write-file-output")
    try:
        view = memoryview(data)
        for i in range(0, len(view), STDIN_CHUNK):
            await proc.write(bytes(view[i:i + STDIN_CHUNK]))
        await proc.close_stdin()
        _, err, _ = await reader
    except BaseException:
        reader.cancel()
        await proc.cancel()
        raise
    res = await proc.wait()
    if res.exit_code != 0:
        raise _fail(err, f"write {path}: exit status {res.exit_code}")


async def read_file(sb: Sandbox, path: str) -> bytes:
    _check_path(path)
    proc = await sb.exec(ExecRequest(argv=("sh", "-c", _READ, "sh", path), user="", cwd="/"))
    out, err, over = await _collect(proc, MAX_READ_FILE)
    res = await proc.wait()
    if over:
        raise FileOpError(f"guest file operation: read_file exceeds {MAX_READ_FILE} bytes: "
                          f"{path}")
    if res.exit_code != 0:
        raise _fail(err, f"read {path}: exit status {res.exit_code}")
    return out


def _go_mode(raw_hex: str) -> tuple[int, bool]:
    """st_mode (hex, from stat %f) -> Go os.FileMode bits, and is_dir."""
    m = int(raw_hex, 16)
    perm = statmod.S_IMODE(m) & 0o777
    bits = perm
    if statmod.S_ISDIR(m):
        bits |= 1 << 31
    elif statmod.S_ISLNK(m):
        bits |= 1 << 27
    elif statmod.S_ISFIFO(m):
        bits |= 1 << 25
    elif statmod.S_ISSOCK(m):
        bits |= 1 << 24
    elif statmod.S_ISCHR(m):
        bits |= (1 << 26) | (1 << 21)
    elif statmod.S_ISBLK(m):
        bits |= 1 << 26
    return bits, statmod.S_ISDIR(m)


async def list_files(sb: Sandbox, path: str) -> list[dict[str, Any]]:
    _check_path(path)
    proc = await sb.exec(ExecRequest(argv=("sh", "-c", _LIST, "sh", path), user="", cwd="/"))
    out, err, over = await _collect(proc, MAX_LIST_OUTPUT)
    res = await proc.wait()
    if over:
        raise FileOpError(f"guest file operation: listing of {path} is too long")
    if res.exit_code != 0:
        raise _fail(err, f"list {path}: exit status {res.exit_code}")
    files = []
    for line in out.decode(errors="replace").splitlines():
        parts = line.split(" ", 3)
        if len(parts) != 4:
            continue
        size, raw, mtime, name = parts
        mode, is_dir = _go_mode(raw)
        files.append({
            "name": name, "size": int(size), "mode": mode,
            "mod_time": datetime.fromtimestamp(int(mtime), UTC).isoformat().replace(
                "+00:00", "Z"),
            "is_dir": is_dir,
        })
    return files


__all__ = ["list_files", "read_file", "write_file"]
