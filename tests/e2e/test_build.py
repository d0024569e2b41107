"""`matchlock build`: Buildah in a builder VM, base images from the local store, the
result imported with its config and run. Offline: the base image is the built-in busybox
one (from the store, handed to the engine as an OCI archive; no registry involved).

The builder image is made once (mmdebstrap) into the shared cache and reused.
"""

from __future__ import annotations

import json
import tarfile
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import NO_RESIDUE, residue

BUILD_FLAGS = ("--build-memory", "1024", "--build-cpus", "2")

# A multi-stage Dockerfile touching FROM/ARG/COPY/RUN/ENV/WORKDIR/USER/ENTRYPOINT/CMD.
DOCKERFILE = """\
ARG BASE=matchlock/busybox:latest
FROM ${BASE} AS build
ARG VERSION=0
WORKDIR /src
COPY . .
RUN echo "version=$VERSION" > /version.txt && ls -A /src | sort > /listing.txt
FROM ${BASE} AS app
ARG VERSION
RUN echo "app:x:1234:1234:app:/home/app:/bin/sh" >> /etc/passwd && \\
    echo "app:x:1234:" >> /etc/group && mkdir -p /home/app && chown 1234:1234 /home/app
COPY --from=build /version.txt /listing.txt /app/
COPY --chown=app app.sh /app/app.sh
ENV APP_MODE=prod APP_VERSION=${VERSION}
WORKDIR /app
USER app
EXPOSE 8080/tcp
ENTRYPOINT ["/bin/sh", "/app/app.sh"]
CMD ["default-arg"]
FROM app AS extra
RUN touch /app/extra-stage
"""
APP_SH = 'echo "args=$*"; echo "user=$(id -un) uid=$(id -u)"; echo "pwd=$(pwd)"; ' \
    'echo "mode=$APP_MODE v=$APP_VERSION"; cat /app/version.txt; cat /app/listing.txt\n'


