"""`AsyncClient` against the fake server: the same wire as `Client` for the same calls,
concurrency, cancellation by task cancel, async callbacks and sources, big lines, a
dying server, hooks, attach."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tests.unit.sdk.conftest import FAKE, FakeServer, make_fake

from matchlock import (
    AsyncClient,
    Client,
    MatchlockError,
    NetworkHookResult,
    NetworkHookRule,
    NetworkInterceptionConfig,
    RPCError,
    Sandbox,
    VFSHookRule,
    VFSInterceptionConfig,
)

WAIT = 10.0


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def scenario_sync(c: Client) -> list:
    out = []
    c.launch(Sandbox("img").allow_host("a.test").add_secret("K", "v", "a.test"))
    out.append(c.exec("echo x", working_dir="/w"))
    buf = io.StringIO()
    out.append((c.exec_stream("chunks 2", stdout=buf, stderr=buf), buf.getvalue()))
    buf = io.StringIO()
    out.append((c.exec_pipe("cat", stdin=b"in", stdout=buf, user="u"), buf.getvalue()))
    buf = io.StringIO()
    out.append((c.exec_interactive("cat", stdin=b"t", stdout=buf, rows=30, cols=90,
                                   resize=[(31, 91)]), buf.getvalue()))
    c.write_file("/f", b"\x00\x01", mode=0o600)
    out.append(c.read_file("/f"))
    out.append(c.list_files("/"))
    out.append(c.log())
    out.append(c.port_forward("80", "1:2"))
    out.append(c.allow_list_add("b.test"))
    out.append(c.allow_list_delete("b.test"))
    return out


async def scenario_async(c: AsyncClient) -> list:
    out = []
    await c.launch(Sandbox("img").allow_host("a.test").add_secret("K", "v", "a.test"))
    out.append(await c.exec("echo x", working_dir="/w"))
    buf = io.StringIO()
    out.append((await c.exec_stream("chunks 2", stdout=buf, stderr=buf), buf.getvalue()))
    buf = io.StringIO()
    out.append((await c.exec_pipe("cat", stdin=b"in", stdout=buf, user="u"), buf.getvalue()))
    buf = io.StringIO()
    out.append((await c.exec_interactive("cat", stdin=b"t", stdout=buf, rows=30, cols=90,
                                         resize=[(31, 91)]), buf.getvalue()))
    await c.write_file("/f", b"\x00\x01", mode=0o600)
    out.append(await c.read_file("/f"))
    out.append(await c.list_files("/"))
    out.append(await c.log())
    out.append(await c.port_forward("80", "1:2"))
    out.append(await c.allow_list_add("b.test"))
    out.append(await c.allow_list_delete("b.test"))
    return out


def test_same_wire_and_results_as_sync_client(tmp_path: Path, monkeypatch):
    fakes = {}
    results = {}
    for who in ("sync", "async"):
        (tmp_path / who).mkdir()
        fakes[who] = make_fake(tmp_path / who)
        monkeypatch.setenv("MATCHLOCK_BIN", str(fakes[who].bin))
        monkeypatch.setenv("FAKE_RPC_LOG", str(fakes[who].log_path))
        if who == "sync":
            with Client() as c:
                results[who] = scenario_sync(c)
        else:
            async def main():
                async with AsyncClient() as c:
                    return await scenario_async(c)
            results[who] = run(main())
    assert results["sync"] == results["async"]
    assert fakes["sync"].sent() == fakes["async"].sent()
    assert "exec_tty.resize" in fakes["async"].sent_methods()


def test_gather_completes_out_of_order(fake: FakeServer):
    async def main():
        async with AsyncClient() as c:
            await c.create(Sandbox("img").options())
            waiting = asyncio.ensure_future(c.exec("wait K"))
            while not c.pending_requests():
                await asyncio.sleep(0)
            assert (await c.exec("echo later")).stdout == "later\n"
            assert not waiting.done()
            await c.exec("release K")
            assert (await waiting).stdout == "released K\n"
            rs = await asyncio.gather(*(c.exec(f"echo {i}") for i in range(50)))
            assert [r.stdout for r in rs] == [f"{i}\n" for i in range(50)]
    run(main())


def test_task_cancel_and_timeout_cancel_on_the_server(fake: FakeServer):
    async def main():
        async with AsyncClient() as c:
            await c.create(Sandbox("img").options())
            task = asyncio.ensure_future(c.exec("sleep"))
            while not c.pending_requests():
                await asyncio.sleep(0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            with pytest.raises(TimeoutError, match="timed out after 0.2s"):
                await c.exec("sleep", timeout=0.2)
            assert (await c.exec("echo ok")).stdout == "ok\n"
            assert c.pending_requests() == {}
    run(main())
    sleeps = [m["id"] for m in fake.sent() if m.get("params", {}).get("command") == "sleep"]
    cancels = [m["params"]["id"] for m in fake.sent() if m["method"] == "cancel"]
    assert cancels == sleeps and len(sleeps) == 2


def test_explicit_cancel(fake: FakeServer):
    async def main():
        async with AsyncClient() as c:
            await c.create(Sandbox("img").options())
            task = asyncio.ensure_future(c.exec("sleep"))
            while not c.pending_requests():
                await asyncio.sleep(0)
            (rid,) = c.pending_requests()
            assert await c.cancel(rid) is True
            with pytest.raises(RPCError) as ei:
                await task
            assert ei.value.is_cancelled()
    run(main())


def test_async_writers_and_sources(fake: FakeServer):
    async def main():
        async with AsyncClient() as c:
            await c.create(Sandbox("img").options())
            got: list[bytes] = []

            async def sink(data: bytes) -> None:
                await asyncio.sleep(0)
                got.append(data)

            await c.exec_stream("binary 300", stdout=sink)
            assert b"".join(got) == bytes(i % 256 for i in range(300))

            async def gen():
                for part in (b"a", "b", b"c"):
                    yield part

            buf = io.BytesIO()
            await c.exec_pipe("cat", stdin=gen(), stdout=buf)
            assert buf.getvalue() == b"abc"

            reader = asyncio.StreamReader()
            reader.feed_data(b"from a stream reader")
            reader.feed_eof()
            buf = io.BytesIO()
            await c.exec_pipe("cat", stdin=reader, stdout=buf)
            assert buf.getvalue() == b"from a stream reader"

            r, w = os.pipe()  # a real fd: polled by the loop, no thread
            os.write(w, b"through a pipe")
            os.close(w)
            buf = io.BytesIO()
            with os.fdopen(r, "rb") as rf:
                await c.exec_pipe("cat", stdin=rf, stdout=buf)
            assert buf.getvalue() == b"through a pipe"

            buf = io.BytesIO()
            await c.exec_pipe("cat", stdin=io.BytesIO(b"x" * 100_000), stdout=buf)
            assert buf.getvalue() == b"x" * 100_000

            out = io.StringIO()
            await c.exec_stream("utf8split", stdout=out)
            assert out.getvalue() == "café\n"
    run(main())


def test_twenty_mib_lines(fake: FakeServer):
    async def main():
        async with AsyncClient() as c:
            await c.create(Sandbox("img").options())
            payload = os.urandom(15_000_000)
            await c.write_file("/big", payload)
            back = await c.read_file("/big")
            assert hashlib.sha256(back).digest() == hashlib.sha256(payload).digest()
    run(main())


def test_server_death(fake: FakeServer):
    async def main():
        c = AsyncClient()
        await c.create(Sandbox("img").options())
        with pytest.raises(MatchlockError, match=r"closed unexpectedly \(exit status 3"):
            await c.exec("die")
        with pytest.raises(MatchlockError, match="closed unexpectedly"):
            await c.exec("echo x")
        await c.close()
    run(main())


def test_hooks(fake: FakeServer):
    events = []
    calls = []

    async def net_hook(req):
        calls.append(req.host)
        await asyncio.sleep(0)
        return NetworkHookResult(action="block")

    def sync_net_hook(req):  # plain function: runs in a worker thread
        return None

    async def dangerous(client, ev):
        events.append(("dangerous", ev.path, (await client.exec("echo inner")).stdout))

    done = asyncio.Event

    async def main():
        seen = done()

        def safe(ev):
            events.append(("safe", ev.path))

        async def on_event(ev):
            events.append(("on_event", ev.type))
            seen.set()

        async def guard(req):
            return "block"

        net = NetworkInterceptionConfig(rules=[
            NetworkHookRule(phase="before", hosts=["a.test"], hook=net_hook),
            NetworkHookRule(phase="after", hook=sync_net_hook)])
        vfs = VFSInterceptionConfig(rules=[
            VFSHookRule(phase="after", ops=["write"], hook=safe),
            VFSHookRule(phase="after", ops=["write"], dangerous_hook=dangerous),
            VFSHookRule(ops=["read"], action_hook=guard)])
        sb = Sandbox("img").with_network_interception(net).mount_memory("/workspace") \
            .with_workspace("/workspace").with_vfs_interception(vfs)
        async with AsyncClient(on_event=on_event) as c:
            await c.create(sb.options())
            r = await c.exec("hook " + json.dumps({"callback_id": "network_hook_1",
                                                   "phase": "before", "host": "a.test"}))
            assert json.loads(r.stdout) == {"action": "block"}
            r = await c.exec("hook " + json.dumps({"callback_id": "network_hook_2",
                                                   "phase": "after"}))
            assert json.loads(r.stdout) == {}
            await c.exec("event " + json.dumps({"type": "file", "timestamp": 1, "file": {
                "op": "write", "path": "/workspace/x", "size": 1}}))
            await seen.wait()
            while len(events) < 3:
                await asyncio.sleep(0.01)
            with pytest.raises(MatchlockError, match="vfs action hook blocked"):
                await c.read_file("/workspace/x")
            sock = fake.first("create")["params"]["network"]["interception"]["callback_socket"]
            assert Path(sock).exists()
        assert not Path(sock).parent.exists()

    run(main())
    assert calls == ["a.test"]
    assert sorted(events) == [("dangerous", "/workspace/x", "inner\n"), ("on_event", "file"),
                              ("safe", "/workspace/x")]


def test_attach(tmp_path: Path, monkeypatch, fake: FakeServer):
    monkeypatch.setenv("MATCHLOCK_HOME", str(tmp_path / "home"))
    sock_dir = tmp_path / "home" / "vms" / "vm-attached"
    sock_dir.mkdir(parents=True)
    proc = subprocess.Popen([sys.executable, str(FAKE), "--socket",
                             str(sock_dir / "control.sock")], stdout=subprocess.PIPE, text=True)

    async def main():
        c = await AsyncClient.attach("vm-attached")
        assert (await c.exec("echo attached")).stdout == "attached\n"
        await c.close()
        with pytest.raises(MatchlockError, match="no running VM behind"):
            await AsyncClient.attach("vm-00000000")

    try:
        assert proc.stdout.readline() == "ready\n"
        run(main())
        assert proc.wait(WAIT) == 0
        assert "close" not in fake.sent_methods()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_runs_on_uvloop(fake: FakeServer):
    """matchlock itself runs on uvloop (a dependency on Linux): the client must too."""
    import uvloop

    async def main():
        async with AsyncClient() as c:
            await c.create(Sandbox("img").options())
            rs = await asyncio.gather(*(c.exec(f"echo {i}") for i in range(20)))
            assert [r.stdout for r in rs] == [f"{i}\n" for i in range(20)]
            r, w = os.pipe()
            os.write(w, b"pipe")
            os.close(w)
            buf = io.BytesIO()
            with os.fdopen(r, "rb") as rf:
                await c.exec_pipe("cat", stdin=rf, stdout=buf)
            assert buf.getvalue() == b"pipe"
            with pytest.raises(TimeoutError):
                await c.exec("sleep", timeout=0.2)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())
