"""The four exec modes, a timeout that cancels, and the same from asyncio."""

from __future__ import annotations

import asyncio
import io
import sys

from _common import IMAGE, check

from matchlock import AsyncClient, Client, Sandbox


def sync_modes() -> None:
    with Client() as client:
        client.launch(Sandbox(IMAGE))

        r = client.exec("echo out; echo err >&2")  # buffered
        check((r.stdout, r.stderr) == ("out\n", "err\n"), "exec buffers stdout and stderr")

        out = io.StringIO()  # streamed as it is produced; sys.stdout works too
        r = client.exec_stream("for i in 1 2 3; do echo line $i; done", stdout=out,
                               stderr=sys.stderr)
        check(out.getvalue() == "line 1\nline 2\nline 3\n", "exec_stream streams")

        out = io.StringIO()  # stdin: bytes, str, a file, or an iterable of chunks
        client.exec_pipe("cat", stdin=b"piped in\n", stdout=out)
        check(out.getvalue() == "piped in\n", "exec_pipe feeds stdin")

        raw = io.BytesIO()  # binary writers get the exact bytes
        client.exec_stream("printf '\\000\\377'", stdout=raw)
        check(raw.getvalue() == b"\x00\xff", "binary output is exact")

        out = io.StringIO()  # a PTY: the command sees a terminal
        client.exec_interactive("test -t 0 && echo on a tty", stdout=out, rows=30, cols=100)
        check("on a tty" in out.getvalue(), "exec_interactive runs on a PTY")

        try:
            client.exec("sleep 600", timeout=1)
            check(False, "the timeout fires")
        except TimeoutError:
            check(True, "a timeout cancels the command (its process group is killed)")
        check(client.exec("echo still here").stdout == "still here\n", "the VM is still fine")


async def async_modes() -> None:
    async with AsyncClient() as client:
        await client.launch(Sandbox(IMAGE))
        results = await asyncio.gather(*(client.exec(f"echo {i}") for i in range(8)))
        check([r.stdout for r in results] == [f"{i}\n" for i in range(8)],
              "8 concurrent execs on one VM")
        task = asyncio.ensure_future(client.exec("sleep 600"))
        await asyncio.sleep(0.5)
        task.cancel()  # cancelling the task cancels the command in the guest
        try:
            await task
        except asyncio.CancelledError:
            check(True, "task cancel stops the command")


if __name__ == "__main__":
    sync_modes()
    asyncio.run(async_modes())
