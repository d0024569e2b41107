"""Sans-I/O tests for the channel core: both ends, every chunking, credit, errors, fuzz."""

from __future__ import annotations

import random
import struct

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
    LocalChannelError,
    Open,
    RemoteChannelError,
    Reply,
    Reset,
    Resize,
    Signal,
    Window,
)


class ConnectionPair:
    """A host and a guest joined by a fake link; `send` asserts the event arrives intact."""

    def __init__(self, host_window: int = DEFAULT_WINDOW, guest_window: int = DEFAULT_WINDOW):
        self.host = ChannelConnection("host", host_window)
        self.guest = ChannelConnection("guest", guest_window)
        self.send("guest", Hello(PROTOCOL_VERSION, guest_window, uptime_ns=123))
        self.send("host", Hello(PROTOCOL_VERSION, host_window))

    def conns(self, side: str) -> tuple[ChannelConnection, ChannelConnection]:
        return (self.host, self.guest) if side == "host" else (self.guest, self.host)

    def send(self, side, event, chunking="whole"):
        sender, receiver = self.conns(side)
        raw = sender.send(event)
        return self.deliver(receiver, raw, chunking)

    @staticmethod
    def deliver(receiver, raw, chunking="whole"):
        events = []
        if chunking == "whole":
            receiver.receive_data(raw)
            events += drain(receiver)
        elif chunking == "bytewise":
            for i in range(len(raw)):
                receiver.receive_data(raw[i : i + 1])
                events += drain(receiver)
        else:
            raise AssertionError(chunking)
        return events


def frame(ftype: int, flags: int, sid: int, payload: bytes, reserved: int = 0) -> bytes:
    return struct.pack(">BBHII", ftype, flags, reserved, sid, len(payload)) + payload


def drain(conn):
    out = []
    while True:
        ev = conn.next_event()
        if ev is NEED_DATA or ev is CLOSED:
            return out
        out.append(ev)


@pytest.fixture
def pair():
    return ConnectionPair()


ALL_CHUNKINGS = ["whole", "bytewise"]


@pytest.mark.parametrize("chunking", ALL_CHUNKINGS)
def test_every_event_round_trips(chunking):
    p = ConnectionPair()
    op = p.host.open({"op": "exec", "argv": ["echo", "hi ☃"], "env": [], "tty": False})
    assert op.stream_id == 1
    host_events = [
        op,
        Data(1, 0, b"stdin bytes"),
        Window(1, 4096),
        Resize(1, 50, 132),
        Signal(1, 15),
        Eof(1, 0),
    ]
    for ev in host_events:
        assert p.send("host", ev, chunking) == [ev]
    guest_events = [
        Data(1, 1, b"x" * MAX_PAYLOAD),
        Data(1, 2, b"\x00err"),
        Window(1, 11),
        Eof(1, 1),
        Eof(1, 2),
        Exit(1, code=7),
    ]
    for ev in guest_events:
        assert p.send("guest", ev, chunking) == [ev]
    assert not p.host.is_open(1) and not p.guest.is_open(1)
    for body in ({"ok": True}, {"ok": False, "error": "nope"}):
        op = p.host.open({"op": "ping"})
        assert p.send("host", op, chunking) == [op]
        assert p.send("guest", Reply(op.stream_id, body), chunking) == [Reply(op.stream_id, body)]
    for exit_ev in (lambda s: Exit(s, signal=9), lambda s: Exit(s, error="chdir /x: ENOENT")):
        op = p.host.open({"op": "exec"})
        p.send("host", op, chunking)
        assert p.send("guest", exit_ev(op.stream_id), chunking) == [exit_ev(op.stream_id)]
    op = p.host.open({"op": "exec"})
    p.send("host", op, chunking)
    assert p.send("guest", Reset(op.stream_id), chunking) == [Reset(op.stream_id)]
    assert p.send("guest", GoAway("bye"), chunking) == [GoAway("bye")]
    assert p.host.next_event() is CLOSED


