"""Registry pulls, against the tools people would otherwise use, in one run.

1. Cold pull + root-disk build of the Debian test image from a local docker-registry,
   against `skopeo copy` of the same image to an OCI layout + `umoci unpack` of it (both
   into this benchmark's temporary directory, on the same filesystem as our store).
   Target <= 1.0x. Also reports where our time goes: download, verify (hashing), unpack,
   disk build; and, for reference, umoci unpacking into tmpfs.
2. Warm `run` of the pulled image against `run` of the same image imported from a tarball:
   the pull path must not slow down a warm start. Target <= 1.02x.

Runs are interleaved; medians are reported. Needs docker-registry, skopeo and umoci
(scripts/install.sh) and the Debian test image (built once into the cache if missing).

usage: python bench/pull.py [-n RUNS] [--runs-warm N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import env, matchlock_cmd, median

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.e2e._registry import Registry  # noqa: E402

from matchlock.paths import cache_dir  # noqa: E402

PULL = (
    "import json, sys; from matchlock.image import ImageStore; "
    "r = ImageStore().pull(sys.argv[1]); print(json.dumps(r.timings))"
)


def debian_tarball() -> Path:
    out = cache_dir() / "test-images" / "debian-bookworm.tar"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "matchlock.image.testimages", "debian",
                        str(out)], check=True, env=env())
    return out


def ours(ref: str, store: Path) -> tuple[float, dict]:
    shutil.rmtree(store, ignore_errors=True)
    e = {**env(), "MATCHLOCK_IMAGES_DIR": str(store), "NO_PROXY": "127.0.0.1"}
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", PULL, ref], env=e, capture_output=True,
                       text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"pull failed: {p.stderr.strip()[-500:]}")
    return wall, json.loads(p.stdout.strip().splitlines()[-1])


def baseline(ref: str, tmp: Path, unpack_to: Path) -> tuple[float, float, float]:
    """skopeo copy docker:// -> oci:, then umoci unpack; returns (total, copy, unpack)."""
    layout, bundle = tmp / "oci", unpack_to / "bundle"
    shutil.rmtree(layout, ignore_errors=True)
    shutil.rmtree(bundle, ignore_errors=True)
    e = {**os.environ, "NO_PROXY": "127.0.0.1"}
    t0 = time.perf_counter()
    subprocess.run(["skopeo", "copy", "-q", "--src-tls-verify=false", f"docker://{ref}",
                    f"oci:{layout}:bench"], check=True, env=e)
    t1 = time.perf_counter()
    cmd = ["umoci", "unpack"] + ([] if os.geteuid() == 0 else ["--rootless"])
    subprocess.run([*cmd, "--image", f"{layout}:bench", str(bundle)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t2 = time.perf_counter()
    shutil.rmtree(bundle, ignore_errors=True)
    return t2 - t0, t1 - t0, t2 - t1


def warm_run(image: str, store: Path) -> tuple[float, float]:
    """(wall time, time of the host-side preparation that includes the image lookup)."""
    timings = store.parent / f"timings-{store.name}.json"
    e = {**env(), "MATCHLOCK_IMAGES_DIR": str(store), "NO_PROXY": "127.0.0.1",
         "MATCHLOCK_TIMINGS": str(timings)}
    t0 = time.perf_counter()
    p = subprocess.run([*matchlock_cmd(), "run", "--image", image, "--no-network", "true"],
                       env=e, capture_output=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0 or b"Built rootfs" in p.stderr:
        raise SystemExit(f"warm run of {image} failed or was not warm: {p.stderr.decode()}")
    return wall, json.loads(timings.read_text()).get("prepare_assets", 0.0)


def report_cold(base_t, copy_t, unpack_t, shm_t, ours_t, parts) -> None:  # noqa: ANN001
    o, b = median(ours_t), median(base_t)
    print(f"skopeo copy + umoci unpack: median {b:.2f} s  "
          f"(copy {median(copy_t):.2f}, unpack {median(unpack_t):.2f})  "
          f"{[round(x, 2) for x in base_t]}")
    print(f"  (umoci unpacking into tmpfs instead: median {median(shm_t):.2f} s)")
    print(f"matchlock pull (cold, + disk): median {o:.2f} s  "
          f"{[round(x, 2) for x in ours_t]}")
    keys = ("resolve_s", "download_s", "verify_s", "unpack_s", "mkfs_s")
    med = {k: median([p.get(k, 0.0) for p in parts]) for k in keys}
    tot = median([p["total_s"] for p in parts])
    shares = ", ".join(
        f"{k[:-2]} {med[k]:.2f} s ({100 * med[k] / tot:.0f}%)" for k in keys)
    print(f"  where the time goes (in-process total {tot:.2f} s): {shares}"
          f"  [verify overlaps download]")
    print(f"ratio pull/(skopeo+umoci): {o / b:.2f}  (target <= 1.0)")
    print(f"ratio pull/(skopeo+umoci into tmpfs): {o / median(shm_t):.2f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=3, help="cold pull rounds")
    ap.add_argument("--runs-warm", type=int, default=10, help="warm run rounds")
    ap.add_argument("--skip-cold", action="store_true", help="only the warm-run comparison")
    args = ap.parse_args()
    for tool in ("skopeo", "umoci"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} not found: run ./scripts/install.sh")
    tarball = debian_tarball()
    with tempfile.TemporaryDirectory(prefix="ml-bench-pull-", dir=os.environ.get("TMPDIR")) \
            as d:
        tmp = Path(d)
        reg = Registry(tmp / "registry").start()
        try:
            reg.push(f"docker-archive:{tarball}", "bench/debian:1")
            ref = f"{reg.host}/bench/debian:1"
            if args.skip_cold:
                ours(ref, tmp / "store")
            shm = Path(tempfile.mkdtemp(prefix="ml-bench-umoci-", dir="/dev/shm"))
            try:
                ours_t, parts, base_t, copy_t, unpack_t, shm_t = [], [], [], [], [], []
                if not args.skip_cold:  # warm the registry's and the page cache once
                    baseline(ref, tmp, tmp)
                for _ in range(0 if args.skip_cold else args.n):
                    total, c, u = baseline(ref, tmp, tmp)
                    base_t.append(total)
                    copy_t.append(c)
                    unpack_t.append(u)
                    wall, t = ours(ref, tmp / "store")
                    ours_t.append(wall)
                    parts.append(t)
                    shm_t.append(baseline(ref, tmp, shm)[0])
            finally:
                shutil.rmtree(shm, ignore_errors=True)

            if not args.skip_cold:
                report_cold(base_t, copy_t, unpack_t, shm_t, ours_t, parts)

            # ---- warm run: pulled vs imported ------------------------------------------
            pulled_store, imported_store = tmp / "store", tmp / "store-imported"
            e = {**env(), "MATCHLOCK_IMAGES_DIR": str(imported_store)}
            subprocess.run([*matchlock_cmd(), "image", "import", "bench/debian:imported",
                            str(tarball)], check=True, env=e, capture_output=True)
            warm_run(ref, pulled_store)  # first boots warm the kernel/initramfs caches
            warm_run("bench/debian:imported", imported_store)
            mark = reg.mark()
            pulled, imported = [], []
            for i in range(args.runs_warm):  # ABBA order: drift of the machine cancels out
                order = [(pulled, ref, pulled_store),
                         (imported, "bench/debian:imported", imported_store)]
                for out, image, store in order if i % 2 == 0 else order[::-1]:
                    out.append(warm_run(image, store))
            mp, mi = median([w for w, _ in pulled]), median([w for w, _ in imported])
            lp, li = min(w for w, _ in pulled), min(w for w, _ in imported)
            pp, pi = median([x for _, x in pulled]), median([x for _, x in imported])
            print(f"warm run, imported image: median {mi:.3f} s  min {li:.3f} s  "
                  f"{[round(w, 2) for w, _ in imported]}")
            print(f"warm run, pulled image:   median {mp:.3f} s  min {lp:.3f} s  "
                  f"{[round(w, 2) for w, _ in pulled]}")
            print(f"  host preparation incl. image lookup: pulled {1000 * pp:.1f} ms, "
                  f"imported {1000 * pi:.1f} ms")
            print(f"ratio pulled/imported: median {mp / mi:.3f}, min {lp / li:.3f}  "
                  "(target <= 1.02)")
            print(f"registry requests during the warm runs: {len(reg.since(mark))}")
        finally:
            reg.stop()


if __name__ == "__main__":
    main()
