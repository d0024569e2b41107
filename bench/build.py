"""`matchlock build` against Buildah run directly on the host, in one run.

The baseline is the same Buildah (the builder image's own rootfs, unpacked into this
benchmark's temporary directory and entered with chroot in a private mount namespace)
with the same storage driver (overlay on ext4/the host's file system), the same
Dockerfile, context and base image (the built-in busybox one, handed over as an OCI
archive exactly as `matchlock build` does). For each side: a cold build (empty
storage), then a warm one after one context file changed. Prints the ratios and where
matchlock's time goes (VM boot, base image load, context upload, engine, export,
import).

Needs root (chroot, mounts) and the builder image (made on first use).
Run it under the e2e lock: flock /tmp/ml-e2e.lock python bench/build.py

usage: python bench/build.py [--memory MB]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from matchlock.build import builder_name, ensure_builder  # noqa: E402
from matchlock.image import ImageStore  # noqa: E402

DOCKERFILE = """\
FROM matchlock/busybox:latest AS build
ARG VERSION=1
WORKDIR /src
RUN i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; echo $i > /count
COPY . .
RUN echo "version=$VERSION" > /version.txt
FROM matchlock/busybox:latest
COPY --from=build /version.txt /count /app/
COPY changing.txt /app/
ENV APP_MODE=prod
WORKDIR /app
ENTRYPOINT ["cat", "/app/version.txt"]
"""


def make_context(d: Path) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / "Dockerfile").write_text(DOCKERFILE)
    (d / "changing.txt").write_text("one\n")
    for i in range(20):
        (d / f"file{i}.txt").write_text(f"content {i}\n" * 100)


def unpack_builder(dest: Path) -> None:
    store = ImageStore()
    ensure_builder(store, print)
    oci = dest.parent / "builder-oci.tar"
    with open(oci, "wb") as f:
        store.export_oci(builder_name(), f, "builder")
    with tarfile.open(oci) as tf:
        index = json.load(tf.extractfile("index.json"))  # type: ignore[arg-type]
        man_digest = index["manifests"][0]["digest"].split(":")[1]
        manifest = json.load(tf.extractfile(f"blobs/sha256/{man_digest}"))  # type: ignore
        for layer in manifest["layers"]:
            tf.extract(f"blobs/sha256/{layer['digest'].split(':')[1]}", dest.parent)
            blob = dest.parent / "blobs" / "sha256" / layer["digest"].split(":")[1]
            dest.mkdir(exist_ok=True)
            subprocess.run(["tar", "-xf", str(blob), "-C", str(dest)], check=True)
            blob.unlink()
    oci.unlink()


def host_build(rootfs: Path, ctx: Path, cold: bool) -> float:
    """One buildah build in the builder rootfs on the host; seconds."""
    inner = rootfs / "ctx"
    shutil.rmtree(inner, ignore_errors=True)
    shutil.copytree(ctx, inner, symlinks=True)
    if cold:
        shutil.rmtree(rootfs / "var/lib/bench", ignore_errors=True)
        with open(rootfs / "base.tar", "wb") as f:
            ImageStore().export_oci("matchlock/busybox", f, "docker.io/matchlock/busybox:latest")
    s = "--root /var/lib/bench --runroot /run/c --storage-driver overlay"
    load = (f"id=$(buildah {s} pull -q oci-archive:/base.tar) && "
            f"buildah {s} tag $id docker.io/matchlock/busybox:latest && ") if cold else ""
    script = (f"export TMPDIR=/var/tmp HOME=/root; {load}"
              f"buildah {s} bud --isolation chroot --pull=never --layers -t out /ctx "
              f"&& buildah {s} push -q out oci-archive:/out.tar")
    outer = (f"R={rootfs}; mount --bind $R $R && mount -t proc proc $R/proc && "
             f"mount --rbind /dev $R/dev && mount -t tmpfs tmpfs $R/run && "
             f"chroot $R sh -c '{script}'")
    t0 = time.perf_counter()
    subprocess.run(["unshare", "-m", "sh", "-c", outer], check=True, capture_output=True)
    return time.perf_counter() - t0


def ml_build(ctx: Path, memory: int, timings: Path) -> tuple[float, dict]:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "matchlock", "build", "--build-memory", str(memory),
                    "-t", "bench/build:1", str(ctx)], check=True, capture_output=True,
                   env={**os.environ, "MATCHLOCK_TIMINGS": str(timings)})
    return time.perf_counter() - t0, json.loads(timings.read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--memory", type=int, default=1024)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-build-") as td:
        work = Path(td)
        ctx = work / "ctx"
        make_context(ctx)
        rootfs = work / "rootfs"
        unpack_builder(rootfs)

        subprocess.run([sys.executable, "-m", "matchlock", "build", "--prune"], check=True,
                       capture_output=True)
        try:
            ml_cold, t_cold = ml_build(ctx, args.memory, work / "t.json")
            host_cold = host_build(rootfs, ctx, cold=True)
            (ctx / "changing.txt").write_text("two\n")
            ml_warm, t_warm = ml_build(ctx, args.memory, work / "t.json")
            host_warm = host_build(rootfs, ctx, cold=False)
        finally:  # the benchmark's image never stays in the user's `image ls`
            subprocess.run([sys.executable, "-m", "matchlock", "image", "rm", "bench/build:1"],
                           capture_output=True)

    print(f"cold: matchlock {ml_cold:.1f}s  host buildah {host_cold:.1f}s  "
          f"ratio {ml_cold / host_cold:.1f}x")
    print(f"warm: matchlock {ml_warm:.1f}s  host buildah {host_warm:.1f}s  "
          f"ratio {ml_warm / host_warm:.1f}x  (warm/cold matchlock {ml_warm / ml_cold:.2f})")
    for name, t in (("cold", t_cold), ("warm", t_warm)):
        parts = {k: t.get(k, 0.0) for k in ("boot_s", "bases_s", "context_s",
                                            "engine_build_s", "export_s", "import_s")}
        total = t.get("total_s", 0.0) or 1.0
        share = ", ".join(f"{k[:-2]} {v:.1f}s ({100 * v / total:.0f}%)"
                          for k, v in parts.items())
        print(f"{name} matchlock breakdown: {share}; cached steps {t.get('cached_steps')}")


if __name__ == "__main__":
    main()
