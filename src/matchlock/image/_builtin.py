"""The built-in image: Debian's static busybox plus a minimal /etc, made without a registry."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
from pathlib import Path

from matchlock.errors import DependencyError
from matchlock.image import _disk

BUSYBOX = Path("/bin/busybox")
RECIPE = "1"
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MTIME = 1_700_000_000  # fixed, so the layer is reproducible

PASSWD = """\
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
user:x:1000:1000:user:/home/user:/bin/sh
"""
GROUP = """\
root:x:0:
nogroup:x:65534:
user:x:1000:
"""
HOSTS = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"

# (path, mode, uid, gid)
DIRS = [
    ("bin", 0o755, 0, 0),
    ("sbin", 0o755, 0, 0),
    ("usr", 0o755, 0, 0),
    ("usr/bin", 0o755, 0, 0),
    ("usr/sbin", 0o755, 0, 0),
    ("usr/local", 0o755, 0, 0),
    ("usr/local/bin", 0o755, 0, 0),
    ("etc", 0o755, 0, 0),
    ("dev", 0o755, 0, 0),
    ("proc", 0o555, 0, 0),
    ("sys", 0o555, 0, 0),
    ("run", 0o755, 0, 0),
    ("mnt", 0o755, 0, 0),
    ("var", 0o755, 0, 0),
    ("var/tmp", 0o1777, 0, 0),
    ("tmp", 0o1777, 0, 0),
    ("root", 0o700, 0, 0),
    ("home", 0o755, 0, 0),
    ("home/user", 0o755, 1000, 1000),
]


def _arch() -> str:
    m = os.uname().machine  # platform.machine(), without importing platform (~1.5 ms)
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(m, m)


def find_busybox() -> Path:
    if not BUSYBOX.is_file():
        raise DependencyError(
            f"{BUSYBOX} not found; install busybox-static (apt-get install busybox-static) "
            "for the built-in image"
        )
    with open(BUSYBOX, "rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
            raise DependencyError(
                f"{BUSYBOX} is not a 64-bit little-endian ELF; install busybox-static"
            )
        (phoff,) = struct.unpack_from("<Q", head, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    for i in range(phnum):
        (ptype,) = struct.unpack_from("<I", table, i * phentsize)
        if ptype == 3:  # PT_INTERP: dynamically linked
            raise DependencyError(
                f"{BUSYBOX} is dynamically linked; install busybox-static "
                "(apt-get install busybox-static) for the built-in image"
            )
    return BUSYBOX


def config_blob(busybox: Path) -> bytes:
    """The synthesized image config; its sha256 is the image id."""
    cfg = {
        "architecture": _arch(),
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": {
            "Env": [PATH_ENV],
            "Cmd": ["sh"],
            "Labels": {
                "org.matchlock.builtin": "busybox",
                "org.matchlock.busybox.sha256": _disk.sha256_file(busybox),
                "org.matchlock.recipe": RECIPE,
            },
        },
        "rootfs": {"type": "layers", "diff_ids": []},
    }
    return json.dumps(cfg, sort_keys=True, separators=(",", ":")).encode()


def _applets(busybox: Path) -> list[str]:
    try:
        out = subprocess.run(
            [str(busybox), "--list-full"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise DependencyError(
            f"cannot run `{busybox} --list-full` ({e}); reinstall busybox-static"
        ) from None
    return sorted({line.strip().strip("/") for line in out.splitlines() if line.strip()})


def write_layer(busybox: Path, out: Path) -> None:
    """Write the built-in image's single layer (uncompressed tar) to `out`."""
    import tarfile  # only when the image is (re)built, not on every boot

    def info(name: str, kind: bytes, mode: int, uid: int = 0, gid: int = 0) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(name)
        ti.type = kind
        ti.mode = mode
        ti.uid, ti.gid = uid, gid
        ti.uname = ti.gname = ""
        ti.mtime = MTIME
        return ti

    def add_file(tf: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
        ti = info(name, tarfile.REGTYPE, mode)
        ti.size = len(data)
        tf.addfile(ti, io.BytesIO(data))

    version = subprocess.run([str(busybox)], capture_output=True, text=True).stdout
    version = (version.splitlines() or ["BusyBox"])[0].split(" multi-call")[0]
    os_release = (
        'PRETTY_NAME="Matchlock busybox"\n'
        'NAME="Matchlock busybox"\n'
        "ID=matchlock-busybox\n"
        f'VERSION="{version}"\n'
    )
    dirs = {d for d, *_ in DIRS}
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tf:
        for d, mode, uid, gid in DIRS:
            tf.addfile(info(d, tarfile.DIRTYPE, mode, uid, gid))
        with open(busybox, "rb") as f:
            ti = info("bin/busybox", tarfile.REGTYPE, 0o755)
            ti.size = busybox.stat().st_size
            tf.addfile(ti, f)
        add_file(tf, "etc/passwd", PASSWD.encode())
        add_file(tf, "etc/group", GROUP.encode())
        add_file(tf, "etc/hosts", HOSTS.encode())
        add_file(tf, "etc/os-release", os_release.encode())
        for applet in _applets(busybox):
            if applet == "bin/busybox" or "/" not in applet or ".." in applet.split("/"):
                continue
            parent = applet.rsplit("/", 1)[0]
            if parent not in dirs:
                continue
            ti = info(applet, tarfile.SYMTYPE, 0o777)
            ti.linkname = "/bin/busybox"
            tf.addfile(ti)
