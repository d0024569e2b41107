"""Mount specs (-v, --workspace, --disk) and named volumes: parsing, checks, locks."""

from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner

from matchlock.errors import UsageError
from matchlock.vfs import (
    DiskInUseError,
    MountSpec,
    copy_volume,
    create_volume,
    list_volumes,
    mount_config,
    parse_disk,
    parse_volume,
    remove_volume,
)
from matchlock.vfs._volumes import DiskLock, volume_path


def test_volume_modes(tmp_path):
    ws = "/workspace"
    assert parse_volume(f"{tmp_path}:/workspace/a", ws) == MountSpec(
        "/workspace/a", "overlay", str(tmp_path))
    assert parse_volume(f"{tmp_path}:a:host_fs", ws).type == "host_fs"
    assert parse_volume(f"{tmp_path}:a:rw", ws).type == "host_fs"
    ro = parse_volume(f"{tmp_path}:a:RO", ws)
    assert (ro.type, ro.readonly, ro.guest_path) == ("host_fs", True, "/workspace/a")
    o = parse_volume(f"{tmp_path}:/workspace:host_fs,uid=1000,gid=1001", ws)
    assert (o.uid, o.gid, o.guest_path) == (1000, 1001, "/workspace")
    assert parse_volume(f"{tmp_path}:a:uid=5", ws).uid == 5
    (tmp_path / "sub").mkdir()
    rel = parse_volume("./sub:x", ws, cwd=str(tmp_path))
    assert (rel.host_path, rel.guest_path) == (str(tmp_path / "sub"), "/workspace/x")
    (tmp_path / "f.txt").write_text("f")
    assert parse_volume("f.txt:f", ws, cwd=str(tmp_path)).host_path == str(tmp_path / "f.txt")


@pytest.mark.parametrize("value,needle", [
    ("/definitely/not/here:/workspace/x", "does not exist"),
    ("{t}:/etc/x", "outside the workspace"),
    ("{t}:/workspace/../etc", "no '..'"),
    ("{t}:/workspace/x:sideways", "unknown mode"),
    ("{t}:/workspace/x:ro,uid=abc", "bad option"),
    ("{t}:/workspace/x:ro,mode=1", "bad option"),
    ("{t}", "HOST:GUEST"),
    ("{t}:/workspace/a:b:c", "HOST:GUEST"),
    ("{t}:/workspace/sp ace", "must be an absolute path"),
])
def test_bad_volumes(tmp_path, value, needle):
    with pytest.raises(UsageError) as e:
        parse_volume(value.format(t=tmp_path), "/workspace", what="-v X")
    assert needle in str(e.value) and str(e.value).startswith("-v X: ")
    assert "\n" not in str(e.value)


def test_overlap_and_workspace(tmp_path):
    with pytest.raises(UsageError, match="overlap"):
        mount_config([f"{tmp_path}:a", f"{tmp_path}:a/b"], None, [])
    with pytest.raises(UsageError, match="overlap"):
        mount_config([f"{tmp_path}:/workspace", f"{tmp_path}:x"], None, [])
    with pytest.raises(UsageError, match="overlap"):
        mount_config([f"{tmp_path}:a", f"{tmp_path}:/workspace/a"], None, [])
    ok = mount_config([f"{tmp_path}:a", f"{tmp_path}:ab"], None, [])
    assert [m.guest_path for m in ok.mounts] == ["/workspace/a", "/workspace/ab"]
    assert ok.workspace == "/workspace"
    assert mount_config([], "/work", []).workspace == "/work"  # alone: memory
    assert mount_config([], None, []).vfs is False
    for bad in ("/", "/proc", "/etc/x", "relative", "/a b"):
        with pytest.raises(UsageError):
            mount_config([], bad, [])
    with pytest.raises(UsageError, match="outside the workspace"):
        mount_config([f"{tmp_path}:/workspace/a"], "/srv", [])


def test_disks(tmp_path):
    img = tmp_path / "d.ext4"
    img.write_bytes(b"")
    d = parse_disk(f"{img}:/data:ro")
    assert (d.host_path, d.guest_path, d.readonly) == (str(img), "/data", True)
    assert parse_disk(f"{img}:/data").readonly is False
    for bad, needle in ((f"{img}", "HOST_PATH:GUEST_MOUNT"), ("/no/x.ext4:/d", "does not exist"),
                        (f"{tmp_path}:/d", "not a regular file"), (f"{img}:/proc", "cannot"),
                        (f"{img}:/d:sideways", "unknown mode"), ("@a/b:/d", "invalid"),
                        ("@missing:/d", "does not exist"), (f"{img}:rel", "absolute")):
        with pytest.raises(UsageError, match=needle):
            parse_disk(bad, volumes_dir=tmp_path)
    with pytest.raises(UsageError, match="shadow"):
        mount_config([f"{tmp_path}:a"], None, [f"{img}:/workspace/d"])
    with pytest.raises(UsageError, match="twice"):
        mount_config([], None, [f"{img}:/d1", f"{img}:/d2"])


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("MATCHLOCK_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_volume_lifecycle_and_locks(home):
    v = create_volume("cache", 16)
    assert v.to_json() == {"name": "cache", "size": "16.0 MB", "path": str(v.path)}
    assert os.stat(v.path).st_blocks * 512 < 16 << 20  # sparse
    with pytest.raises(UsageError, match="already exists"):
        create_volume("cache", 16)
    with pytest.raises(UsageError, match="invalid"):
        create_volume("a/b", 16)
    assert [x.name for x in list_volumes()] == ["cache"]
    writer = DiskLock(v.path, readonly=False)
    with pytest.raises(DiskInUseError):
        DiskLock(v.path, readonly=True)
    with pytest.raises(DiskInUseError):
        remove_volume("cache")
    with pytest.raises(DiskInUseError):
        copy_volume("cache", "copy")
    writer.release()
    r1, r2 = DiskLock(v.path, readonly=True), DiskLock(v.path, readonly=True)  # readers share
    with pytest.raises(DiskInUseError):
        DiskLock(v.path, readonly=False)
    r1.release()
    r2.release()
    c = copy_volume("cache", "copy")
    assert c.path.read_bytes() == v.path.read_bytes()
    assert os.stat(c.path).st_mtime_ns == os.stat(v.path).st_mtime_ns
    remove_volume("cache")
    remove_volume("copy")
    assert list_volumes() == []
    assert not volume_path("x").exists()


def test_volume_cli(home):
    from matchlock.cli._main import cli

    r = CliRunner().invoke(cli, ["volume", "create", "v1", "--size", "8"])
    assert r.exit_code == 0 and r.output == "Created volume v1 (8 MB)\n"
    r = CliRunner().invoke(cli, ["volume", "ls", "--json"])
    assert [v["name"] for v in json.loads(r.output)] == ["v1"]
    r = CliRunner().invoke(cli, ["volume", "ls"])
    assert r.output.splitlines()[0].split() == ["NAME", "SIZE"]
    assert r.output.splitlines()[1].split() == ["v1", "8.0", "MB"]
    r = CliRunner().invoke(cli, ["volume", "rm", "v1"])
    assert r.exit_code == 0 and r.output == "Removed volume v1\n"
