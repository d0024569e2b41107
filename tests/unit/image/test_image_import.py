"""ImageStore.import_tar: docker-save and OCI-layout tarballs into ext4 disks."""

from __future__ import annotations

import io
import os
import stat
import sys
import tarfile

import pytest
from image_helpers import (
    DEBUGFS,
    Unseekable,
    cat,
    d,
    docker_save,
    dstat,
    f,
    hard,
    layer,
    leftovers,
    ls,
    oci_layout,
    special,
    sym,
)

from matchlock.errors import DependencyError, MatchlockError, NotFoundError, UsageError
from matchlock.image import ImageConfig, ImageStore, normalize_name


@pytest.fixture(autouse=True)
def _tools() -> None:
    # Installed by scripts/install.sh: a missing tool fails the run, it never skips it.
    if DEBUGFS is None:
        pytest.fail("debugfs not found: install e2fsprogs (./scripts/install.sh)", False)

L1 = layer(
    d("bin"),
    f("bin/tool", "#!/bin/sh\necho tool\n", mode=0o4755),
    d("etc"),
    f("etc/passwd", "root:x:0:0::/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n"),
    d("home"),
    d("home/user", mode=0o750, uid=1000, gid=1000),
    f("home/user/notes", "secret", mode=0o600, uid=1000, gid=1000),
    d("data"),
    f("data/keep", "keep"),
    f("data/old", "old"),
    d("opq"),
    f("opq/a", "a"),
    d("opq/sub"),
    f("opq/sub/b", "b"),
    d("usr"),
    d("usr/lib"),
    f("usr/lib/libfoo.so.1", "ELF"),
    sym("lib", "usr/lib"),
    d("usr/share"),
    f("usr/share/doc", "doc"),
    d("ro", mode=0o555),
    f("ro/inside", "ro"),
)
L2 = layer(
    f("data/.wh.old"),
    f("opq/new", "new"),
    f("opq/.wh..wh..opq"),
    hard("bin/tool2", "bin/tool"),
    d("run"),
    special("run/fifo", tarfile.FIFOTYPE),
    d("dev"),
    special("dev/null", tarfile.CHRTYPE),
    special("dev/sda", tarfile.BLKTYPE),
    sym("etc/alt", "/etc/passwd"),
    f("lib/extra", "through-symlink"),
    f("home/user/.profile", "PS1=$ ", uid=1000, gid=1000),
    f("ro/later", "later"),
    f("setgid", "g", mode=0o2755, uid=0, gid=50),
)
L3 = layer(
    d("x", uid=1000, gid=1000),
    f("x/one", "one", uid=1000, gid=1000, mode=0o640),
    hard("x/two", "x/one"),
    f("usr/.wh.share"),
    f("data/keep", "replaced"),
)
CONFIG = {
    "Env": ["PATH=/usr/bin:/bin", "LANG=C.UTF-8"],
    "Entrypoint": ["/bin/echo", "entry"],
    "Cmd": ["default-cmd"],
    "WorkingDir": "/tmp",
    "User": "nobody",
}


def check_layered_disk(disk):
    st = dstat(disk, "/bin/tool")
    assert st["type"] == "regular" and st["mode"] == 0o4755 and st["uid"] == 0
    assert st["mtime"] == 1_600_000_000
    assert cat(disk, "/bin/tool") == b"#!/bin/sh\necho tool\n"
    # hardlink to a file of a lower layer
    t2 = dstat(disk, "/bin/tool2")
    assert t2["inode"] == st["inode"] and st["links"] == 2
    home = dstat(disk, "/home/user")
    assert (home["type"], home["mode"], home["uid"], home["gid"]) == (
        "directory",
        0o750,
        1000,
        1000,
    )
    notes = dstat(disk, "/home/user/notes")
    assert (notes["mode"], notes["uid"], notes["gid"]) == (0o600, 1000, 1000)
    assert dstat(disk, "/home/user/.profile")["uid"] == 1000
    # whiteout and opaque dir
    assert dstat(disk, "/data/old") is None
    assert cat(disk, "/data/keep") == b"replaced"
    assert ls(disk, "/opq") == ["new"]
    assert dstat(disk, "/usr/share") is None
    # symlinks, and a write through an in-tree symlink
    lib = dstat(disk, "/lib")
    assert lib["type"] == "symlink" and 'Fast link dest: "usr/lib"' in lib["raw"]
    assert dstat(disk, "/etc/alt")["type"] == "symlink"
    assert cat(disk, "/usr/lib/extra") == b"through-symlink"
    assert cat(disk, "/usr/lib/libfoo.so.1") == b"ELF"
    # fifo kept, devices skipped
    assert dstat(disk, "/run/fifo")["type"] == "FIFO"
    assert dstat(disk, "/dev/null") is None and dstat(disk, "/dev/sda") is None
    # read-only directory from a lower layer still got a file from an upper one
    ro = dstat(disk, "/ro")
    assert ro["mode"] == 0o555
    assert ls(disk, "/ro") == ["inside", "later"]
    sg = dstat(disk, "/setgid")
    assert (sg["mode"], sg["gid"]) == (0o2755, 50)
    # same-layer hardlink
    one, two = dstat(disk, "/x/one"), dstat(disk, "/x/two")
    assert one["inode"] == two["inode"] and (one["uid"], one["mode"]) == (1000, 0o640)
    root = dstat(disk, "/")
    assert (root["uid"], root["gid"]) == (0, 0)