def test_hello_round_trip_fields():
    p = ConnectionPair(host_window=1000, guest_window=2000)
    assert p.host.peer_hello == Hello(PROTOCOL_VERSION, 2000, uptime_ns=123)
    assert p.guest.peer_hello == Hello(PROTOCOL_VERSION, 1000)


def test_trailing_bytes_and_many_frames_in_one_chunk(pair):
    op = pair.host.open({"op": "exec"})
    raw = pair.host.send(op) + pair.host.send(Data(1, 0, b"a")) + pair.host.send(Eof(1, 0))
    extra = pair.host.send(Signal(1, 2))
    pair.guest.receive_data(raw + extra[:5])
    assert drain(pair.guest) == [op, Data(1, 0, b"a"), Eof(1, 0)]
    assert pair.guest.next_event() is NEED_DATA
    pair.guest.receive_data(extra[5:])
    assert drain(pair.guest) == [Signal(1, 2)]


def test_clean_eof_and_eof_mid_frame(pair):
    pair.guest.receive_data(b"")
    assert pair.guest.next_event() is CLOSED
    p2 = ConnectionPair()
    p2.guest.receive_data(p2.host.send(p2.host.open({"op": "ping"}))[:7])
    p2.guest.receive_data(b"")
    with pytest.raises(RemoteChannelError, match="inside a frame"):
        p2.guest.next_event()


def test_send_credit_enforced(pair):
    op = pair.host.open({"op": "exec"})
    pair.send("host", op)
    assert pair.guest.credit(1) == DEFAULT_WINDOW
    frames = pair.guest.send_data(1, 1, b"z" * DEFAULT_WINDOW)
    assert len(frames) == DEFAULT_WINDOW + 4 * 12
    evs = ConnectionPair.deliver(pair.host, frames)
    assert b"".join(e.data for e in evs) == b"z" * DEFAULT_WINDOW
    assert pair.guest.credit(1) == 0
    with pytest.raises(LocalChannelError, match="credit"):
        pair.guest.send(Data(1, 1, b"!"))
    with pytest.raises(LocalChannelError, match="ERROR"):
        pair.guest.send(Eof(1, 1))


def test_window_returns_credit(pair):
    pair.send("host", pair.host.open({"op": "exec"}))
    ConnectionPair.deliver(pair.host, pair.guest.send_data(1, 1, b"a" * DEFAULT_WINDOW))
    pair.send("host", Window(1, 10))
    assert pair.guest.credit(1) == 10
    pair.send("guest", Data(1, 1, b"0123456789"))
    assert pair.guest.credit(1) == 0


def test_receive_beyond_window_is_remote_error():
    host = ChannelConnection("host")
    guest = ChannelConnection("guest", window=10)
    host.receive_data(guest.send(Hello(PROTOCOL_VERSION, 10)))
    drain(host)
    # A host that ignores the window: forge the frame with a second, larger-window guest view.
    guest.receive_data(host.send(Hello(PROTOCOL_VERSION, DEFAULT_WINDOW)))
    drain(guest)
    guest.receive_data(host.send(host.open({"op": "exec"})))
    drain(guest)
    raw = host.send(Data(1, 0, b"0123456789"))
    raw += struct.pack(">BBHII", 3, 0, 0, 1, 1) + b"!"
    guest.receive_data(raw)
    assert guest.next_event() == Data(1, 0, b"0123456789")
    with pytest.raises(RemoteChannelError, match="exceeds window"):
        guest.next_event()
    with pytest.raises(LocalChannelError):
        guest.next_event()
    assert guest.send(GoAway("window")).startswith(b"\x0b")


def test_data_before_peer_hello_is_local_error():
    host = ChannelConnection("host")
    host.send(Hello(PROTOCOL_VERSION, DEFAULT_WINDOW))
    with pytest.raises(LocalChannelError):
        host.credit(1)


def test_first_frame_must_be_hello():
    host = ChannelConnection("host")
    with pytest.raises(LocalChannelError, match="HELLO"):
        host.send(Window(1, 1))


