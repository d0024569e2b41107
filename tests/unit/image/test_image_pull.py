"""ImageStore.pull/resolve/build/tag/gc against an in-memory registry, with real disk builds."""

from __future__ import annotations

import fcntl
import gzip
import json
import os
import sqlite3
import threading
from pathlib import Path

import pytest
from fake_registry import HOST, FakeRegistry, Fault, digest
from image_helpers import DEBUGFS, cat, compress, d, f, layer, leftovers

from matchlock.errors import IntegrityError, MatchlockError, NotFoundError
from matchlock.image import ImageStore, PullProgress
from matchlock.image._auth import Credentials

BASE = layer(d("bin"), f("bin/base", "base layer"), d("etc"), f("etc/os", "fake"))
APP_A = layer(f("app", "A"))
APP_B = layer(f("app", "B"), f(".wh.nothing"))


@pytest.fixture(autouse=True)
def _tools():
    if DEBUGFS is None:
        pytest.fail("debugfs not found: install e2fsprogs (./scripts/install.sh)", False)


def store_for(root: Path, reg: FakeRegistry, creds: Credentials | None = None) -> ImageStore:
    return ImageStore(root, registry={"transport": reg.transport(), "backoff_s": 0.0,
                                      "credentials": lambda _r: creds})


@pytest.fixture
def reg():
    r = FakeRegistry()
    r.push_image("app", "a", [BASE, APP_A], {"Cmd": ["/bin/base"], "Env": ["X=1"],
                                              "WorkingDir": "/w", "User": "7",
                                              "ExposedPorts": {"8080/tcp": {}, "53/udp": {}}})
    r.push_image("app", "b", [BASE, APP_B])
    return r


def snapshot(root: Path) -> dict:
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*")
                   if p.is_file() and p.suffix not in (".lock", ".db-wal", ".db-shm")
                   and p.name not in (".lock", "images.db"))
    rows = []
    if (root / "images.db").exists():
        c = sqlite3.connect(root / "images.db")
        rows = c.execute("SELECT name, id FROM images ORDER BY name").fetchall()
        rows += c.execute("SELECT * FROM layers ORDER BY image_id, ordinal").fetchall()
        c.close()
    return {"files": files, "rows": rows}


def test_pull_builds_disk_and_keeps_config(tmp_path, reg):
    store = store_for(tmp_path / "s", reg)
    res = store.pull(f"{HOST}/app:a")
    img = res.image
    assert not res.cached and res.built and res.layers == 2 and res.reused_layers == 0
    assert img.name == f"{HOST}/app:a" and img.source == "registry"
    assert img.digest.startswith("sha256:") and img.platform == "linux/amd64"
    assert cat(img.disk, "/bin/base") == b"base layer"
    assert cat(img.disk, "/app") == b"A"
    assert img.config.cmd == ("/bin/base",) and img.config.env == ("X=1",)
    assert (img.config.working_dir, img.config.user) == ("/w", "7")
    assert img.config.exposed_ports == ("53/udp", "8080/tcp")
    assert (img.disk.stat().st_mode & 0o777) == 0o444
    assert leftovers(store.root) and not list((store.root / "tmp").iterdir())
    [listed] = store.list()
    assert listed.name == img.name and listed.digest == img.digest


def test_stored_image_never_touches_the_network(tmp_path, reg):
    store = store_for(tmp_path / "s", reg)
    store.pull(f"{HOST}/app:a")
    n = len(reg.requests)
    assert store.pull(f"{HOST}/app:a").cached
    img = store.resolve(f"{HOST}/app:a")
    assert store.build(f"{HOST}/app:a").cached
    assert len(reg.requests) == n
    assert img.lease is not None


def test_shared_base_layer_is_fetched_once(tmp_path, reg):
    store = store_for(tmp_path / "s", reg)
    store.pull(f"{HOST}/app:a")
    before = reg.blob_requests()
    res = store.pull(f"{HOST}/app:b")
    new = reg.blob_requests()[len(before):]
    base_blob = digest(gzip.compress(BASE, mtime=0))
    assert res.reused_layers == 1
    assert not any(base_blob in p for p in new)
    assert len(new) == 2  # the config and the one new layer
    assert cat(res.image.disk, "/app") == b"B"
    assert len(list((store.root / "blobs" / "sha256").iterdir())) == 3