def test_docker_save_layers(store, tmp_path):
    msgs: list[str] = []
    img = store.import_tar("test", io.BytesIO(docker_save([L1, L2, L3], CONFIG)), msgs.append)
    assert img.name == "test:latest" and img.source == "import"
    assert img.id.startswith("sha256:") and len(img.id) == 71
    assert img.disk == store.root / "disks" / f"{img.id[7:]}.ext4"
    assert stat.S_IMODE(img.disk.stat().st_mode) == 0o444
    assert img.size > 0 and img.created.endswith("Z")
    assert img.config == ImageConfig(
        env=("PATH=/usr/bin:/bin", "LANG=C.UTF-8"),
        entrypoint=("/bin/echo", "entry"),
        cmd=("default-cmd",),
        working_dir="/tmp",
        user="nobody",
    )
    assert any("applying layer 3/3" in m for m in msgs)
    assert any("mke2fs" in m for m in msgs)
    check_layered_disk(img.disk)
    assert store.get("test:latest") == img
    assert [i.name for i in store.list()] == ["test:latest"]
    assert len(list((store.root / "blobs" / "sha256").iterdir())) == 3
    assert list((store.root / "tmp").iterdir()) == []
    # the label and the filesystem type
    r = os.popen(f"{DEBUGFS} -R stats {img.disk} 2>/dev/null").read()
    assert "matchlock-root" in r and "has_journal" not in r


def test_docker_save_gzip_layers_unseekable_stream(store):
    tar = docker_save([L1, L2, L3], CONFIG, gzip_layers=True)
    img = store.import_tar("gz:1", Unseekable(tar))
    check_layered_disk(img.disk)


def test_docker_save_duplicate_layer_symlink(store):
    base = layer(f("a", "a"))
    img = store.import_tar("dup", io.BytesIO(docker_save([base, base], dup_symlink=True)))
    assert cat(img.disk, "/a") == b"a"


def test_docker_save_multiple_images_needs_matching_tag(store):
    import json

    tar = docker_save([L1])
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        manifest = json.loads(tf.extractfile("manifest.json").read())
    manifest.append(dict(manifest[0], RepoTags=["other:2"]))
    buf = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(tar)) as src, tarfile.open(fileobj=buf, mode="w") as dst:
        for m in src:
            data = src.extractfile(m).read()
            if m.name == "manifest.json":
                data = json.dumps(manifest).encode()
                m.size = len(data)
            dst.addfile(m, io.BytesIO(data))
    with pytest.raises(UsageError, match="holds 2 images"):
        store.import_tar("nomatch", io.BytesIO(buf.getvalue()))
    assert leftovers(store.root) == []
    img = store.import_tar("other:2", io.BytesIO(buf.getvalue()))
    assert img.name == "other:2"


@pytest.mark.parametrize("compression", ["gzip", None, "zstd"])
def test_oci_layout(store, compression):
    if compression == "zstd":
        pytest.importorskip("zstandard")
    tar = oci_layout([L1, L2, L3], CONFIG, compression=compression)
    img = store.import_tar("oci:1", io.BytesIO(tar))
    check_layered_disk(img.disk)
    assert img.config.cmd == ("default-cmd",)


