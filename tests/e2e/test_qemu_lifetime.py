"""QEMU lives as long as its supervisor process, not as long as the thread that started it.

The Sandbox prepares and spawns QEMU in an asyncio worker thread. Here every worker thread
of the loop's executor is shut down (so the thread that forked QEMU has exited, as it would
in a long-lived supervisor) and the VM must still run commands.
(tests/unit/vm/test_spawn.py shows the kernel would otherwise kill it.)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
import time
from pathlib import Path

import pytest

from matchlock._aio import run
from matchlock.sandbox import ExecRequest, Sandbox, SandboxConfig

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


def _tasks() -> set[int]:
    return {int(t) for t in os.listdir("/proc/self/task")}


def test_qemu_survives_the_exit_of_the_thread_that_spawned_it(
    qemu_present, state_home, monkeypatch
):
    monkeypatch.setenv("MATCHLOCK_HOME", str(state_home))

    async def main():
        loop = asyncio.get_running_loop()
        first = concurrent.futures.ThreadPoolExecutor(thread_name_prefix="first")
        loop.set_default_executor(first)
        before = _tasks()
        sb = Sandbox(SandboxConfig(image="matchlock/busybox", no_network=True))
        try:
            await sb.start()
            assert sb.qemu is not None
            workers = _tasks() - before - {t.native_id for t in threading.enumerate()
                                            if not t.name.startswith("first")}
            assert workers, "the sandbox did not use the executor's threads"
            first.shutdown(wait=True)
            deadline = time.monotonic() + 10
            while _tasks() & workers:  # the OS threads are really gone
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            loop.set_default_executor(concurrent.futures.ThreadPoolExecutor())
            out = bytearray()
            proc = await sb.exec(ExecRequest(argv=("echo", "alive"), env=(("PATH", "/bin"),),
                                             cwd="/"))

            async def drain() -> None:
                async for _fd, data in proc:
                    out.extend(data)

            await asyncio.wait_for(drain(), 60)
            st = await asyncio.wait_for(proc.wait(), 60)
            alive = sb.qemu.poll() is None
            state = Path(f"/proc/{sb.qemu.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            return bytes(out), st.exit_code, alive, state
        finally:
            await sb.close()

    out, code, alive, state = run(main())
    assert alive and state != "Z"
    assert (out, code) == (b"alive\n", 0)