@pytest.fixture(scope="module")
def ctx(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("buildctx")
    (d / "Dockerfile").write_text(DOCKERFILE)
    (d / "app.sh").write_text(APP_SH)
    (d / "kept.txt").write_text("kept\n")
    (d / "secret.txt").write_text("must not be sent\n")
    (d / "junk").mkdir()
    (d / "junk" / "a.tmp").write_text("x")
    (d / "junk" / "keep.me").write_text("x")
    (d / ".dockerignore").write_text("secret.txt\n**/*.tmp\n")
    return d


def _image(ml, tag: str) -> dict | None:
    out = json.loads(ml("image", "ls", "--json", check=True).stdout)
    return next((i for i in out if i["tag"] == tag), None)


@pytest.fixture(scope="module")
def built(ml, ctx, qemu_present) -> dict:
    """One build of the multi-stage file (target `app`), shared by the checks below."""
    ml("image", "rm", "e2e/built:1")
    t0 = time.monotonic()
    p = ml("build", *BUILD_FLAGS, "-t", "e2e/built:1", "--build-arg", "VERSION=2",
           "--target", "app", str(ctx), timeout=1800)
    took = time.monotonic() - t0
    assert p.returncode == 0, p.stderr.decode()[-3000:]
    return {"proc": p, "seconds": took}


def test_build_output_and_store(ml, built) -> None:
    p = built["proc"]
    out, err = p.stdout.decode(), p.stderr.decode()
    assert "Successfully built and tagged e2e/built:1" in out
    assert "Layers: " in out and "Size: " in out
    # The engine's own step output is streamed to us.
    assert "STEP" in err and "COPY . ." in err, err[-2000:]
    img = _image(ml, "e2e/built:1")
    assert img is not None and img["source"] == "import"
    cfg = img["config"]
    assert cfg["user"] == "app"
    assert cfg["working_dir"] == "/app"
    assert cfg["entrypoint"] == ["/bin/sh", "/app/app.sh"]
    assert cfg["cmd"] == ["default-arg"]
    assert "APP_MODE=prod" in cfg["env"] and "APP_VERSION=2" in cfg["env"]
    assert cfg["exposed_ports"] == ["8080/tcp"]


def test_built_image_runs_with_its_config(ml, built) -> None:
    p = ml("run", "--image", "e2e/built:1", "--no-network", timeout=300)
    out = p.stdout.decode()
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    assert "args=default-arg" in out
    assert "user=app uid=1234" in out
    assert "pwd=/app" in out
    assert "mode=prod v=2" in out
    assert "version=2" in out  # ARG through a multi-stage COPY --from
    listing = out.split("version=2", 1)[1].split()
    # .dockerignore: secret.txt and *.tmp stayed on the host; the rest was sent.
    assert "kept.txt" in listing and "junk" in listing and "app.sh" in listing
    assert "secret.txt" not in listing
    q = ml("run", "--image", "e2e/built:1", "--no-network", "--entrypoint", "",
           "ls", "/app/junk-check-none", timeout=300)
    assert q.returncode != 0  # (control: a missing path fails, so `ls` output is real)
    r = ml("run", "--image", "e2e/built:1", "--no-network", "--entrypoint", "",
           "sh", "-c", "ls /app; test ! -e /app/extra-stage && echo no-extra", timeout=300)
    assert "no-extra" in r.stdout.decode()  # --target app stopped before `extra`


def test_failing_run_exit_code_and_store_unchanged(ml, tmp_path, built) -> None:
    (tmp_path / "Dockerfile").write_text(
        "FROM matchlock/busybox:latest\nRUN echo step-one\nRUN echo failing-now; exit 7\n")
    before = json.loads(ml("image", "ls", "--json", check=True).stdout)
    p = ml("build", *BUILD_FLAGS, "-t", "e2e/fails:1", str(tmp_path), timeout=1800)
    err = p.stderr.decode()
    assert p.returncode == 7, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "exit 7" in last
    assert "RUN echo failing-now; exit 7" in last
    assert "failing-now" in err  # the step's own output was streamed
    after = json.loads(ml("image", "ls", "--json", check=True).stdout)
    assert [i["tag"] for i in after] == [i["tag"] for i in before]
    assert _image(ml, "e2e/fails:1") is None


def test_rebuild_reuses_cached_layers(ml, tmp_path, built) -> None:
    """Cold (empty cache) against warm after one file changed: the early steps come
    from the cache, and the engine's build takes at most 0.3 of the cold one. The
    engine's time, not the whole command's: booting the builder, exporting and importing
    cost the same either way and swing with the machine's load (the whole command came
    out at 0.31-0.44 on a loaded machine with the steps cached)."""
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(
        "FROM matchlock/busybox:latest\n"
        # An expensive step (about a minute of CPU under TCG) before the COPY.
        "RUN i=0; while [ $i -lt 800000 ]; do i=$((i+1)); done; echo $i > /count\n"
        "RUN echo second > /second\n"
        "COPY changing.txt /changing.txt\n")
    (ctx / "changing.txt").write_text("one\n")
    assert ml("build", "--prune", check=True).returncode == 0
    cold_t, warm_t = tmp_path / "cold.json", tmp_path / "warm.json"
    t0 = time.monotonic()
    cold = ml("build", *BUILD_FLAGS, "-t", "e2e/cache:1", str(ctx), timeout=1800,
              env={"MATCHLOCK_TIMINGS": str(cold_t)})
    cold_s = time.monotonic() - t0
    assert cold.returncode == 0, cold.stderr.decode()[-2000:]
    (ctx / "changing.txt").write_text("two\n")
    t0 = time.monotonic()
    warm = ml("build", *BUILD_FLAGS, "-t", "e2e/cache:2", str(ctx), timeout=1800,
              env={"MATCHLOCK_TIMINGS": str(warm_t)})
    warm_s = time.monotonic() - t0
    assert warm.returncode == 0, warm.stderr.decode()[-2000:]
    err = warm.stderr.decode()
    assert err.count("Using cache") >= 2, err[-2000:]
    cold_j, warm_j = json.loads(cold_t.read_text()), json.loads(warm_t.read_text())
    assert warm_j["cached_steps"] >= 2 and cold_j["cached_steps"] == 0
    cold_e, warm_e = cold_j["engine_build_s"], warm_j["engine_build_s"]
    print(f"cold build {cold_s:.1f}s (engine {cold_e:.1f}s), warm build {warm_s:.1f}s "
          f"(engine {warm_e:.1f}s, {warm_e / cold_e:.2f})")
    assert warm_e <= 0.3 * cold_e, f"engine: warm {warm_e:.1f}s vs cold {cold_e:.1f}s"
    assert warm_s < cold_s, f"warm {warm_s:.1f}s vs cold {cold_s:.1f}s"
    out = ml("run", "--image", "e2e/cache:2", "--no-network", "cat", "/changing.txt",
             timeout=300)
    assert out.stdout.decode().strip() == "two"


def test_no_cache_rebuilds_every_step(ml, tmp_path, built) -> None:
    (tmp_path / "Dockerfile").write_text("FROM matchlock/busybox:latest\nRUN echo nc > /nc\n")
    p = ml("build", *BUILD_FLAGS, "--no-cache", "-t", "e2e/nocache:1", str(tmp_path),
           timeout=1800)
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    assert "Using cache" not in p.stderr.decode()


def test_dockerfile_outside_context(ml, tmp_path, built) -> None:
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "data.txt").write_text("from-context\n")
    df = tmp_path / "elsewhere" / "build.df"
    df.parent.mkdir()
    df.write_text("FROM matchlock/busybox:latest\nCOPY data.txt /data.txt\n"
                  'CMD ["cat", "/data.txt"]\n')
    p = ml("build", *BUILD_FLAGS, "-f", str(df), "-t", "e2e/fpath:1", str(ctx), timeout=1800)
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    r = ml("run", "--image", "e2e/fpath:1", "--no-network", timeout=300)
    assert r.stdout.decode().strip() == "from-context"


