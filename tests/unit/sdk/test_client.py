"""`Client` against the fake server (a real subprocess): every method, concurrency and
out-of-order completion, cancellation, errors, binary safety, big lines, a dying server,
hooks, attach. What the server received is read back from its log."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from tests.unit.sdk.conftest import FAKE, FakeServer

from matchlock import (
    Client,
    CLIError,
    Config,
    Event,
    MatchlockError,
    NetworkHookResult,
    NetworkHookRule,
    NetworkInterceptionConfig,
    RPCError,
    Sandbox,
    VFSHookRule,
    VFSInterceptionConfig,
)

WAIT = 10.0  # generous bound for anything that should happen "now"


def wait_for(pred, what: str, timeout: float = WAIT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def client(fake: FakeServer):
    with Client() as c:
        c.create(Sandbox("img").options())
        yield c


def test_config_resolution(monkeypatch):
    monkeypatch.setenv("MATCHLOCK_BIN", "/opt/ml/matchlock")
    assert Client()._config.binary_path == "/opt/ml/matchlock"
    assert Client(Config())._config.binary_path == ""  # explicit config: env not consulted
    assert Config().rpc_argv() == [sys.executable, "-P", "-m", "matchlock", "rpc"]
    assert Config("/x/matchlock", use_sudo=True).rpc_argv() == ["sudo", "/x/matchlock", "rpc"]
    assert Config("/x/matchlock", use_sudo=True).cli_argv() == ["/x/matchlock"]


def test_missing_binary_is_one_clear_error():
    c = Client(Config(binary_path="/nonexistent/matchlock"))
    with pytest.raises(MatchlockError, match="matchlock binary not found.*MATCHLOCK_BIN"):
        c.exec("true")
    c.close()


def test_basic_methods_and_what_was_sent(fake: FakeServer):
    with Client() as c:
        assert c.vm_id is None
        vm = c.launch(Sandbox("alpine:latest").allow_host("api.test"))
        assert vm == c.vm_id == "vm-fake0001"
        r = c.exec("echo hi", working_dir="/tmp", user="app")
        assert (r.exit_code, r.stdout, r.stderr) == (0, "hi\n", "")
        assert c.exec("exit 7").exit_code == 7
        assert c.exec("stderr oops").stderr == "oops\n"
        c.write_file("/w/a.txt", "héllo")
        assert c.read_file("/w/a.txt") == "héllo".encode()
        names = [(f.name, f.is_dir) for f in c.list_files("/w")]
        assert names == [("a.txt", False), ("sub", True)]
        assert c.log() == "boot ok\n\ufffd\n"
        assert c.allow_list_add("x.test, y.test", "x.test").changed == ["x.test", "y.test"]
        res = c.allow_list_delete("x.test")
        assert (res.changed, res.allowed_hosts) == (["x.test"], ["y.test"])
        assert c.allow_list_delete("y.test").allowed_hosts == []  # server sent null
    sent = fake.sent()
    assert sent[0]["params"] == {"image": "alpine:latest", "launch_entrypoint": True,
                                 "network": {"allowed_hosts": ["api.test"],
                                             "block_private_ips": True}}
    assert sent[1]["params"] == {"command": "echo hi", "working_dir": "/tmp", "user": "app"}
    assert fake.first("write_file")["params"] == {
        "path": "/w/a.txt", "content": base64.b64encode("héllo".encode()).decode(), "mode": 420}
    assert fake.first("allow_list_add")["params"] == {"hosts": ["x.test", "y.test"]}
    assert sent[-1] == {"jsonrpc": "2.0", "method": "close", "id": sent[-1]["id"],
                        "params": {"timeout_seconds": 2.0}}
    ids = [m["id"] for m in sent]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


def test_requests_complete_out_of_order(client: Client):
    """`wait K` is answered only after `release K`: later requests complete while the
    earlier one is still pending, and each caller gets its own result."""
    results: dict[str, str] = {}

    def waiter():
        results["wait"] = client.exec("wait K").stdout

    t = threading.Thread(target=waiter)
    t.start()
    wait_id = wait_for(lambda: next(iter(client.pending_requests()), None), "the wait request")
    assert client.exec("echo later").stdout == "later\n"
    assert t.is_alive() and wait_id in client.pending_requests()
    assert client.exec("release K").stdout == ""
    t.join(WAIT)
    assert results == {"wait": "released K\n"}


def test_many_threads_one_client(client: Client):
    errors: list[BaseException] = []

    def worker(n: int):
        try:
            for i in range(40):
                r = client.exec(f"echo {n}-{i}")
                assert r.stdout == f"{n}-{i}\n", r
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors


def test_timeout_cancels_and_client_stays_usable(client: Client, fake: FakeServer):
    with pytest.raises(TimeoutError, match=r"request exec \(id=\d+\) timed out after 0.2s"):
        client.exec("sleep", timeout=0.2)
    assert client.exec("echo still").stdout == "still\n"
    sent = fake.sent()
    sleep = next(m for m in sent if m.get("params", {}).get("command") == "sleep")
    cancels = [m for m in sent if m["method"] == "cancel"]
    assert [c["params"] for c in cancels] == [{"id": sleep["id"]}]


def test_explicit_cancel(client: Client):
    box: dict = {}

    def run():
        try:
            client.exec("sleep")
        except RPCError as e:
            box["err"] = e

    t = threading.Thread(target=run)
    t.start()
    rid = wait_for(lambda: next((i for i, m in client.pending_requests().items()
                                 if m == "exec"), None), "the sleep request")
    assert client.cancel(rid) is True
    t.join(WAIT)
    assert box["err"].code == RPCError.CANCELLED and box["err"].is_cancelled()
    assert client.cancel(rid) is False


def test_rpc_errors_pass_through(client: Client):
    with pytest.raises(RPCError) as ei:
        client.read_file("/missing")
    assert ei.value.is_file_error() and "no such file" in ei.value.message
    with pytest.raises(RPCError) as ei:
        client.exec("fail")
    assert ei.value.is_exec_error()
    with pytest.raises(RPCError) as ei:
        client._run(iter_call("no_such_method"))
    assert ei.value.code == RPCError.METHOD_NOT_FOUND


def iter_call(method: str):
    from matchlock.sdk._ops import Call

    yield Call(method, {"x": 1})


def test_create_failure(fake: FakeServer):
    with Client() as c, pytest.raises(RPCError, match="no such image"):
        c.create(Sandbox("fail").options())
    assert c.vm_id is None


def test_noise_is_ignored(client: Client):
    assert client.exec("noise").exit_code == 0


def test_binary_output_is_exact(client: Client):
    r = client.exec("binary 512")
    assert r.stdout_bytes == bytes(i % 256 for i in range(512))
    assert "\ufffd" in r.stdout
    buf = io.BytesIO()
    client.exec_stream("binary 300", stdout=buf)
    assert buf.getvalue() == bytes(i % 256 for i in range(300))
    chunks: list[bytes] = []
    client.exec_stream("binary 10", stdout=chunks.append)
    assert b"".join(chunks) == bytes(range(10))


def test_text_writer_gets_characters_split_across_chunks(client: Client):
    out = io.StringIO()
    client.exec_stream("utf8split", stdout=out)
    assert out.getvalue() == "café\n"


def test_bad_base64_result_is_a_protocol_error(client: Client):
    with pytest.raises(MatchlockError, match="invalid exec stdout: bad base64"):
        client.exec("badb64")


def test_twenty_mib_lines_both_ways(client: Client, fake: FakeServer):
    n = 15_000_000  # 20 MB of base64 on one line
    got = client.read_file(f"/big/{n}")
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(
        (bytes(range(251)) * (n // 251 + 1))[:n]).hexdigest()
    payload = os.urandom(n)
    client.write_file("/w/big.bin", payload)
    assert hashlib.sha256(client.read_file("/w/big.bin")).digest() == \
        hashlib.sha256(payload).digest()
    assert len(client.exec(f"bigline {n}").stdout_bytes) == n


def test_exec_pipe_stdin_sources(client: Client, fake: FakeServer):
    for source, want in [(b"bytes in", "bytes in"), ("str in", "str in"),
                         (io.BytesIO(b"x" * 200_000), "x" * 200_000),
                         (io.StringIO("text file"), "text file"),
                         ([b"a", "b", b""], "ab"), (iter([b"gen"]), "gen")]:
        out, err = io.StringIO(), io.StringIO()
        r = client.exec_pipe("cat", stdin=source, stdout=out, stderr=err)
        assert (r.exit_code, out.getvalue(), err.getvalue()) == (0, want, "eof\n")
    out = io.StringIO()
    client.exec_pipe("wc", stdout=out)  # no stdin: EOF right after ready
    assert out.getvalue() == "0\n"
    sent = fake.sent()
    pipe = [m for m in sent if m["method"] == "exec_pipe"][-1]
    eof = [m for m in sent if m["method"] == "exec_pipe.stdin_eof"][-1]
    assert eof["params"] == {"id": pipe["id"]} and eof["id"] > pipe["id"]


def test_exec_pipe_from_a_real_pipe(client: Client):
    r, w = os.pipe()
    with os.fdopen(w, "wb") as wf:
        wf.write(b"through a pipe")
    out = io.BytesIO()
    with os.fdopen(r, "rb") as rf:
        client.exec_pipe("cat", stdin=rf, stdout=out)
    assert out.getvalue() == b"through a pipe"


def test_exec_interactive_rows_cols_and_resize(client: Client, fake: FakeServer):
    out = io.StringIO()
    r = client.exec_interactive("cat", stdin=b"typed\n", stdout=out, rows=40, cols=100,
                                resize=[(50, 132), (10, 20)])
    assert r.exit_code == 0
    assert out.getvalue().startswith("rows=40 cols=100\n")
    tty = fake.first("exec_tty")
    assert tty["params"] == {"command": "cat", "rows": 40, "cols": 100, "raw": True}
    resizes = [m["params"] for m in fake.sent() if m["method"] == "exec_tty.resize"]
    assert resizes == [{"id": tty["id"], "rows": 50, "cols": 132},
                       {"id": tty["id"], "rows": 10, "cols": 20}]
    assert client.exec_tty("cat", rows=0, cols=0).exit_code == 0  # alias; 0 -> 24x80
    assert [m["params"] for m in fake.sent() if m["method"] == "exec_tty"][-1] == {
        "command": "cat", "rows": 24, "cols": 80, "raw": True}


def test_log_stream_until_timeout(client: Client, fake: FakeServer):
    out = io.StringIO()
    with pytest.raises(TimeoutError):
        client.log_stream(stdout=out, timeout=0.5)
    assert out.getvalue() == "line 1\nline 2\n"
    client.exec("echo sync")  # lines are read in order: the cancel was read before this
    ls = fake.first("log_stream")
    assert "params" not in ls
    assert any(m["method"] == "cancel" and m["params"] == {"id": ls["id"]} for m in fake.sent())


def test_failing_writer_raises_after_the_call(client: Client):
    class Broken(io.StringIO):
        def write(self, s):
            raise BrokenPipeError("reader went away")

    with pytest.raises(BrokenPipeError):
        client.exec_stream("chunks 3", stdout=Broken())
    assert client.exec("echo ok").stdout == "ok\n"


def test_async_writer_rejected_by_sync_client(client: Client):
    async def writer(data):
        pass

    with pytest.raises(TypeError, match="use AsyncClient"):
        client.exec_stream("echo x", stdout=writer)


def test_server_death_fails_pending_and_later_calls(fake: FakeServer):
    c = Client()
    c.create(Sandbox("img").options())
    with pytest.raises(MatchlockError,
                       match=r"closed unexpectedly \(exit status 3: fake: dying on request\)"):
        c.exec("die")
    with pytest.raises(MatchlockError, match="closed unexpectedly"):
        c.exec("echo x")
    c.close()  # returns promptly, nothing left running (autouse fixture checks)


def test_calls_after_close_fail(fake: FakeServer):
    c = Client()
    c.close()
    with pytest.raises(MatchlockError, match="client is closed"):
        c.exec("echo x")
    c2 = Client()
    c2.exec("echo x")
    c2.close(timeout=5)
    c2.close()
    assert fake.sent()[-1]["params"] == {"timeout_seconds": 5}


def test_events_reach_on_event_and_after_hooks(fake: FakeServer):
    seen: list[Event] = []
    fired = threading.Event()
    dangerous_result: dict = {}

    def safe(ev):
        dangerous_result.setdefault("safe", ev)
        fired.set()

    def dangerous(client, ev):  # may call back into the client
        dangerous_result["echo"] = client.exec("echo from-hook").stdout
        dangerous_result["done"] = True

    vfs = VFSInterceptionConfig(rules=[
        VFSHookRule(name="s", phase="after", ops=["write"], path="/workspace/*", hook=safe),
        VFSHookRule(name="d", phase="after", ops=["write"], dangerous_hook=dangerous),
        VFSHookRule(name="never", phase="after", ops=["read"], hook=lambda e: 1 / 0)])
    sb = Sandbox("img").mount_memory("/workspace").with_workspace("/workspace") \
        .with_vfs_interception(vfs)
    with Client(on_event=seen.append) as c:
        c.create(sb.options())
        file_ev = {"type": "file", "timestamp": 1700000000000,
                   "file": {"op": "WRITE", "path": "/workspace/a.txt", "size": 5, "mode": 420,
                            "uid": 1, "gid": 2}}
        net_ev = {"type": "network", "timestamp": 1700000000,
                  "network": {"method": "GET", "url": "https://x.test/", "host": "x.test",
                              "status_code": 403, "blocked": True, "block_reason": "policy"}}
        c.exec("event " + json.dumps(file_ev))
        c.exec("event " + json.dumps(net_ev))
        assert fired.wait(WAIT)
        wait_for(lambda: dangerous_result.get("done"), "the dangerous hook")
    assert dangerous_result["echo"] == "from-hook\n"
    ev = dangerous_result["safe"]
    assert (ev.op, ev.path, ev.size, ev.mode, ev.uid, ev.gid) == (
        "write", "/workspace/a.txt", 5, 420, 1, 2)
    assert [e.type for e in seen] == ["file", "network"]
    assert seen[1].network.blocked and seen[1].network.status_code == 403


def test_action_and_mutate_hooks_on_own_file_calls(fake: FakeServer):
    def guard(req):
        return "block" if req.path.endswith(".secret") else "allow"

    vfs = VFSInterceptionConfig(rules=[
        VFSHookRule(name="guard", ops=["write", "read", "readdir"], action_hook=guard),
        VFSHookRule(name="upper", path="/w/*.txt", mutate_hook=lambda r: b"MUTATED")])
    with Client() as c:
        c.create(Sandbox("img").with_vfs_interception(vfs).options())
        with pytest.raises(MatchlockError, match="vfs action hook blocked operation: "
                                                 "op=write path=/w/x.secret hook='guard'"):
            c.write_file("/w/x.secret", b"s")
        with pytest.raises(MatchlockError, match="op=read"):
            c.read_file("/w/x.secret")
        c.write_file("/w/a.txt", b"original")
        c.write_file("/w/a.bin", b"original")
    writes = [m["params"] for m in fake.sent() if m["method"] == "write_file"]
    assert [(w["path"], base64.b64decode(w["content"])) for w in writes] == [
        ("/w/a.txt", b"MUTATED"), ("/w/a.bin", b"original")]
    assert "read_file" not in fake.sent_methods()


def test_network_hook_socket_lifecycle(fake: FakeServer):
    calls = []

    def hook(req):
        calls.append(req)
        return NetworkHookResult(action="block")

    cfg = NetworkInterceptionConfig(rules=[NetworkHookRule(phase="before", hook=hook)])
    with Client() as c:
        c.create(Sandbox("img").with_network_interception(cfg).options())
        sock = fake.first("create")["params"]["network"]["interception"]["callback_socket"]
        assert Path(sock).exists() and oct(Path(sock).parent.stat().st_mode & 0o777) == "0o700"
        reply = c.exec("hook " + json.dumps({"callback_id": "network_hook_1",
                                             "phase": "before", "host": "a.test"})).stdout
        assert json.loads(reply) == {"action": "block"}
        assert calls[0].host == "a.test"
    assert not Path(sock).parent.exists()


def test_cli_subcommands(fake: FakeServer):
    with Client() as c:
        c.create(Sandbox("img").options())
        v = c.volume_create("data", size_mb=16)
        assert (v.name, v.size, v.path) == ("data", "16.0 MB", "/vols/data.ext4")
        assert [x.name for x in c.volume_list()] == ["data"]
        with pytest.raises(CLIError) as ei:
            c.volume_remove("nope")
        assert str(ei.value) == "matchlock volume rm nope failed: error: volume nope not found"
        assert isinstance(ei.value, subprocess.CalledProcessError)
        with pytest.raises(MatchlockError, match="volume name is required"):
            c.volume_create("  ")
    c.remove()
    assert {"argv": ["rm", "vm-fake0001"]} in fake.sent()


def test_attach_to_a_control_socket(tmp_path: Path, monkeypatch, fake: FakeServer):
    monkeypatch.setenv("MATCHLOCK_HOME", str(tmp_path / "home"))
    sock_dir = tmp_path / "home" / "vms" / "vm-attached"
    sock_dir.mkdir(parents=True)
    proc = subprocess.Popen([sys.executable, str(FAKE), "--socket",
                             str(sock_dir / "control.sock")], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "ready\n"
        c = Client.attach("vm-attached")
        assert c.vm_id == "vm-attached"
        assert c.exec("echo attached").stdout == "attached\n"
        with pytest.raises(MatchlockError, match="create needs Client"):
            c.create(Sandbox("img").options())
        c.close()
        assert proc.wait(WAIT) == 0  # disconnect = EOF for the server
        assert "close" not in fake.sent_methods()  # the VM is not ours to stop
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with pytest.raises(MatchlockError, match="no running VM behind"):
        Client.attach("vm-00000000")
    with pytest.raises(MatchlockError, match="invalid VM id"):
        Client.attach("../../etc")


def test_calling_the_client_from_a_writer_is_refused_not_deadlocked(client: Client):
    box: dict = {}

    def writer(data: bytes) -> None:
        try:
            client.exec("echo inner")
        except MatchlockError as e:
            box["err"] = e

    client.exec_stream("echo outer", stdout=writer)
    assert "reader thread and cannot call the client" in str(box["err"])
    assert client.exec("echo after").stdout == "after\n"


def test_interrupt_while_waiting_cancels_on_the_server(client: Client, fake: FakeServer):
    import signal

    def interrupt(*_):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 0.3)
    try:
        with pytest.raises(KeyboardInterrupt):
            client.exec("sleep")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    client.exec("echo sync")  # the cancel line was read before this one
    sleep = next(m for m in fake.sent() if m.get("params", {}).get("command") == "sleep")
    assert {"jsonrpc": "2.0", "method": "cancel", "params": {"id": sleep["id"]},
            "id": sleep["id"] + 1} in fake.sent()


def test_oversized_line_ends_the_session(fake: FakeServer):
    from matchlock.sdk._protocol import ClientProtocol

    c = Client()
    c._proto = ClientProtocol(max_line=1000)
    c.create(Sandbox("img").options())
    with pytest.raises(MatchlockError, match="server sent a line longer than 1000 bytes"):
        c.exec("bigline 5000")
    with pytest.raises(MatchlockError, match="longer than 1000"):
        c.exec("echo x")
    c.close()