def test_oci_zstd_without_zstandard(store, monkeypatch):
    pytest.importorskip("zstandard")
    tar = oci_layout([L1], compression="zstd")
    monkeypatch.setitem(sys.modules, "zstandard", None)
    with pytest.raises(DependencyError, match="zstandard"):
        store.import_tar("z", io.BytesIO(tar))
    assert leftovers(store.root) == []


def test_oci_nested_index_picks_amd64(store):
    tar = oci_layout([L1, L2, L3], CONFIG, multiarch=True)
    img = store.import_tar("multi", io.BytesIO(tar))
    check_layered_disk(img.disk)
    assert dstat(img.disk, "/ARM") is None


def test_oci_digest_mismatch(store):
    tar = oci_layout([L1, L2], corrupt_layer=True)
    with pytest.raises(MatchlockError, match=r"corrupt image tarball: blob sha256:[0-9a-f]{64} "
                       r"digest mismatch"):  # fmt: skip
        store.import_tar("bad", io.BytesIO(tar))
    assert leftovers(store.root) == [] and store.list() == []


def test_same_image_two_names_shares_disk_and_remove(store):
    tar = docker_save([L1, L2], CONFIG)
    a = store.import_tar("a:1", io.BytesIO(tar))
    b = store.import_tar("b:1", io.BytesIO(tar))
    assert a.id == b.id and a.disk == b.disk
    assert len(list((store.root / "disks").iterdir())) == 1
    # another image sharing the first layer
    c = store.import_tar("c:1", io.BytesIO(docker_save([L1, L3])))
    blobs = store.root / "blobs" / "sha256"
    assert len(list(blobs.iterdir())) == 3  # L1 stored once
    store.remove("a:1")
    assert a.disk.exists() and store.get("b:1").id == a.id
    with pytest.raises(NotFoundError, match="image 'a:1' not found"):
        store.get("a:1")
    store.remove("b:1")
    assert not a.disk.exists()
    assert len(list(blobs.iterdir())) == 2  # L2 gone, L1 still used by c
    assert c.disk.exists()


def test_remove_unknown_and_gc(store):
    with pytest.raises(NotFoundError, match="image 'nope:latest' not found"):
        store.remove("nope")
    c = store.import_tar("c:1", io.BytesIO(docker_save([L1, L3])))
    with pytest.raises(NotFoundError):
        store.remove("c")
    store.remove("c:1")
    assert not c.disk.exists()
    assert leftovers(store.root) == []
    assert store.list() == []


def test_reimport_under_same_name_replaces_and_collects(store):
    first = store.import_tar("x", io.BytesIO(docker_save([L1])))
    second = store.import_tar("x", io.BytesIO(docker_save([L1, L2])))
    assert first.id != second.id
    assert not first.disk.exists() and second.disk.exists()
    assert [i.id for i in store.list()] == [second.id]
    # The layer both share stays: the new image still needs it (a rebuild onto the same
    # tag, e.g. `build -t x` twice from one base, used to lose its base layer here).
    out = io.BytesIO()
    store.export_oci("x", out, "x")
    assert len(list((store.root / "blobs" / "sha256").iterdir())) == 2


def test_get_message():
    from matchlock.image import ImageStore

    with pytest.raises(NotFoundError) as ei:
        ImageStore(__import__("pathlib").Path("/nonexistent/x")).get("x:y")
    assert str(ei.value) == (
        "image 'x:y' not found; import it with `matchlock image import x:y < image.tar`"
    )


# ---- hostile and broken input ----------------------------------------------------------


@pytest.mark.parametrize(
    "bad_layer, why",
    [
        (layer(f("../evil", "x")), "traversal"),
        (layer(f("a/../../evil", "x")), "traversal"),
        (layer(f("/abs", "x")), "absolute"),
        (layer(sym("esc", "../../../.."), f("esc/evil", "x")), "leaves the tree"),
        (layer(d("a"), sym("a/up", "../.."), f("a/up/evil", "x")), "leaves the tree"),
        (layer(f("ok", "x"), hard("link", "../../etc/passwd")), "traversal"),
        (layer(hard("link", "nonexistent")), "target missing"),
        (layer(f("ok"), f("../.wh.x")), "traversal"),
    ],
)
def test_path_traversal_rejected(store, tmp_path, bad_layer, why):
    with pytest.raises(MatchlockError, match=why) as ei:
        store.import_tar("evil", io.BytesIO(docker_save([L1, bad_layer])))
    assert "\n" not in str(ei.value)
    assert leftovers(store.root) == [] and store.list() == []
    assert not (tmp_path / "evil").exists() and not (store.root / "evil").exists()