def test_exported_layers_hold_no_context_secret(ml, built, tmp_path) -> None:
    """What .dockerignore left out is in no layer of the stored result."""
    from matchlock.image import ImageStore

    out = tmp_path / "img.tar"
    with open(out, "wb") as f:
        ImageStore().export_oci("e2e/built:1", f, "x")
    with tarfile.open(out) as tf:
        for m in tf.getmembers():
            if not m.isfile():
                continue
            data = tf.extractfile(m).read()  # type: ignore[union-attr]
            assert b"must not be sent" not in data


# ---- bad input: one line, non-zero, nothing left behind (no VM is booted) ----------------


@pytest.mark.parametrize("case", ["no-dockerfile", "no-tag", "no-context", "bad-base"])
def test_bad_input(ml, tmp_path, state_home, case) -> None:
    ctx = tmp_path / "c"
    ctx.mkdir()
    args = ["-t", "e2e/bad:1", str(ctx)]
    if case == "no-dockerfile":
        want = "Dockerfile"
    elif case == "no-tag":
        (ctx / "Dockerfile").write_text("FROM matchlock/busybox:latest\n")
        args = [str(ctx)]
        want = "-t/--tag is required when building from a Dockerfile"
    elif case == "no-context":
        args = ["-t", "e2e/bad:1", str(tmp_path / "missing")]
        want = "does not exist"
    else:
        (ctx / "Dockerfile").write_text("FROM e2e-no-such/image:404\nRUN true\n")
        want = "unknown base image 'e2e-no-such/image:404'"
    p = ml("build", *BUILD_FLAGS, *args, timeout=300)
    err = p.stderr.decode().strip()
    assert p.returncode != 0
    assert want in err.splitlines()[-1], err
    assert err.splitlines()[-1].startswith("error: ")
    assert "Traceback" not in err
    assert residue(state_home) == NO_RESIDUE
    assert _image(ml, "e2e/bad:1") is None


def test_second_build_waits_for_cache_lock_then_ctrl_c_leaves_nothing(
        ml_env, tmp_path, state_home, built) -> None:
    """A build that finds the cache locked says so and waits; once it has it and its
    engine runs, SIGINT stops it: exit 130, no VM, no image, lock released."""
    import fcntl
    import os
    import signal
    import subprocess
    import sys

    from matchlock.build._cache import cache_root

    (tmp_path / "Dockerfile").write_text(
        "FROM matchlock/busybox:latest\nRUN echo started-slow-step; sleep 600\n")
    fd = os.open(cache_root() / "cache.ext4.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as another build would
    err_path = tmp_path / "err"
    with open(err_path, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "matchlock", "build", *BUILD_FLAGS,
                                 "-t", "e2e/interrupted:1", str(tmp_path)],
                                env=ml_env, stdout=subprocess.PIPE, stderr=err)
    try:
        def wait_for(text: str, timeout: float) -> None:
            deadline = time.monotonic() + timeout
            while text not in err_path.read_text():
                assert proc.poll() is None, err_path.read_text()
                assert time.monotonic() < deadline, err_path.read_text()
                time.sleep(0.2)

        wait_for("Waiting for build cache lock…", 60)
        assert "Starting the builder VM" not in err_path.read_text()
        os.close(fd)
        fd = -1
        wait_for("started-slow-step", 900)
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(60)
    finally:
        if fd >= 0:
            os.close(fd)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == 130, err_path.read_text()[-2000:]
    assert "interrupted" in err_path.read_text().strip().splitlines()[-1]
    assert residue(state_home) == NO_RESIDUE
    from matchlock.image import ImageStore

    assert all(i.name != "e2e/interrupted:1" for i in ImageStore().list())
    lock = os.open(cache_root() / "cache.ext4.lock", os.O_RDWR)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released by the build
    finally:
        os.close(lock)