def test_force_pull_follows_a_repushed_tag(tmp_path, reg):
    store = store_for(tmp_path / "s", reg)
    first = store.pull(f"{HOST}/app:a").image
    n = len(reg.blob_requests())
    # Unchanged tag: manifest and config only, the disk is reused.
    same = store.pull(f"{HOST}/app:a", force=True)
    assert same.image.id == first.id and not same.built
    assert len(reg.blob_requests()) == n + 1
    reg.push_image("app", "a", [BASE, layer(f("app", "A2"))])
    new = store.pull(f"{HOST}/app:a", force=True).image
    assert new.id != first.id and cat(new.disk, "/app") == b"A2"
    assert not first.disk.exists()  # the old image's disk went with its last name
    assert [i.name for i in store.list()] == [f"{HOST}/app:a"]


def test_pull_by_digest_and_tag(tmp_path, reg):
    store = store_for(tmp_path / "s", reg)
    md = next(k for k, v in reg.manifests["app"].items()
              if k.startswith("sha256:") and v == reg.manifests["app"]["a"])
    img = store.pull(f"{HOST}/app@{md}").image
    assert img.name == f"{HOST}/app@{md}" and img.digest == md
    tagged = store.tag(img.name, "mine:1")
    assert tagged.source == "tag" and tagged.id == img.id
    store.remove(img.name)
    assert store.get("mine:1").disk.exists()
    store.remove("mine:1")
    assert leftovers(store.root) == []


def test_corrupt_blob_leaves_the_store_as_it_was(tmp_path, reg):
    store = store_for(tmp_path / "s", reg)
    store.pull(f"{HOST}/app:a")
    before = snapshot(store.root)
    blob = digest(gzip.compress(APP_B, mtime=0))
    good = reg.blobs[blob]
    reg.faults[f"/v2/app/blobs/{blob}"] = Fault(body=good[:-2] + b"xx", times=99)
    with pytest.raises(IntegrityError, match=blob):
        store.pull(f"{HOST}/app:b")
    assert snapshot(store.root) == before


def test_interrupted_pull_registers_nothing_and_the_next_succeeds(tmp_path, reg):
    store = store_for(tmp_path / "s", reg)

    class Boom(Exception):
        pass

    class Stop(PullProgress):
        def advance(self, digest: str, n: int) -> None:
            raise Boom  # the pull dies in the middle of a download

    with pytest.raises(Boom):
        store.pull(f"{HOST}/app:a", progress=Stop())
    assert store.list() == [] and leftovers(store.root) == []
    assert store.pull(f"{HOST}/app:a").image.disk.exists()


def test_staging_of_a_dead_process_is_swept(tmp_path, reg):
    store = store_for(tmp_path / "s", reg)
    store.pull(f"{HOST}/app:a")
    dead = store.root / "tmp" / "work-dead"
    dead.mkdir()
    (dead / ".lock").touch()
    (dead / "blob-x").write_bytes(b"partial")
    shm = Path("/dev/shm/matchlock-unpack-testdead")
    shm.mkdir(exist_ok=True)
    (dead / "unpack-dir").write_text(str(shm))
    alive = store.root / "tmp" / "work-alive"
    alive.mkdir()
    fd = os.open(alive / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        orphan = store.root / "blobs" / "sha256" / ("0" * 64)
        orphan.write_bytes(b"junk")
        res = store.gc()
        assert (res.staging, res.blobs) == (1, 1)
        assert not dead.exists() and not shm.exists() and alive.exists()
        assert not orphan.exists()
    finally:
        os.close(fd)
    assert store.gc().staging == 1


def test_concurrent_pulls_of_one_image(tmp_path, reg):
    results: list = []
    errors: list = []

    def go():
        try:
            results.append(store_for(tmp_path / "s", reg).pull(f"{HOST}/app:a"))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=go) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(results) == 3
    assert sum(not r.cached for r in results) == 1  # the others waited and found it stored
    store = ImageStore(tmp_path / "s")
    assert len(list((store.root / "disks").iterdir())) == 1
    assert cat(store.get(f"{HOST}/app:a").disk, "/app") == b"A"


def test_rm_of_an_image_in_use_keeps_its_disk_until_gc(tmp_path, reg):
    store = store_for(tmp_path / "s", reg)
    store.pull(f"{HOST}/app:a")
    in_use = store.resolve(f"{HOST}/app:a")  # what a VM holds while it runs
    store.remove(f"{HOST}/app:a")
    assert in_use.disk.exists() and cat(in_use.disk, "/app") == b"A"
    res = store.gc()
    assert res.kept_in_use == 1 and in_use.disk.exists()
    in_use.lease.close()  # the VM stopped
    res = store.gc()
    assert res.disks == 1 and not in_use.disk.exists()
    assert leftovers(store.root) == []


