"""Compile the static guest runtime (`matchlock-guest`) with musl.

Used by the package build (setup.py) and, for source checkouts that skipped it,
lazily at run time into the cache dir.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path


def _kernel_header_dir(tmp: Path) -> Path:
    # musl-gcc does not see the kernel UAPI headers; give it links to them.
    inc = tmp / "kinc"
    inc.mkdir()
    triplet = f"{platform.machine()}-linux-gnu"
    for name, src in (
        ("linux", "/usr/include/linux"),
        ("asm", f"/usr/include/{triplet}/asm"),
        ("asm-generic", "/usr/include/asm-generic"),
    ):
        if os.path.isdir(src):
            os.symlink(src, inc / name)
    return inc


def source_digest(src_dir: str | os.PathLike) -> str:
    h = hashlib.sha256()
    for p in sorted(Path(src_dir).glob("*.[ch]")):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def build_guest(src_dir: str | os.PathLike, out: str | os.PathLike) -> Path:
    src_dir, out = Path(src_dir), Path(out)
    cc = shutil.which("musl-gcc")
    if cc is None:
        raise RuntimeError(
            "musl-gcc not found: install Debian's musl-tools (apt-get install musl-tools)"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        inc = _kernel_header_dir(Path(tmp))
        tmp_out = Path(tmp) / "matchlock-guest"
        cmd = [
            cc, "-static", "-O2", "-Wall", "-Wextra", "-Wno-unused-parameter",
            "-isystem", str(inc), "-o", str(tmp_out),
            *[str(p) for p in sorted(src_dir.glob("*.c"))],
        ]
        subprocess.run(cmd, check=True)
        subprocess.run(["strip", str(tmp_out)], check=False)
        shutil.copyfile(tmp_out, out)
    out.chmod(0o755)
    return out
