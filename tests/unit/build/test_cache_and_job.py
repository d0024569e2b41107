"""The build cache disk and its lock, request checks and the engine's commands (no VM)."""

from __future__ import annotations

import fcntl
import os
import shlex
import subprocess
import threading
from pathlib import Path

import pytest

from matchlock.build import _cache
from matchlock.build._engine import Buildah, BuildSpec
from matchlock.build._job import BuildRequest, _Tail, check
from matchlock.errors import MatchlockError, UsageError


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("MATCHLOCK_CACHE_DIR", str(tmp_path))
    return tmp_path / "build"


def test_disk_created_then_grown_never_shrunk(cache) -> None:
    p = _cache.ensure_disk(1024)
    assert p.stat().st_size == 1024 << 20
    assert b"matchlock-build" in subprocess.run(
        ["/sbin/dumpe2fs", "-h", str(p)], capture_output=True).stdout
    _cache.ensure_disk(1536)
    assert p.stat().st_size == 1536 << 20
    r = subprocess.run(["/sbin/dumpe2fs", "-h", str(p)], capture_output=True, text=True)
    blocks = next(int(x.split(":")[1]) for x in r.stdout.splitlines()
                  if x.startswith("Block count:"))
    assert blocks * 4096 == 1536 << 20  # resize2fs grew the file system too
    _cache.ensure_disk(1024)
    assert p.stat().st_size == 1536 << 20
    assert _cache.prune() > 0 and not p.exists()
    assert _cache.prune() == 0  # nothing to remove is not an error


def test_second_build_waits_for_the_lock(cache) -> None:
    waited = threading.Event()
    got = threading.Event()
    with _cache.locked():
        def second() -> None:
            with _cache.locked(waited.set):
                got.set()
        t = threading.Thread(target=second)
        t.start()
        assert waited.wait(5)  # it said it waits ...
        assert not got.is_set()  # ... and does
    t.join(5)
    assert got.is_set()


def test_lock_nonblocking_fails_clearly(cache) -> None:
    cache.mkdir(parents=True)
    fd = os.open(cache / "cache.ext4.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(MatchlockError, match="in use by another build"), \
                _cache.locked(block=False):
            pass
    finally:
        os.close(fd)


def _req(tmp_path: Path, **kw) -> BuildRequest:
    ctx = tmp_path / "ctx"
    ctx.mkdir(exist_ok=True)
    df = ctx / "Dockerfile"
    if not df.exists():
        df.write_text("FROM scratch\n")
    return BuildRequest(**({"context": ctx, "dockerfile": df, "tag": "a:1"} | kw))


@pytest.mark.parametrize(("kw", "msg"), [
    ({"tag": ""}, "-t/--tag is required when building from a Dockerfile"),
    ({"tag": "a@sha256:" + "0" * 64}, "contains a digest"),
    ({"context": Path("/nonexistent/ctx")}, "does not exist"),
    ({"dockerfile": Path("/nonexistent/Dockerfile")}, "not found"),
    ({"build_args": (("1BAD", "x"),)}, "not a valid name"),
    ({"disk_mib": 10}, "at least 1024 MB"),
])
def test_check_rejects(tmp_path, kw, msg) -> None:
    with pytest.raises(UsageError, match=msg.replace("(", r"\(")):
        check(_req(tmp_path, **kw))


def test_check_normalises_tag(tmp_path) -> None:
    assert check(_req(tmp_path, tag="myagent")) == "myagent:latest"


def test_buildah_build_command() -> None:
    eng = Buildah()
    eng.prepare("/var/lib/containers/storage")
    argv = shlex.split(eng.build(BuildSpec(
        dockerfile_name="Dockerfile", build_args=(("V", "a b"),), target="app",
        no_cache=True, secrets=("TOKEN",), ca_bundle="/etc/ssl/certs/ca-certificates.crt"),
        "localhost/out:latest"))
    assert argv[:1] == ["buildah"] and "bud" in argv
    assert "--pull=never" in argv and "--no-cache" in argv
    assert argv[argv.index("--isolation") + 1] == "chroot"
    assert argv[argv.index("--target") + 1] == "app"
    assert argv[argv.index("--build-arg") + 1] == "V=a b"
    assert argv[argv.index("--secret") + 1] == \
        "id=TOKEN,env=TOKEN"
    assert argv[argv.index("-v") + 1].endswith(":ro")
    assert argv[-1] == "/run/matchlock-build/context"


def test_tail_tracks_step_and_cache_hits() -> None:
    seen = bytearray()
    t = _Tail(seen.extend)
    t.feed(b"STEP 1/3: FROM x\n--> Using cache abc\n--> abc\nSTEP 2/3: RUN ex")
    t.feed(b"it 3\nboom\n")
    assert t.step == "RUN exit 3" and t.cached_steps == 1
    assert bytes(seen).endswith(b"boom\n")
    t.feed(b"[2/2] STEP 4/9: RUN make\n")
    assert t.step == "RUN make"


def test_builtin_base_is_made_not_pulled(tmp_path) -> None:
    """FROM matchlock/busybox on an empty store: made as `run` makes it, no registry."""
    from matchlock.build._job import BuildJob
    from matchlock.image import ImageStore

    store = ImageStore(tmp_path / "store")
    req = _req(tmp_path)
    req.dockerfile.write_text("FROM matchlock/busybox AS a\nFROM a\nRUN true\n")
    job = BuildJob(req, progress=lambda _m: None, output=lambda _b: None, store=store)
    [base] = job._bases()
    assert base.name == "matchlock/busybox:latest" and base.source == "builtin"
