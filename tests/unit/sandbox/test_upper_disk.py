"""The VM's writable disk: a copy of a per-size mke2fs template, sparse and valid ext4."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from matchlock.sandbox import _upper
from matchlock.sandbox._upper import copy_extents, data_extents, make_upper_disk

SIZE_MIB = 64


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    if not (shutil.which("mke2fs") or os.path.exists("/sbin/mke2fs")):
        pytest.fail("mke2fs is needed (apt-get install e2fsprogs; scripts/install.sh does)")
    monkeypatch.setenv("MATCHLOCK_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def fsck(path: Path) -> str:
    e2fsck = shutil.which("e2fsck") or "/sbin/e2fsck"
    r = subprocess.run([e2fsck, "-fn", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    dumpe2fs = shutil.which("dumpe2fs") or "/sbin/dumpe2fs"
    return subprocess.run([dumpe2fs, "-h", str(path)], capture_output=True, text=True,
                          check=True).stdout


def digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def templates(cache: Path) -> list[Path]:
    return sorted((cache / "upper").glob("*.img")) if (cache / "upper").exists() else []


def test_copies_are_sparse_valid_and_identical_to_the_template(tmp_path, cache):
    a, b = tmp_path / "a.ext4", tmp_path / "b.ext4"
    make_upper_disk(a, SIZE_MIB)
    make_upper_disk(b, SIZE_MIB)
    [template] = templates(cache)
    assert f"-{SIZE_MIB}m" in template.name
    for disk in (a, b):
        assert disk.stat().st_size == SIZE_MIB << 20
        header = fsck(disk)
        assert "matchlock-upper" in header
        assert "has_journal" not in header
        assert digest(disk) == digest(template)
        # sparse: only the metadata is allocated (a few MiB at most for 64 MiB)
        assert disk.stat().st_blocks * 512 < 8 << 20
    make_upper_disk(tmp_path / "c.ext4", SIZE_MIB * 2)  # a template per size
    assert len(templates(cache)) == 2


def test_a_disk_written_by_one_vm_never_reaches_the_next(tmp_path, cache):
    a, b = tmp_path / "a.ext4", tmp_path / "b.ext4"
    make_upper_disk(a, SIZE_MIB)
    with open(a, "r+b") as f:  # what a guest's writes do to its disk
        f.seek(40 << 20)
        f.write(b"secret" * 1000)
    make_upper_disk(b, SIZE_MIB)
    assert digest(b) == digest(templates(cache)[0])


def test_without_a_writable_cache_mke2fs_runs_per_vm(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("MATCHLOCK_CACHE_DIR", str(blocker / "cache"))
    disk = tmp_path / "d.ext4"
    make_upper_disk(disk, SIZE_MIB)
    assert "matchlock-upper" in fsck(disk)


def test_a_file_system_without_holes_falls_back_to_mke2fs(tmp_path, cache, monkeypatch):
    monkeypatch.setattr(_upper, "MAX_TEMPLATE_DATA", 0)  # as if SEEK_DATA saw all data
    copies = []
    monkeypatch.setattr(_upper, "copy_extents", lambda *a: copies.append(a))
    disk = tmp_path / "d.ext4"
    make_upper_disk(disk, SIZE_MIB)
    assert copies == []
    assert "matchlock-upper" in fsck(disk)


def test_copy_without_copy_file_range(tmp_path, cache, monkeypatch):
    make_upper_disk(tmp_path / "first.ext4", SIZE_MIB)
    [template] = templates(cache)

    def refuse(*a, **k):
        raise OSError(errno.EXDEV, "cross-device")

    monkeypatch.setattr(os, "copy_file_range", refuse)
    out = tmp_path / "copy.ext4"
    copy_extents(template, out, data_extents(template))
    assert digest(out) == digest(template)
    assert out.stat().st_blocks * 512 < 8 << 20


def test_missing_mke2fs_is_a_dependency_error(tmp_path, monkeypatch):
    from matchlock.errors import DependencyError

    monkeypatch.setattr(_upper.shutil, "which", lambda name: None)
    monkeypatch.setattr(_upper.os.path, "exists", lambda p: False)
    with pytest.raises(DependencyError, match="e2fsprogs"):
        make_upper_disk(tmp_path / "d.ext4", SIZE_MIB)
    assert not (tmp_path / "d.ext4").exists()
