"""READ data through the bounce file (docs/channel-protocol.md, "VFS port", BOUNCE):
through a real FUSE mount, big reads come back byte-exact by way of the file, small ones
and a server without the file inline, and many readers at once never get each other's
slots. The counter `server.bounced` is the positive control in each test."""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from tests.unit.vfs.conftest import fuse_mount

from matchlock.vfs import HostFS, Mount
from matchlock.vfs.server import BOUNCE_MIN

pytestmark = pytest.mark.timeout(120)


def _digest(p: Path) -> str:
    with open(p, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _tree(src: Path, files: dict[str, int]) -> dict[str, str]:
    src.mkdir(exist_ok=True)
    out = {}
    for name, size in files.items():
        data = os.urandom(size)
        (src / name).write_bytes(data)
        out[name] = hashlib.sha256(data).hexdigest()
    return out


def test_big_reads_come_through_the_bounce_file_exact(tmp_path, guest_binary):
    src = tmp_path / "src"
    # sizes around every edge: a slot's end, O_DIRECT-style rounding, under the threshold
    want = _tree(src, {"big": 5 << 20, "odd": (3 << 20) + 4097, "slot": 1 << 20,
                       "edge": BOUNCE_MIN, "small": BOUNCE_MIN - 1})
    with fuse_mount(guest_binary, tmp_path / "mnt", [Mount("w", HostFS(src))],
                    bounce=tmp_path / "bounce.buf") as fs:
        d = tmp_path / "mnt" / "w"
        assert {n: _digest(d / n) for n in want} == want
        big = fs.server.bounced
        assert big >= 8, big  # 5 + 3 + 1 MiB files: one READ per MiB at least
        before = fs.server.bounced
        assert _digest(d / "small") == want["small"]
        # a page-cache hit would prove nothing: a fresh name, same bytes
        (src / "small2").write_bytes((src / "small").read_bytes())
        assert _digest(d / "small2") == want["small"]
        assert fs.server.bounced == before  # below BOUNCE_MIN: inline


def test_concurrent_readers_get_their_own_data(tmp_path, guest_binary):
    src = tmp_path / "src"
    want = _tree(src, {f"f{i}": (2 << 20) + i * 8191 for i in range(24)})
    with fuse_mount(guest_binary, tmp_path / "mnt", [Mount("w", HostFS(src))],
                    bounce=tmp_path / "bounce.buf") as fs:
        d = tmp_path / "mnt" / "w"
        with ThreadPoolExecutor(8) as pool:
            got = dict(zip(want, pool.map(lambda n: _digest(d / n), want), strict=True))
        assert got == want
        assert fs.server.bounced >= 24


def test_without_the_bounce_file_all_data_is_inline(tmp_path, guest_binary):
    """Control: the same reads without a bounce file (fused sends no slots, the server
    has none): same bytes, nothing bounced."""
    src = tmp_path / "src"
    want = _tree(src, {"big": 3 << 20})
    with fuse_mount(guest_binary, tmp_path / "mnt", [Mount("w", HostFS(src))]) as fs:
        assert _digest(tmp_path / "mnt" / "w" / "big") == want["big"]
        assert fs.server.bounced == 0
