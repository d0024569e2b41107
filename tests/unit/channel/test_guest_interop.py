"""Interop: the C guest agent (`matchlock-guest agent --fd N`) driven by ChannelConnection.

The agent runs as an ordinary process on a socketpair; the test is the host, written as
plain blocking socket code. Fails (never skips) when musl-gcc is missing.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import resource
import select
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest

from matchlock.channel import (
    CLOSED,
    DEFAULT_WINDOW,
    F_MORE,
    MAX_PAYLOAD,
    MAX_REQUEST,
    NEED_DATA,
    PROTOCOL_VERSION,
    ChannelConnection,
    Data,
    Eof,
    Exit,
    GoAway,
    Hello,
    Reply,
    Reset,
    Resize,
    Window,
)
from matchlock.errors import CommandTooLargeError
from matchlock.guest_build import build_guest
from matchlock.sandbox import check_exec_size
from matchlock.sandbox._exec_limits import ARG_MAX, EXEC_RESERVE, MAX_ARG_STRLEN

pytestmark = pytest.mark.timeout(90)

ROOT = Path(__file__).resolve().parents[3]
ENV = ["PATH=/usr/local/bin:/usr/bin:/bin", "HOME=/root", "LC_ALL=C"]
IS_ROOT = os.geteuid() == 0


@pytest.fixture(scope="session")
def guest_binary(tmp_path_factory) -> Path:
    return build_guest(ROOT / "guest", tmp_path_factory.mktemp("guest") / "matchlock-guest")


def _guest_stack_limit() -> None:
    # What the VM's agent has (the kernel's default for init): ARG_MAX is a quarter of it.
    resource.setrlimit(resource.RLIMIT_STACK, (8 << 20, resource.RLIM_INFINITY))


class Guest:
    """A running agent plus the host end of its channel."""

    def __init__(self, binary: Path):
        self.sock, theirs = socket.socketpair()
        self.proc = subprocess.Popen(
            [str(binary), "agent", "--fd", str(theirs.fileno())], pass_fds=[theirs.fileno()],
            preexec_fn=_guest_stack_limit,
        )
        theirs.close()
        self.sock.settimeout(15)
        self.conn = ChannelConnection("host")
        self.hello = self.event()
        assert isinstance(self.hello, Hello)
        self.sock.sendall(self.conn.send(Hello(PROTOCOL_VERSION, DEFAULT_WINDOW)))

    def event(self, timeout: float = 15):
        while True:
            ev = self.conn.next_event()
            if ev is not NEED_DATA:
                return ev
            r, _, _ = select.select([self.sock], [], [], timeout)
            if not r:
                raise TimeoutError("no frame from the guest")
            self.conn.receive_data(self.sock.recv(1 << 20))

    def poll_event(self):
        """An event if one can be had without blocking, else None."""
        ev = self.conn.next_event()
        if ev is not NEED_DATA:
            return ev
        r, _, _ = select.select([self.sock], [], [], 0)
        if r:
            self.conn.receive_data(self.sock.recv(1 << 20))
            ev = self.conn.next_event()
        return None if ev is NEED_DATA else ev

    def open(self, request: dict) -> int:
        op = self.conn.open(request)
        self.sock.sendall(self.conn.send(op))
        return op.stream_id

    def exec(self, argv, **kw) -> int:
        return self.open({"op": "exec", "argv": argv, "env": ENV, "cwd": "/", **kw})

    def send(self, ev) -> None:
        self.sock.sendall(self.conn.send(ev))

    def collect(self, sid: int, stdin: bytes | None = None, on_data=None, timeout: float = 60):
        """Run stream `sid` to EXIT: feed `stdin` within credit (then EOF), return credit for
        every DATA consumed. Returns (stdout, stderr, exit, events)."""
        out = {1: bytearray(), 2: bytearray()}
        events: list = []
        view = memoryview(stdin) if stdin is not None else None
        deadline = time.monotonic() + timeout
        while True:
            assert time.monotonic() < deadline, "stream did not finish in time"
            if view is not None:
                credit = self.conn.credit(sid)
                if credit and view:
                    n = min(credit, len(view), 4 * MAX_PAYLOAD)
                    self.sock.sendall(self.conn.send_data(sid, 0, bytes(view[:n])))
                    view = view[n:]
                if not view:
                    self.send(Eof(sid, 0))
                    view = None
            ev = self.poll_event() if view else self.event()
            if ev is None:
                select.select([self.sock], [], [], 0.01)
                continue
            events.append(ev)
            if isinstance(ev, Data):
                assert ev.stream_id == sid
                out[ev.fd] += ev.data
                if on_data:
                    on_data(ev)
                if self.conn.is_open(sid):
                    self.send(Window(sid, len(ev.data)))
            elif isinstance(ev, Exit):
                return bytes(out[1]), bytes(out[2]), ev, events

    def close(self) -> None:
        self.sock.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def guest(guest_binary):
    g = Guest(guest_binary)
    yield g
    g.close()


def test_hello(guest):
    assert guest.hello.version == PROTOCOL_VERSION
    assert guest.hello.window == DEFAULT_WINDOW
    assert guest.hello.uptime_ns and guest.hello.uptime_ns > 0


def test_echo_hi_event_order(guest):
    sid = guest.exec(["echo", "hi"])
    out, err, ex, events = guest.collect(sid)
    assert out == b"hi\n" and err == b""
    assert ex == Exit(sid, code=0)
    assert Data(sid, 1, b"hi\n") in events
    kinds = [type(e) for e in events]
    assert kinds[-1] is Exit
    assert {e.fd for e in events if isinstance(e, Eof)} == {1, 2}
    assert kinds.index(Eof) > kinds.index(Data)
    assert not guest.conn.is_open(sid)


def test_stdout_and_stderr_are_separate(guest):
    sid = guest.exec(["sh", "-c", "echo out; echo err >&2; echo out2"])
    out, err, ex, _ = guest.collect(sid)
    assert out == b"out\nout2\n"
    assert err == b"err\n"
    assert ex.code == 0


@pytest.mark.parametrize("code", [0, 1, 7, 255])
def test_exit_codes(guest, code):
    out, _, ex, _ = guest.collect(guest.exec(["sh", "-c", f"exit {code}"]))
    assert ex.code == code and ex.signal is None and ex.error is None


def test_signal_death(guest):
    _, _, ex, _ = guest.collect(guest.exec(["sh", "-c", "kill -9 $$"]))
    assert ex.signal == 9 and ex.code is None


def test_several_streams_at_once(guest):
    a = guest.exec(["sh", "-c", "sleep 0.2; echo a"])
    b = guest.exec(["echo", "b"])
    seen: dict[int, bytearray] = {a: bytearray(), b: bytearray()}
    exits = {}
    while len(exits) < 2:
        ev = guest.event()
        if isinstance(ev, Data):
            seen[ev.stream_id] += ev.data
            guest.send(Window(ev.stream_id, len(ev.data)))
        elif isinstance(ev, Exit):
            exits[ev.stream_id] = ev
    assert bytes(seen[a]) == b"a\n" and bytes(seen[b]) == b"b\n"
    assert exits[a].code == exits[b].code == 0


def test_stdin_5mb_sha256(guest):
    payload = os.urandom(5 * 1024 * 1024)
    sid = guest.exec(["sha256sum"])
    out, _, ex, _ = guest.collect(sid, stdin=payload)
    assert ex.code == 0
    assert out.split()[0].decode() == hashlib.sha256(payload).hexdigest()


def test_stdin_5mb_cat_round_trip(guest):
    payload = os.urandom(5 * 1024 * 1024)
    sid = guest.exec(["cat"])
    out, _, ex, events = guest.collect(sid, stdin=payload)
    assert ex.code == 0
    assert out == payload
    assert all(len(e.data) <= MAX_PAYLOAD for e in events if isinstance(e, Data))


def test_stdin_false_gives_dev_null(guest):
    out, _, ex, _ = guest.collect(guest.exec(["cat"], stdin=False))
    assert out == b"" and ex.code == 0


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_50mb_stdout_slow_reader_bounded_memory(guest):
    total = 50 * 1024 * 1024
    sid = guest.exec(["head", "-c", str(total), "/dev/zero"])
    peak = [0]
    got = [0]

    def slow(ev):
        got[0] += len(ev.data)
        if got[0] % (1 << 20) < len(ev.data):  # about every MiB
            time.sleep(0.005)
            peak[0] = max(peak[0], _rss_kb(guest.proc.pid))

    out, _, ex, _ = guest.collect(sid, on_data=slow)
    assert ex.code == 0
    assert len(out) == total and out.count(0) == total
    print(f"guest peak RSS {peak[0]} KiB")
    assert 0 < peak[0] < 20 * 1024, f"guest RSS peaked at {peak[0]} KiB"


def test_guest_respects_credit_when_host_stops_granting(guest):
    sid = guest.exec(["head", "-c", str(4 * DEFAULT_WINDOW), "/dev/zero"])
    got = 0
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        ev = guest.poll_event()
        if isinstance(ev, Data):
            got += len(ev.data)
        elif ev is None:
            time.sleep(0.01)
    assert got == DEFAULT_WINDOW  # exactly the window, not a byte more
    guest.send(Window(sid, 3 * DEFAULT_WINDOW))
    out, _, ex, _ = guest.collect(sid)
    assert got + len(out) == 4 * DEFAULT_WINDOW and ex.code == 0


def test_tty_size_and_resize(guest):
    sid = guest.exec(
        ["sh", "-c", "stty size; read x; stty size; test -t 0 && echo tty"],
        tty=True,
        rows=33,
        cols=111,
    )
    buf = bytearray()
    while b"33 111" not in buf:
        ev = guest.event()
        assert isinstance(ev, Data) and ev.fd == 1, ev
        buf += ev.data
        guest.send(Window(sid, len(ev.data)))
    guest.send(Resize(sid, 50, 140))
    guest.send(Data(sid, 0, b"\n"))
    out, err, ex, _ = guest.collect(sid)
    assert b"50 140" in out and b"tty" in out
    assert err == b""
    assert ex.code == 0


def test_tty_eof_sends_veof(guest):
    sid = guest.exec(["cat"], tty=True, rows=24, cols=80)
    guest.send(Data(sid, 0, b"hello\n"))
    guest.send(Eof(sid, 0))
    out, _, ex, _ = guest.collect(sid)
    assert b"hello" in out and ex.code == 0


def test_reset_sleep_exits_quickly(guest):
    sid = guest.exec(["sleep", "1000"])
    time.sleep(0.2)
    t0 = time.monotonic()
    guest.send(Reset(sid))
    _, _, ex, _ = guest.collect(sid, timeout=6)
    assert time.monotonic() - t0 < 6
    assert ex.signal == 15


def test_reset_escalates_to_sigkill(guest):
    sid = guest.exec(["sh", "-c", "trap '' TERM; echo ready; while :; do sleep 0.1; done"])
    ev = guest.event()
    assert ev == Data(sid, 1, b"ready\n")
    t0 = time.monotonic()
    guest.send(Reset(sid))
    _, _, ex, _ = guest.collect(sid, timeout=10)
    assert 4.5 < time.monotonic() - t0 < 8
    assert ex.signal == 9


def test_grandchild_holding_pipe_delays_exit(guest):
    t0 = time.monotonic()
    out, _, ex, _ = guest.collect(guest.exec(["sh", "-c", "(sleep 0.5; echo late) & echo early"]))
    assert out == b"early\nlate\n" and ex.code == 0
    assert time.monotonic() - t0 >= 0.45


def test_missing_binary_is_exit_error(guest):
    sid = guest.exec(["definitely-not-a-binary-xyz"])
    out, err, ex, events = guest.collect(sid)
    assert ex.error and "No such file or directory" in ex.error
    assert ex.code is None and out == b"" and err == b""
    assert not any(isinstance(e, Data) for e in events)


def test_bad_cwd_is_exit_error(guest):
    sid = guest.exec(["true"], cwd="/nonexistent-dir-xyz")
    _, _, ex, _ = guest.collect(sid)
    assert ex.error == "chdir /nonexistent-dir-xyz: No such file or directory"


def test_env_is_complete_and_path_from_request(guest, tmp_path):
    tool = tmp_path / "mytool"
    tool.write_text('#!/bin/sh\necho "tool $FOO"\n')
    tool.chmod(0o755)
    env = [f"PATH={tmp_path}:/usr/bin:/bin", "FOO=bar"]
    sid = guest.open({"op": "exec", "argv": ["mytool"], "env": env, "cwd": str(tmp_path)})
    out, _, ex, _ = guest.collect(sid)
    assert out == b"tool bar\n" and ex.code == 0
    sid = guest.open({"op": "exec", "argv": ["env"], "env": ["A=1", "PATH=/usr/bin:/bin"]})
    out, _, _, _ = guest.collect(sid)
    # HOME is the only addition: from the user's passwd entry, as Docker does.
    import pwd

    home = pwd.getpwuid(os.getuid()).pw_dir
    assert sorted(out.decode().split()) == ["A=1", f"HOME={home}", "PATH=/usr/bin:/bin"]
    sid = guest.open({"op": "exec", "argv": ["env"], "env": ["HOME=/mine", "PATH=/bin"]})
    out, _, _, _ = guest.collect(sid)
    assert sorted(out.decode().split()) == ["HOME=/mine", "PATH=/bin"]


def test_ping_sync_and_unknown_op(guest):
    for op in ("ping", "sync"):
        sid = guest.open({"op": op})
        assert guest.event() == Reply(sid, {"ok": True})
    sid = guest.open({"op": "frobnicate"})
    ev = guest.event()
    assert isinstance(ev, Reply) and ev.body["ok"] is False and "unknown op" in ev.body["error"]


@pytest.mark.parametrize("user", ["nobody", "65534:65534"])
def test_user_switch(guest, user):
    sid = guest.exec(["sh", "-c", "id -u; id -g"], user=user)
    out, _, ex, _ = guest.collect(sid)
    if IS_ROOT:
        nobody = pwd.getpwnam("nobody")
        assert ex.code == 0, ex
        uid, gid = out.split()
        assert int(uid) == 65534 == nobody.pw_uid
        assert int(gid) == (nobody.pw_gid if user == "nobody" else 65534)
    else:
        assert ex.error and "Operation not permitted" in ex.error, ex


def test_unknown_user_is_exit_error(guest):
    _, _, ex, _ = guest.collect(guest.exec(["true"], user="no-such-user-xyz"))
    assert ex.error and "unknown user" in ex.error


def test_bad_request_fields_are_exit_errors(guest):
    for bad in ({"argv": []}, {"argv": "ls"}, {"argv": ["ls"], "tty": "yes"}):
        sid = guest.open({"op": "exec", "env": ENV, **bad})
        ev = guest.event()
        assert (
            isinstance(ev, Exit) and ev.stream_id == sid and ev.error.startswith("bad request")
        ), ev


def test_unicode_argv_round_trips(guest):
    out, _, ex, _ = guest.collect(guest.exec(["printf", "%s", 'snow ☃ \U0001f600 "q" \\']))
    assert out.decode() == 'snow ☃ \U0001f600 "q" \\' and ex.code == 0


def test_late_frames_for_closed_stream_are_ignored(guest):
    sid = guest.exec(["true"])
    guest.collect(sid)
    raw = struct.pack(">BBHII", 4, 0, 0, sid, 4) + struct.pack(">I", 100)
    raw += struct.pack(">BBHII", 7, 0, 0, sid, 1) + b"\x0f"
    guest.sock.sendall(raw)
    ping = guest.open({"op": "ping"})
    assert guest.event() == Reply(ping, {"ok": True})


@pytest.mark.parametrize(
    "raw",
    [
        struct.pack(">BBHII", 0x42, 0, 0, 1, 0),
        struct.pack(">BBHII", 4, 0, 7, 1, 4) + b"\0\0\0\1",
        struct.pack(">BBHII", 3, 0, 0, 1, MAX_PAYLOAD + 1),
        struct.pack(">BBHII", 2, 0, 0, 1, 5) + b"{nope",
        struct.pack(">BBHII", 3, 0, 0, 99, 1) + b"x",
    ],
)
def test_protocol_error_gets_goaway_and_exit_2(guest, raw):
    guest.sock.sendall(raw)
    ev = guest.event()
    assert isinstance(ev, GoAway) and ev.error
    assert guest.proc.wait(5) == 2


def test_data_beyond_window_is_protocol_error(guest):
    sid = guest.exec(["sleep", "5"])
    frame = struct.pack(">BBHII", 3, 0, 0, sid, MAX_PAYLOAD) + b"x" * MAX_PAYLOAD
    # The window plus one pipe buffer (which `sleep` never reads) is all the host may send.
    try:
        guest.sock.sendall(frame * (DEFAULT_WINDOW // MAX_PAYLOAD + 4))
    except (BrokenPipeError, ConnectionResetError):
        pass  # the guest hung up after its GOAWAY; that is still readable
    ev = guest.event()
    while isinstance(ev, Window):
        ev = guest.event()
    assert isinstance(ev, GoAway) and "window" in ev.error
    assert guest.proc.wait(5) == 2


def test_poweroff_replies_and_exits(guest):
    sid = guest.open({"op": "poweroff"})
    assert guest.event() == Reply(sid, {"ok": True})
    assert guest.proc.wait(5) == 0
    guest.conn.receive_data(guest.sock.recv(100))  # b"": the agent closed its end
    assert guest.event() is CLOSED


def test_host_disconnect_ends_agent_and_children(guest, tmp_path):
    marker = tmp_path / "pid"
    sid = guest.exec(["sh", "-c", f"echo $$ > {marker}; echo go; exec sleep 1000"])
    assert guest.event() == Data(sid, 1, b"go\n")
    child = int(marker.read_text())
    guest.sock.shutdown(socket.SHUT_RDWR)
    assert guest.proc.wait(5) == 0
    for _ in range(100):
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("child survived the agent")


def test_no_fd_leaks_into_children(guest):
    sid = guest.exec(["sh", "-c", "ls /proc/self/fd | sort -n | tr '\\n' ' '"])
    out, _, ex, _ = guest.collect(sid)
    assert ex.code == 0
    fds = [int(x) for x in out.split()]
    # 0,1,2 plus the fd `ls` opens on /proc/self/fd itself.
    assert [f for f in fds if f > 2] in ([], [3]), out


# ---- requests bigger than a frame (protocol 2: fragmented OPEN) ---------------------------

DIGESTS = 'for v in "$@"; do printf %s "$v" | sha256sum; done'


def _sha(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()


def test_one_mib_of_environment_reaches_the_child_intact(guest):
    # 1 MiB of values over 9 variables: one variable may hold at most MAX_ARG_STRLEN.
    vals = {f"BIG{i}": os.urandom(60_000).hex()[: 116_600 + i] for i in range(9)}
    env = ENV + [f"{k}={v}" for k, v in vals.items()]
    assert sum(len(v) for v in vals.values()) >= 1 << 20
    check_exec_size(["sh"], env)
    names = " ".join(f'"${k}"' for k in vals)
    sid = guest.exec(["sh", "-c", f"set -- {names}; {DIGESTS}"], env=env)
    out, err, ex, _ = guest.collect(sid)
    assert ex.code == 0, (ex, err)
    assert [line.split()[0] for line in out.decode().splitlines()] == \
        [_sha(v) for v in vals.values()]


def test_long_argv_reaches_the_child_intact(guest):
    args = [os.urandom(605 + i % 100).hex() for i in range(1200)]  # ~1.5 MiB, 1200 strings
    argv = ["sh", "-c", DIGESTS, "sh", *args]
    assert 1.4 * (1 << 20) < sum(map(len, args)) < 1.6 * (1 << 20)
    check_exec_size(argv, ENV)
    op = guest.conn.open({"op": "exec", "argv": argv, "env": ENV, "cwd": "/"})
    raw = guest.conn.send(op)
    frames = len(raw) // (MAX_PAYLOAD + 12) + 1
    assert frames >= 24 and raw[1] == F_MORE
    guest.sock.sendall(raw)
    out, _, ex, _ = guest.collect(op.stream_id)
    assert ex.code == 0, ex
    assert [line.split()[0] for line in out.decode().splitlines()] == [_sha(a) for a in args]
    ping = guest.open({"op": "ping"})  # the connection is in step afterwards
    assert guest.event() == Reply(ping, {"ok": True})


def _runs(guest, argv, env) -> Exit:
    sid = guest.open({"op": "exec", "argv": argv, "env": env, "cwd": "/"})
    return guest.collect(sid)[2]


def test_the_host_check_matches_the_kernel_for_one_string(guest):
    """MAX_ARG_STRLEN as the kernel applies it: the longest string execs, one byte more
    fails in execve (E2BIG), and the host check draws the line at the same byte."""
    longest = "a" * (MAX_ARG_STRLEN - 1)
    assert _runs(guest, ["true", longest], ENV).code == 0
    check_exec_size(["true", longest], ENV)
    ex = _runs(guest, ["true", longest + "a"], ENV)
    assert ex.error and "Argument list too long" in ex.error, ex
    with pytest.raises(CommandTooLargeError, match=r"argv\[1\]"):
        check_exec_size(["true", longest + "a"], ENV)
    var = "V=" + "v" * (MAX_ARG_STRLEN - 3)
    assert _runs(guest, ["true"], [*ENV, var]).code == 0
    ex = _runs(guest, ["true"], [*ENV, var + "v"])
    assert ex.error and "Argument list too long" in ex.error, ex
    with pytest.raises(CommandTooLargeError, match="variable V "):
        check_exec_size(["true"], [*ENV, var + "v"])


def _filling(budget: int) -> list[str]:
    """Arguments that take exactly `budget` bytes as check_exec_size counts them."""
    args, per = [], 100_000 + 1 + 8
    while budget > per + 200:
        args.append("x" * 100_000)
        budget -= per
    args.append("y" * (budget - 9))
    return args


def test_the_host_check_total_is_safe_and_close_to_the_kernel(guest):
    base = ["/bin/true"]
    fixed = check_exec_size(base, ENV)
    at_limit = base + _filling(ARG_MAX - EXEC_RESERVE - fixed)
    assert check_exec_size(at_limit, ENV) == ARG_MAX - EXEC_RESERVE
    assert _runs(guest, at_limit, ENV).code == 0  # what the check lets through execs
    with pytest.raises(CommandTooLargeError, match="ARG_MAX"):
        check_exec_size(at_limit + ["z"], ENV)
    over = base + _filling(ARG_MAX - fixed + 64)  # beyond the kernel's own limit
    ex = _runs(guest, over, ENV)
    assert ex.error and "Argument list too long" in ex.error, ex
    ping = guest.open({"op": "ping"})
    assert guest.event() == Reply(ping, {"ok": True})


@pytest.mark.parametrize("tail", [
    struct.pack(">BBHII", 4, 0, 0, 1, 4) + b"\0\0\0\1",  # another frame in between
    struct.pack(">BBHII", 2, F_MORE, 0, 2, 2) + b"{}",  # another stream's OPEN
    struct.pack(">BBHII", 2, 0x02, 0, 1, 2) + b"{}",  # unknown OPEN flag
])
def test_broken_fragmented_open_is_a_protocol_error(guest, tail):
    raw = struct.pack(">BBHII", 2, F_MORE, 0, 1, 7) + b'{"op":"'
    guest.sock.sendall(raw + tail)
    ev = guest.event()
    assert isinstance(ev, GoAway) and ev.error, ev
    assert guest.proc.wait(5) == 2


def test_fragmented_open_over_max_request_is_a_protocol_error(guest):
    part = struct.pack(">BBHII", 2, F_MORE, 0, 1, MAX_PAYLOAD) + b" " * MAX_PAYLOAD
    try:
        for _ in range(MAX_REQUEST // MAX_PAYLOAD + 1):
            guest.sock.sendall(part)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the guest hung up after its GOAWAY
    ev = guest.event()
    assert isinstance(ev, GoAway) and "exceeds" in ev.error, ev
    assert guest.proc.wait(5) == 2
