"""Port forwarding into a real VM: host listener -> channel stream -> guest 127.0.0.1:PORT.

Drives the Sandbox API in-process (as the CLI does), with no guest NIC at all: the
forward rides the channel, so it works with --no-network.
"""

from __future__ import annotations

import asyncio
import http.client
import socket

import pytest

from matchlock._aio import run
from matchlock.sandbox import ExecRequest, PortForwarder, PortSpec, Sandbox, SandboxConfig
from tests.e2e.conftest import NO_RESIDUE, residue

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

PATH = "PATH=/usr/local/bin:/usr/bin:/bin"
N = 20
BODY_SIZE = 100_000
# Twenty distinct files, then busybox httpd on the guest's loopback only (it binds before
# it daemonizes, so the exec returns once the server listens).
SERVE = (
    f"mkdir -p /tmp/www && i=0; while [ $i -lt {N} ]; do "
    f"yes body-$i | head -c {BODY_SIZE} > /tmp/www/f$i; i=$((i+1)); done; "
    "busybox httpd -p 127.0.0.1:8000 -h /tmp/www </dev/null >/dev/null 2>&1"
)


def expected_body(i: int) -> bytes:
    line = f"body-{i}\n".encode()
    return (line * (BODY_SIZE // len(line) + 1))[:BODY_SIZE]


def http_get(port: int, path: str) -> tuple[int, bytes]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


async def guest_sh(sb: Sandbox, script: str) -> tuple[int, bytes]:
    out = bytearray()
    k, _, v = PATH.partition("=")
    proc = await sb.exec(ExecRequest(shell=script, env=((k, v),), cwd="/"))
    async for _fd, data in proc:
        out.extend(data)
    st = await proc.wait()
    return st.exit_code, bytes(out)


def test_20_concurrent_http_requests_then_vm_stop_closes_listener(
    qemu_present, state_home, monkeypatch
):
    monkeypatch.setenv("MATCHLOCK_HOME", str(state_home))
    errors: list[str] = []

    async def main():
        sb = Sandbox(SandboxConfig(image="matchlock/busybox", no_network=True))
        fwd = None
        try:
            await sb.start()
            assert sb.net is None  # no NIC: the forward can only ride the channel
            code, out = await guest_sh(sb, SERVE)
            assert code == 0, out
            fwd = PortForwarder(sb.channel.open_tcp, on_error=errors.append)
            fwd.close_when(sb.channel.wait_closed())
            [b] = await fwd.add([PortSpec(0, 8000)])
            results = await asyncio.gather(
                *(asyncio.to_thread(http_get, b.local_port, f"/f{i}") for i in range(N))
            )
            # A port nothing listens on in the guest: the client is closed, the VM is fine.
            [dead] = await fwd.add([PortSpec(0, 8001)])
            status = await asyncio.to_thread(http_get_or_none, dead.local_port)
            code, _ = await guest_sh(sb, "true")
            assert code == 0
        finally:
            await sb.close()
        assert fwd is not None
        # The VM went: the forwarder closed its listeners on its own.
        await asyncio.wait_for(fwd.wait_closed(), 10)
        return results, status, b.local_port, dead.local_port

    results, dead_status, port, dead_port = run(main())
    for i, (status, body) in enumerate(results):
        assert status == 200, (i, status)
        assert body == expected_body(i), f"/f{i}: wrong body ({len(body)} bytes)"
    assert dead_status is None
    assert errors == ["port-forward connection error: connect 127.0.0.1:8001: "
                      "Connection refused"]
    assert refused(port) and refused(dead_port)
    assert residue(state_home) == NO_RESIDUE


def http_get_or_none(port: int) -> int | None:
    try:
        return http_get(port, "/")[0]
    except (http.client.RemoteDisconnected, ConnectionResetError):
        return None