def test_absolute_symlink_stays_in_tree(store, tmp_path):
    name = f"matchlock-test-{os.getpid()}"
    lay = layer(sym("hostroot", "/"), d("etc"), f(f"hostroot/etc/{name}", "inside"))
    img = store.import_tar("chroot", io.BytesIO(docker_save([lay])))
    assert cat(img.disk, f"/etc/{name}") == b"inside"
    assert not os.path.exists(f"/etc/{name}")


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"this is not a tarball at all" * 100,
        os.urandom(4096),
        docker_save([L1, L2])[:3000],  # truncated
    ],
    ids=["empty", "text", "random", "truncated"],
)
def test_corrupt_tarball(store, data):
    with pytest.raises(MatchlockError) as ei:
        store.import_tar("corrupt", Unseekable(data))
    msg = str(ei.value)
    assert "\n" not in msg
    assert "is not a docker-save or OCI-layout tarball" in msg or "corrupt image tarball" in msg
    assert msg.startswith("<stdin> ") or "corrupt" in msg
    assert leftovers(store.root) == [] and store.list() == []


def test_tar_without_manifest(store):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        ti, data = f("hello.txt", "hi")
        tf.addfile(ti, io.BytesIO(data))
    with pytest.raises(MatchlockError, match="neither manifest.json nor index.json"):
        store.import_tar("x", io.BytesIO(buf.getvalue()))
    assert leftovers(store.root) == []


def test_truncated_gzip_layer(store):
    import gzip

    bad = gzip.compress(L2)[:-200]
    tar = docker_save([L1, layer()])
    # swap the second layer's content for a truncated gzip stream
    out = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(tar)) as src, tarfile.open(fileobj=out, mode="w") as dst:
        layers_seen = 0
        for m in src:
            data = src.extractfile(m).read()
            if m.name.endswith("layer.tar"):
                layers_seen += 1
                if data == layer():
                    data = bad
                    m.size = len(data)
            dst.addfile(m, io.BytesIO(data))
    with pytest.raises(MatchlockError, match="corrupt image tarball: layer sha256:") as ei:
        store.import_tar("trunc", io.BytesIO(out.getvalue()))
    assert "\n" not in str(ei.value)
    assert leftovers(store.root) == []


def test_missing_layer_file(store):
    import json

    tar = docker_save([L1])
    out = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(tar)) as src, tarfile.open(fileobj=out, mode="w") as dst:
        for m in src:
            data = src.extractfile(m).read()
            if m.name == "manifest.json":
                man = json.loads(data)
                man[0]["Layers"].append("missing/layer.tar")
                data = json.dumps(man).encode()
                m.size = len(data)
            dst.addfile(m, io.BytesIO(data))
    with pytest.raises(MatchlockError, match="missing"):
        store.import_tar("m", io.BytesIO(out.getvalue()))
    assert leftovers(store.root) == []


# ---- names -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, norm",
    [
        ("busybox", "busybox:latest"),
        ("debian:test", "debian:test"),
        ("matchlock/busybox", "matchlock/busybox:latest"),
        ("localhost:5000/a/b", "localhost:5000/a/b:latest"),
        ("registry.example.com/x:1.0-rc_1", "registry.example.com/x:1.0-rc_1"),
    ],
)
def test_normalize_name(name, norm):
    assert normalize_name(name) == norm


@pytest.mark.parametrize("name", ["", "  ", "UPPER", "a:", "a b", "a@sha256:00", "-a", "a/../b"])
def test_invalid_names(store, name):
    with pytest.raises(UsageError):
        normalize_name(name)
    with pytest.raises(UsageError):
        store.import_tar(name, io.BytesIO(b""))
    assert leftovers(store.root) == []


def test_image_config_from_oci_nulls():
    cfg = ImageConfig.from_oci({"Env": None, "Cmd": None, "Entrypoint": "/x", "User": None})
    assert cfg == ImageConfig(entrypoint=("/x",))
    assert ImageStore  # re-exported
