"""Build test images for the e2e suite without a registry.

    python -m matchlock.image.testimages rootfs DEST.tar          # mmdebstrap rootfs tarball
    python -m matchlock.image.testimages debian DEST.tar [--rootfs R.tar]
    python -m matchlock.image.testimages user-image DEST.tar [--rootfs R.tar]
    python -m matchlock.image.testimages wrap ROOTFS.tar DEST.tar --config '{"Cmd":["sh"]}'

`debian` and `user-image` write `docker save`-format tarballs that `ImageStore.import_tar`
(and `matchlock image import`) accept. Both wrap a Debian bookworm rootfs made by
`mmdebstrap --variant=minbase --include=ca-certificates,curl,python3 bookworm`; pass
`--rootfs R.tar` to reuse (or, if missing, create) that rootfs tarball so that both images
cost one mmdebstrap run.

Requirements: mmdebstrap, and either root (we run as root in CI) or working unprivileged
user namespaces (mmdebstrap's "unshare" mode, picked automatically when not root); network
access to the Debian mirror (deb.debian.org, mmdebstrap's default, which also adds the
bookworm-updates and security suites; set MATCHLOCK_DEBIAN_MIRROR to use another mirror).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from datetime import UTC, datetime
from pathlib import Path

PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEBIAN_PACKAGES = ("ca-certificates", "curl", "python3")
DEBIAN_CONFIG: dict = {"Env": [PATH_ENV], "Cmd": ["bash"]}
USER_IMAGE_CONFIG: dict = {
    "Env": [PATH_ENV],
    "User": "nobody",
    "WorkingDir": "/tmp",
    "Entrypoint": ["/bin/echo", "entry"],
    "Cmd": ["default-cmd"],
}


def build_debian_rootfs(
    out: Path, *, suite: str = "bookworm", packages: tuple[str, ...] = DEBIAN_PACKAGES
) -> Path:
    """Run mmdebstrap to write a rootfs tarball to `out` (atomically)."""
    exe = shutil.which("mmdebstrap")
    if not exe:
        raise SystemExit("mmdebstrap not found; install it (apt-get install mmdebstrap)")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial.tar")
    cmd = [exe, "--variant=minbase", f"--include={','.join(packages)}", suite, str(tmp)]
    mirror = os.environ.get("MATCHLOCK_DEBIAN_MIRROR")
    if mirror:
        cmd.append(mirror)
    try:
        subprocess.run(cmd, check=True)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def make_docker_save(
    rootfs_tar: Path, out: Path, config: dict, *, tag: str = "matchlock-test:latest"
) -> Path:
    """Wrap a rootfs tarball (one layer) into a `docker save` tarball with image `config`
    (the OCI "config" object: Env, Cmd, Entrypoint, User, WorkingDir ...)."""
    rootfs_tar, out = Path(rootfs_tar), Path(out)
    layer_hex = _sha256(rootfs_tar)
    cfg = {
        "architecture": "amd64",
        "os": "linux",
        "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{layer_hex}"]},
    }
    cfg_bytes = json.dumps(cfg, indent=1).encode()
    cfg_name = hashlib.sha256(cfg_bytes).hexdigest() + ".json"
    layer_name = f"{layer_hex}/layer.tar"
    manifest = [{"Config": cfg_name, "RepoTags": [tag], "Layers": [layer_name]}]

    def add_bytes(tf: tarfile.TarFile, name: str, data: bytes) -> None:
        ti = tarfile.TarInfo(name)
        ti.size, ti.mode, ti.mtime = len(data), 0o644, 0
        tf.addfile(ti, _bytes_io(data))

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", dir=out.parent)
    os.close(fd)
    try:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tf:
            dir_info = tarfile.TarInfo(layer_hex)
            dir_info.type, dir_info.mode = tarfile.DIRTYPE, 0o755
            tf.addfile(dir_info)
            ti = tarfile.TarInfo(layer_name)
            ti.size, ti.mode = rootfs_tar.stat().st_size, 0o644
            with open(rootfs_tar, "rb") as f:
                tf.addfile(ti, f)
            add_bytes(tf, cfg_name, cfg_bytes)
            add_bytes(tf, "manifest.json", json.dumps(manifest).encode())
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return out


def _bytes_io(data: bytes):  # noqa: ANN202
    import io

    return io.BytesIO(data)


def _rootfs(arg: str | None, tmpdir: Path) -> Path:
    if arg:
        p = Path(arg)
        return p if p.exists() else build_debian_rootfs(p)
    return build_debian_rootfs(tmpdir / "rootfs.tar")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m matchlock.image.testimages")
    sub = ap.add_subparsers(dest="verb", required=True)
    p = sub.add_parser("rootfs", help="mmdebstrap a Debian bookworm rootfs tarball")
    p.add_argument("dest")
    for verb, help_ in (
        ("debian", "docker-save tarball: bookworm + curl + python3, Cmd bash"),
        ("user-image", "same rootfs, User nobody, WorkingDir /tmp, Entrypoint/Cmd set"),
    ):
        p = sub.add_parser(verb, help=help_)
        p.add_argument("dest")
        p.add_argument("--rootfs", help="rootfs tarball to reuse (created if missing)")
        p.add_argument("--tag", default=None)
    p = sub.add_parser("wrap", help="wrap an existing rootfs tarball")
    p.add_argument("rootfs")
    p.add_argument("dest")
    p.add_argument("--config", default=json.dumps(DEBIAN_CONFIG), help="OCI config JSON")
    p.add_argument("--tag", default="matchlock-test:latest")
    args = ap.parse_args(argv)

    if args.verb == "rootfs":
        build_debian_rootfs(Path(args.dest))
    elif args.verb == "wrap":
        make_docker_save(Path(args.rootfs), Path(args.dest), json.loads(args.config), tag=args.tag)
    else:
        config = DEBIAN_CONFIG if args.verb == "debian" else USER_IMAGE_CONFIG
        tag = args.tag or f"matchlock-test/{args.verb}:latest"
        with tempfile.TemporaryDirectory(dir=Path(args.dest).resolve().parent) as td:
            rootfs = _rootfs(args.rootfs, Path(td))
            make_docker_save(rootfs, Path(args.dest), config, tag=tag)
    print(args.dest if args.verb != "wrap" else args.dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