def test_version_mismatch():
    # A version-1 peer would not understand fragmented OPENs: refused, not guessed at.
    host = ChannelConnection("host")
    raw = frame(1, 0, 0, b'{"version":1,"window":65536}')
    host.receive_data(raw)
    with pytest.raises(RemoteChannelError, match="version"):
        host.next_event()


def _guest_with_stream() -> tuple[ChannelConnection, ChannelConnection]:
    p = ConnectionPair()
    p.send("host", p.host.open({"op": "exec"}))
    return p.host, p.guest


@pytest.mark.parametrize(
    "raw, match",
    [
        (struct.pack(">BBHII", 0x7F, 0, 0, 1, 0), "unknown frame type"),
        (struct.pack(">BBHII", 0x00, 0, 0, 1, 0), "unknown frame type"),
        (struct.pack(">BBHII", 3, 0, 1, 1, 1) + b"x", "reserved"),
        (struct.pack(">BBHII", 3, 0, 0, 1, MAX_PAYLOAD + 1), "exceeds"),
        (struct.pack(">BBHII", 3, 0, 0, 1, 0), "1..65536"),
        (struct.pack(">BBHII", 3, 1, 0, 1, 1) + b"x", "fd 1"),
        (struct.pack(">BBHII", 3, 0, 0, 9, 1) + b"x", "never opened"),
        (struct.pack(">BBHII", 4, 0, 0, 1, 3) + b"xxx", "payload must be 4"),
        (struct.pack(">BBHII", 4, 0, 0, 1, 4) + b"\0\0\0\0", "increment"),
        (struct.pack(">BBHII", 6, 1, 0, 1, 4) + b"\0\0\0\0", "flags"),
        (frame(8, 0, 1, b'{"code":0}'), "may only be sent by the guest"),
        (frame(2, 0, 1, b'{"op":"x"}'), "not increasing"),
        (frame(2, 0, 5, b"[1]"), "not an object"),
        (struct.pack(">BBHII", 2, 0, 0, 5, 3) + b"{x}", "invalid JSON"),
        (frame(1, 0, 0, b'{"version":2,"window":5}'), "duplicate HELLO"),
        (struct.pack(">BBHII", 11, 0, 0, 3, 2) + b"{}", "nonzero stream id"),
    ],
)
def test_guest_rejects_bad_frames(raw, match):
    _, guest = _guest_with_stream()
    for chunking in ("whole", "bytewise"):
        _, guest = _guest_with_stream()
        with pytest.raises(RemoteChannelError, match=match):
            ConnectionPair.deliver(guest, raw, chunking)
        with pytest.raises(LocalChannelError):
            guest.next_event()


def test_late_frames_on_closed_stream_are_ignored(pair):
    pair.send("host", pair.host.open({"op": "exec"}))
    pair.send("guest", Exit(1, code=0))
    # The host's WINDOW crossed the EXIT: the host sends nothing, the guest ignores it.
    assert pair.host.send(Window(1, 5)) == b""
    late = struct.pack(">BBHII", 4, 0, 0, 1, 4) + struct.pack(">I", 5)
    assert ConnectionPair.deliver(pair.guest, late) == []
    late_data = struct.pack(">BBHII", 3, 1, 0, 1, 2) + b"ab"
    assert ConnectionPair.deliver(pair.host, late_data) == []
    with pytest.raises(LocalChannelError, match="closed"):
        pair.host.send(Data(1, 0, b"x"))


def test_host_reset_keeps_stream_until_exit(pair):
    pair.send("host", pair.host.open({"op": "exec"}))
    pair.send("host", Reset(1))
    assert pair.host.is_open(1)
    assert pair.send("guest", Data(1, 1, b"tail")) == [Data(1, 1, b"tail")]
    assert pair.send("guest", Exit(1, signal=15)) == [Exit(1, signal=15)]
    assert not pair.host.is_open(1) and not pair.guest.is_open(1)


def test_data_after_eof_is_error(pair):
    pair.send("host", pair.host.open({"op": "exec"}))
    pair.send("guest", Eof(1, 1))
    with pytest.raises(LocalChannelError, match="after EOF"):
        pair.guest.send(Data(1, 1, b"x"))


