"""VFS hooks through a real FUSE mount: block with an errno, mutate writes, after-events."""

from __future__ import annotations

import errno
import os
import threading

import pytest
from tests.unit.vfs.conftest import fuse_mount

from matchlock.vfs import FileEvent, HookEngine, HookRule, MemoryFS, Mount
from matchlock.vfs._hooks import compile_glob

pytestmark = pytest.mark.timeout(60)


def test_globs():
    assert compile_glob("*.env")("/workspace/a/b.env")
    assert not compile_glob("*.env")("/workspace/a.env.bak")
    assert compile_glob("/workspace/*.txt")("/workspace/x.txt")
    assert not compile_glob("/workspace/*.txt")("/workspace/d/x.txt")
    assert compile_glob("/workspace/**/x.txt")("/workspace/x.txt")
    assert compile_glob("/workspace/**/x.txt")("/workspace/a/b/x.txt")
    assert compile_glob("/workspace/**")("/workspace/a/b")
    assert compile_glob("")("/anything")


def test_bad_rules_are_refused():
    for kw in ({"phase": "middle"}, {"action": "explode"}, {"ops": ["frobnicate"]},
               {"phase": "after", "action": "block"}, {"action": "mutate_write"},
               {"errno": 0}):
        with pytest.raises(ValueError):
            HookRule(**kw)


def test_block_mutate_and_events(tmp_path, guest_binary):
    events: list[FileEvent] = []
    seen = threading.Event()

    def on_event(ev: FileEvent) -> None:
        events.append(ev)
        if ev.op == "write" and ev.path.endswith("ok.txt"):
            seen.set()

    after: list[FileEvent] = []
    hooks = HookEngine([
        HookRule(name="no-env", ops=["write", "create"], path="*.env", action="block",
                 errno=errno.EACCES),
        HookRule(name="shout", ops=["write"], path="/workspace/loud/*", action="mutate_write",
                 mutate=lambda op: op.data.upper()),
        HookRule(name="verdict", ops=["mkdir"], path="*",
                 callback=lambda op: "block" if op.path.endswith("forbidden") else None),
        HookRule(name="audit", phase="after", ops=["write"], path="*.txt",
                 callback=after.append),
    ])
    hooks.subscribe(on_event)
    with fuse_mount(guest_binary, tmp_path / "m", [Mount("", MemoryFS())], hooks):
        m = tmp_path / "m"
        with pytest.raises(OSError) as e:
            (m / "a.env").write_text("SECRET=1")
        assert e.value.errno == errno.EACCES
        assert not (m / "a.env").exists()
        (m / "ok.txt").write_text("fine")  # positive control in the same run
        assert (m / "ok.txt").read_text() == "fine"
        (m / "loud").mkdir()
        (m / "loud/x").write_text("quiet")
        assert (m / "loud/x").read_text() == "QUIET"
        with pytest.raises(OSError) as e:
            os.mkdir(m / "forbidden")
        assert e.value.errno == errno.EPERM
        os.mkdir(m / "allowed")
        assert seen.wait(5)
    hooks.close()
    writes = [ev for ev in events if ev.op == "write"]
    assert any(ev.path == "/workspace/ok.txt" and ev.size == 4 for ev in writes)
    assert not any(ev.path.endswith(".env") for ev in events), "blocked ops emit no event"
    assert [ev.path for ev in after] == ["/workspace/ok.txt"]
    wire = writes[0].to_wire()
    assert wire["type"] == "file" and wire["file"]["op"] == "write"