def test_build_rebuilds_a_lost_disk_without_the_registry(tmp_path, reg):
    store = store_for(tmp_path / "s", reg)
    img = store.pull(f"{HOST}/app:a").image
    img.disk.unlink()
    n = len(reg.requests)
    res = store.build(f"{HOST}/app:a")
    assert res.built and len(reg.requests) == n
    assert cat(res.image.disk, "/app") == b"A"
    # And run's resolve does the same.
    res.image.disk.unlink()
    assert cat(store.resolve(f"{HOST}/app:a").disk, "/app") == b"A"
    assert len(reg.requests) == n


@pytest.mark.parametrize("how", [None, "zstd", "gzip"])
def test_layer_compressions(tmp_path, how):
    reg = FakeRegistry()
    raw = layer(f("file", f"compressed with {how}"))
    cfg_blob = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                           "rootfs": {"type": "layers",
                                      "diff_ids": [digest(raw)]}}).encode()
    mt = {None: "tar", "zstd": "tar+zstd", "gzip": "tar+gzip"}[how]
    m = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
         "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                    **reg.add_blob(cfg_blob)},
         "layers": [{"mediaType": f"application/vnd.oci.image.layer.v1.{mt}",
                     **reg.add_blob(compress(raw, how))}]}
    reg.put_manifest("c", "1", json.dumps(m).encode(), m["mediaType"])
    img = store_for(tmp_path / "s", reg).pull(f"{HOST}/c:1").image
    assert cat(img.disk, "/file") == f"compressed with {how}".encode()


def test_diff_id_mismatch_is_refused(tmp_path):
    reg = FakeRegistry()
    reg.push_image("x", "1", [layer(f("a", "1"))])
    cfg_digest = next(k for k, v in reg.blobs.items() if b'"rootfs"' in v)
    cfg = json.loads(reg.blobs[cfg_digest])
    cfg["rootfs"]["diff_ids"] = ["sha256:" + "1" * 64]
    new_cfg = json.dumps(cfg).encode()
    body = reg.manifests["x"]["1"][0].replace(cfg_digest.encode(), digest(new_cfg).encode())
    body = body.replace(f'"size": {len(reg.blobs[cfg_digest])}'.encode(),
                        f'"size": {len(new_cfg)}'.encode())
    reg.add_blob(new_cfg)
    reg.put_manifest("x", "1", body, reg.manifests["x"]["1"][1])
    store = store_for(tmp_path / "s", reg)
    with pytest.raises(MatchlockError, match="but the image config says sha256:1111"):
        store.pull(f"{HOST}/x:1")
    assert leftovers(store.root) == []


def test_errors_say_what_to_do(tmp_path, reg):
    store = store_for(tmp_path / "s", reg)
    with pytest.raises(NotFoundError) as ei:
        store.pull(f"{HOST}/app:zzz")
    msg = str(ei.value)
    assert "app has no tag zzz on reg.test (it has: a, b)" in msg
    assert f"`matchlock image import {HOST}/app:zzz < image.tar`" in msg
    assert "\n" not in msg
    assert store.list() == []


def test_credentials_reach_the_registry(tmp_path):
    reg = FakeRegistry(auth="bearer")
    reg.push_image("p", "1", [layer(f("secret", "s"))])
    img = store_for(tmp_path / "s", reg, Credentials("u", "p")).pull(f"{HOST}/p:1").image
    assert cat(img.disk, "/secret") == b"s"
    with pytest.raises(MatchlockError, match="needs credentials"):
        store_for(tmp_path / "s2", reg).pull(f"{HOST}/p:1")


def test_import_needs_a_tag_not_a_digest(tmp_path):
    import io

    from matchlock.errors import UsageError

    store = ImageStore(tmp_path / "s")
    with pytest.raises(UsageError, match="under a tag, not a digest"):
        store.import_tar("app@sha256:" + "a" * 64, io.BytesIO(b""))
    with pytest.raises(UsageError, match="cannot contain a digest"):
        store.tag("x:1", "y@sha256:" + "a" * 64)


def test_unwritable_store_is_a_one_line_error(tmp_path, reg):
    (tmp_path / "file").write_text("not a directory")
    store = store_for(tmp_path / "file" / "s", reg)
    with pytest.raises(MatchlockError, match="cannot create the image store at .*: Not a "
                                             "directory; make it writable"):
        store.pull(f"{HOST}/app:a")
