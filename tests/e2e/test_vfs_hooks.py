"""VFS hooks in a real VM, through the Sandbox's Python API (what the RPC layer calls):
a before-hook blocks `*.env` writes with its errno; an after-hook sees the write event."""

from __future__ import annotations

import asyncio
import errno
import threading

import pytest

from matchlock.vfs import FileEvent, HookRule, mount_config

pytestmark = pytest.mark.e2e

def test_hooks_block_and_observe(ml_env, qemu_present, tmp_path, monkeypatch):
    for k, v in ml_env.items():
        monkeypatch.setenv(k, v)
    from matchlock.sandbox import ExecRequest, Sandbox, SandboxConfig

    work = tmp_path / "work"
    work.mkdir()
    events: list[FileEvent] = []
    seen = threading.Event()

    def after(ev: FileEvent) -> None:
        events.append(ev)
        if ev.path == "/workspace/w/ok.txt":
            seen.set()

    async def main() -> tuple[int, str, str]:
        sb = Sandbox(SandboxConfig(image="matchlock/busybox",
                                   mounts=mount_config([f"{work}:/workspace/w:host_fs"], None,
                                                       [])))
        sb.vfs_hooks.set_rules([
            HookRule(name="no-env", ops=["write"], path="*.env", action="block",
                     errno=errno.EACCES),
            HookRule(name="audit", phase="after", ops=["write"], path="/workspace/**",
                     callback=after),
        ])
        out, err = bytearray(), bytearray()
        try:
            await sb.start()
            proc = await sb.exec(ExecRequest(argv=(
                "sh", "-c", "echo x > /workspace/w/a.env; echo rc=$?; "
                "echo fine > /workspace/w/ok.txt; cat /workspace/w/ok.txt")))
            async for fd, data in proc:
                (err if fd == 2 else out).extend(data)
            st = await proc.wait()
        finally:
            await sb.close()
        return st.exit_code, out.decode(), err.decode()

    code, out, err = asyncio.run(main())
    assert code == 0, err
    assert out.splitlines() == ["rc=1", "fine"]  # blocked; the positive control went through
    assert "Permission denied" in err
    assert (work / "a.env").read_bytes() == b""  # created, never written
    assert (work / "ok.txt").read_text() == "fine\n"
    assert seen.wait(5)
    assert any(ev.op == "write" and ev.path == "/workspace/w/ok.txt" and ev.size == 5
               for ev in events)
    assert not any(ev.path.endswith(".env") for ev in events)