def test_wrong_direction_is_local_error(pair):
    with pytest.raises(LocalChannelError):
        pair.guest.open({"op": "ping"})
    p = ConnectionPair()
    p.send("host", p.host.open({"op": "exec"}))
    with pytest.raises(LocalChannelError, match="guest"):
        p.host.send(Exit(1, code=0))


@pytest.mark.parametrize(
    "make",
    [
        lambda: Data(0, 1, b"x"),
        lambda: Data(1, 3, b"x"),
        lambda: Data(1, 1, b""),
        lambda: Data(1, 1, b"x" * (MAX_PAYLOAD + 1)),
        lambda: Window(1, 0),
        lambda: Window(1, 2**31),
        lambda: Exit(1),
        lambda: Exit(1, code=1, signal=2),
        lambda: Exit(1, code=True),
        lambda: Resize(1, 70000, 1),
        lambda: Signal(1, 0),
        lambda: Open(1, {"argv": []}),
        lambda: Reply(1, {"error": "x"}),
        lambda: Hello(PROTOCOL_VERSION, 0),
    ],
)
def test_events_validate_at_construction(make):
    with pytest.raises(LocalChannelError):
        make()


def test_events_are_frozen():
    ev = Data(1, 1, b"x")
    with pytest.raises(AttributeError):
        ev.fd = 2  # type: ignore[misc]


def test_parse_is_linear_for_many_small_frames(pair):
    pair.send("host", pair.host.open({"op": "exec"}))
    raw = pair.guest.send_data(1, 1, b"q" * 60000)
    frames = b"".join(pair.guest.send(Window(1, 1)) for _ in range(50000))
    pair.host.receive_data(raw + frames)
    n = 0
    while pair.host.next_event() is not NEED_DATA:
        n += 1
    assert n == 50001


def test_fuzz_random_bytes_only_events_or_remote_errors():
    rng = random.Random(1234)
    prefix_pair = ConnectionPair()
    valid = [
        prefix_pair.host.send(prefix_pair.host.open({"op": "exec"})),
        prefix_pair.host.send(Data(1, 0, b"abc")),
        prefix_pair.host.send(Window(1, 3)),
        prefix_pair.host.send(Resize(1, 2, 3)),
        prefix_pair.host.send(Eof(1, 0)),
    ]
    for _ in range(3000):
        role = rng.choice(["host", "guest"])
        conn = ChannelConnection(role)
        conn.send(Hello(PROTOCOL_VERSION, DEFAULT_WINDOW))
        if rng.random() < 0.5:
            host_hello = ChannelConnection("host").send(Hello(PROTOCOL_VERSION, DEFAULT_WINDOW))
            conn.receive_data(host_hello)
        parts = []
        for _ in range(rng.randrange(1, 6)):
            if rng.random() < 0.5:
                frame = bytearray(rng.choice(valid))
                if rng.random() < 0.7:
                    frame[rng.randrange(len(frame))] = rng.randrange(256)
                parts.append(bytes(frame))
            else:
                parts.append(rng.randbytes(rng.randrange(0, 40)))
        data = b"".join(parts)
        try:
            pos = 0
            while pos < len(data):
                step = rng.randrange(1, 20)
                conn.receive_data(data[pos : pos + step])
                pos += step
                drain(conn)
            conn.receive_data(b"")
            drain(conn)
        except RemoteChannelError:
            pass


# ---- fragmented OPEN (protocol 2) -----------------------------------------------------------


def _frames_of(raw: bytes) -> list[tuple[int, int, int, int]]:
    out, off = [], 0
    while off < len(raw):
        ftype, flags, _, sid, length = struct.unpack_from(">BBHII", raw, off)
        out.append((ftype, flags, sid, length))
        off += 12 + length
    return out


def _deliver_in_random_chunks(receiver, raw: bytes, seed: int) -> list:
    rng, events, pos = random.Random(seed), [], 0
    while pos < len(raw):
        step = rng.choice([1, 7, 12, 13, 4096, 65547, 200_000])
        receiver.receive_data(raw[pos : pos + step])
        pos += step
        events += drain(receiver)
    return events


