"""Build small docker-save / OCI-layout tarballs and inspect ext4 disks with debugfs."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import subprocess
import tarfile
from pathlib import Path

from matchlock.image._disk import find_tool

DEBUGFS = find_tool("debugfs")
MTIME = 1_600_000_000


# ---- layer tarballs -------------------------------------------------------------------


def d(name: str, mode: int = 0o755, uid: int = 0, gid: int = 0) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode, ti.uid, ti.gid, ti.mtime = tarfile.DIRTYPE, mode, uid, gid, MTIME
    return ti


def f(name: str, data: bytes | str = b"", mode: int = 0o644, uid: int = 0, gid: int = 0):
    if isinstance(data, str):
        data = data.encode()
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode, ti.uid, ti.gid, ti.mtime = tarfile.REGTYPE, mode, uid, gid, MTIME
    ti.size = len(data)
    return ti, data


def sym(name: str, target: str, uid: int = 0, gid: int = 0) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.linkname, ti.mode, ti.uid, ti.gid, ti.mtime = (
        tarfile.SYMTYPE, target, 0o777, uid, gid, MTIME,
    )  # fmt: skip
    return ti


def hard(name: str, target: str) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.linkname, ti.mode, ti.mtime = tarfile.LNKTYPE, target, 0o644, MTIME
    return ti


def special(name: str, kind: bytes, mode: int = 0o644) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode, ti.mtime = kind, mode, MTIME
    ti.devmajor, ti.devminor = 1, 3
    return ti


def layer(*entries) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for e in entries:
            if isinstance(e, tuple):
                ti, data = e
                tf.addfile(ti, io.BytesIO(data))
            else:
                tf.addfile(e)
    return buf.getvalue()


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def compress(blob: bytes, how: str | None) -> bytes:
    if how == "gzip":
        return gzip.compress(blob, mtime=0)
    if how == "zstd":
        import zstandard

        return zstandard.ZstdCompressor().compress(blob)
    return blob


def image_config(layers: list[bytes], config: dict | None = None, arch: str = "amd64") -> bytes:
    cfg = {
        "architecture": arch,
        "os": "linux",
        "config": config if config is not None else {"Env": ["PATH=/bin"], "Cmd": ["sh"]},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + sha(x) for x in layers]},
    }
    return json.dumps(cfg).encode()


def _tar(files: dict[str, bytes], extra: list[tarfile.TarInfo] = ()) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = len(data), 0o644, MTIME
            tf.addfile(ti, io.BytesIO(data))
        for ti in extra:
            tf.addfile(ti)
    return buf.getvalue()


def docker_save(
    layers: list[bytes], config: dict | None = None, *, gzip_layers: bool = False,
    tags: list[str] | None = None, dup_symlink: bool = False,
) -> bytes:  # fmt: skip
    cfg = image_config(layers, config)
    files: dict[str, bytes] = {f"{sha(cfg)}.json": cfg}
    names = []
    extra = []
    for i, raw in enumerate(layers):
        blob = compress(raw, "gzip" if gzip_layers else None)
        name = f"{sha(blob + bytes([i]))}/layer.tar"
        if dup_symlink and i > 0 and raw == layers[0]:
            ti = tarfile.TarInfo(name)
            ti.type, ti.linkname = tarfile.SYMTYPE, f"../{names[0]}"
            extra.append(ti)
        else:
            files[name] = blob
        names.append(name)
    manifest = [{"Config": f"{sha(cfg)}.json", "RepoTags": tags or ["t:1"], "Layers": names}]
    files["manifest.json"] = json.dumps(manifest).encode()
    return _tar(files, extra)


def oci_layout(
    layers: list[bytes], config: dict | None = None, *, compression: str | None = "gzip",
    multiarch: bool = False, corrupt_layer: bool = False,
) -> bytes:  # fmt: skip
    files: dict[str, bytes] = {"oci-layout": b'{"imageLayoutVersion":"1.0.0"}'}

    def put(blob: bytes, media_type: str, **kw) -> dict:
        files[f"blobs/sha256/{sha(blob)}"] = blob
        return {"mediaType": media_type, "digest": "sha256:" + sha(blob), "size": len(blob), **kw}

    def manifest_for(lays: list[bytes], cfg_json: dict | None, arch: str) -> bytes:
        cfg = image_config(lays, cfg_json, arch)
        suffix = {"gzip": "+gzip", "zstd": "+zstd", None: ""}[compression]
        m = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": put(cfg, "application/vnd.oci.image.config.v1+json"),
            "layers": [
                put(compress(x, compression), "application/vnd.oci.image.layer.v1.tar" + suffix)
                for x in lays
            ],
        }
        return json.dumps(m).encode()

    mt = "application/vnd.oci.image.manifest.v1+json"
    amd = manifest_for(layers, config, "amd64")
    if multiarch:
        arm = manifest_for([layer(f("ARM", "arm"))], config, "arm64")
        inner = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [
                put(arm, mt, platform={"architecture": "arm64", "os": "linux"}),
                put(amd, mt, platform={"architecture": "amd64", "os": "linux"}),
            ],
        }
        inner_blob = json.dumps(inner).encode()
        top = [put(inner_blob, "application/vnd.oci.image.index.v1+json")]
    else:
        top = [put(amd, mt)]
    files["index.json"] = json.dumps({"schemaVersion": 2, "manifests": top}).encode()
    if corrupt_layer:
        last = [k for k in files if k.startswith("blobs/")]
        target = next(k for k in last if files[k] == compress(layers[-1], compression))
        files[target] = files[target][:-1] + bytes([files[target][-1] ^ 1])
    return _tar(files)


# ---- disk inspection ------------------------------------------------------------------


def dstat(disk: Path, path: str) -> dict | None:
    r = subprocess.run([DEBUGFS, "-R", f"stat {path}", str(disk)], capture_output=True, text=True)
    m = re.search(r"Inode:\s+(\d+)\s+Type:\s+(\S+)\s+Mode:\s+([0-7]+)", r.stdout)
    if not m:
        return None
    u = re.search(r"User:\s+(\d+)\s+Group:\s+(\d+)", r.stdout)
    links = re.search(r"Links:\s+(\d+)", r.stdout)
    mtime = re.search(r"mtime:\s+0x([0-9a-f]+)", r.stdout)
    return {
        "inode": int(m.group(1)),
        "type": m.group(2),
        "mode": int(m.group(3), 8),
        "uid": int(u.group(1)),
        "gid": int(u.group(2)),
        "links": int(links.group(1)),
        "mtime": int(mtime.group(1), 16) if mtime else None,
        "raw": r.stdout,
    }


def cat(disk: Path, path: str) -> bytes:
    r = subprocess.run([DEBUGFS, "-R", f"cat {path}", str(disk)], capture_output=True)
    return r.stdout


def ls(disk: Path, path: str) -> list[str]:
    r = subprocess.run([DEBUGFS, "-R", f"ls -p {path}", str(disk)], capture_output=True, text=True)
    names = []
    for line in r.stdout.splitlines():
        parts = line.strip("/").split("/")
        if len(parts) >= 5 and parts[4] not in (".", ".."):
            names.append(parts[4])
    return sorted(names)


class Unseekable(io.RawIOBase):
    """A read-only, non-seekable stream, like a pipe on stdin."""

    def __init__(self, data: bytes):
        self._buf = io.BytesIO(data)
        self.name = "<stdin>"

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def readinto(self, b) -> int:  # noqa: ANN001
        chunk = self._buf.read(min(len(b), 65536))
        b[: len(chunk)] = chunk
        return len(chunk)


def leftovers(root: Path) -> list[str]:
    """Everything under the store that an aborted import might have left."""
    out = []
    for sub in ("tmp", "disks", "blobs/sha256"):
        p = root / sub
        if p.exists():
            out += [f"{sub}/{x.name}" for x in p.iterdir()]
    return out