def test_big_open_is_split_and_reassembled():
    p = ConnectionPair()
    big = "v" * (2 << 20)
    op = p.host.open({"op": "exec", "argv": ["sh", "-c", "x" * 100_000], "env": [f"BIG={big}"]})
    raw = p.host.send(op)
    frames = _frames_of(raw)
    assert len(frames) == -(-len(raw) // (MAX_PAYLOAD + 12))
    assert all(f[:3] == (2, F_MORE, 1) and f[3] == MAX_PAYLOAD for f in frames[:-1])
    assert frames[-1][:3] == (2, 0, 1) and 0 < frames[-1][3] <= MAX_PAYLOAD
    assert _deliver_in_random_chunks(p.guest, raw, 7) == [op]
    # The stream works as usual afterwards, and so does the next (small) OPEN.
    assert p.send("guest", Exit(1, code=0)) == [Exit(1, code=0)]
    op2 = p.host.open({"op": "ping"})
    assert p.send("host", op2) == [op2]


@pytest.mark.parametrize("extra, frames", [(0, 1), (1, 2)])
def test_open_split_boundary(extra, frames):
    p = ConnectionPair()
    skeleton = len(b'{"op":"exec","pad":""}')
    op = p.host.open({"op": "exec", "pad": "p" * (MAX_PAYLOAD - skeleton + extra)})
    raw = p.host.send(op)
    assert len(_frames_of(raw)) == frames
    assert p.deliver(p.guest, raw) == [op]


def _fragment(sid: int, payload: bytes, more: bool = True) -> bytes:
    return frame(2, F_MORE if more else 0, sid, payload)


@pytest.mark.parametrize(
    "raw, match",
    [
        (_fragment(5, b'{"op":') + frame(4, 0, 1, b"\0\0\0\1"), "inside the fragmented OPEN"),
        (_fragment(5, b'{"op":') + _fragment(6, b'"x"}', more=False), "inside the fragmented"),
        (_fragment(1, b'{"op":'), "not increasing"),
        (frame(2, 0x02, 5, b'{"op":"x"}'), "flags"),
        (_fragment(5, b'{"op":') + frame(2, 0x03, 5, b'"x"}'), "flags"),
        (_fragment(5, b'{"op":') + _fragment(5, b'"x"', more=False), "invalid JSON"),
    ],
)
def test_guest_rejects_bad_fragments(raw, match):
    _, guest = _guest_with_stream()
    with pytest.raises(RemoteChannelError, match=match):
        ConnectionPair.deliver(guest, raw)


def test_fragmented_open_is_bounded():
    _, guest = _guest_with_stream()
    chunk = _fragment(5, b" " * MAX_PAYLOAD)
    with pytest.raises(RemoteChannelError, match="exceeds"):
        for _ in range(MAX_REQUEST // MAX_PAYLOAD + 1):
            guest.receive_data(chunk)
            drain(guest)


def test_eof_inside_fragmented_open_is_an_error():
    _, guest = _guest_with_stream()
    guest.receive_data(_fragment(5, b'{"op":'))
    assert drain(guest) == []
    guest.receive_data(b"")
    with pytest.raises(RemoteChannelError, match="fragmented OPEN"):
        guest.next_event()


def test_host_refuses_open_fragments_from_the_guest(pair):
    with pytest.raises(RemoteChannelError, match="only be sent by the host"):
        ConnectionPair.deliver(pair.host, _fragment(1, b'{"op":'))


def test_request_over_max_request_is_a_local_error_that_spares_the_connection(pair):
    op = pair.host.open({"op": "exec", "env": ["A=" + "a" * MAX_REQUEST]})
    with pytest.raises(LocalChannelError, match="exceeds"):
        pair.host.send(op)
    with pytest.raises(LocalChannelError, match="JSON"):
        pair.host.send(pair.host.open({"op": "exec", "env": ["\udcff"]}))  # lone surrogate
    assert not pair.host.open_streams  # nothing recorded
    ping = pair.host.open({"op": "ping"})  # a later id: gaps are fine, reuse is not
    assert pair.send("host", ping) == [ping]
