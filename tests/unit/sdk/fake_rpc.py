"""A fake `matchlock rpc` for the SDK's unit tests: NDJSON JSON-RPC on stdin/stdout per
spec/rpc-protocol.md, no VM. Started as a real subprocess through MATCHLOCK_BIN.

Every line it receives is appended, as received, to $FAKE_RPC_LOG (one per line), so a
test can assert exactly what the SDK sent. Behaviour is chosen by the exec command:

    echo TEXT          stdout TEXT\\n                 binary N      stdout bytes(i % 256)
    stderr TEXT        stderr TEXT\\n                 exit N        exit code N
    wait KEY           block until `release KEY`       release KEY   unblock `wait KEY`
    sleep              block until cancelled (-32003)  fail          error -32001
    die                exit 3 with a stderr line      event JSON    emit `event` JSON first
    hook JSON          call the SDK's network hook socket with JSON, stdout = its reply
    noise              junk lines, an unknown id, a foreign notification, then a result
    bigline N          result with N bytes of stdout (one long line)
    utf8split          exec_stream: "é" split across two stdout notifications
    chunks N           exec_stream: N stdout notifications "chunk-i\\n", one stderr
    stream N           exec_stream: N MiB of stdout in 64 KiB notifications
"""

from __future__ import annotations

import base64
import json
import os
import socket
import sys
import threading

LOG = os.environ.get("FAKE_RPC_LOG")
out_lock = threading.Lock()
log_lock = threading.Lock()
cancels: dict[int, threading.Event] = {}
gates: dict[str, threading.Event] = {}
gates_lock = threading.Lock()
stdin_queues: dict[int, list] = {}
stdin_cond = threading.Condition()
resizes: dict[int, list] = {}
files: dict[str, bytes] = {}
state: dict = {"vm": None, "callback_socket": None, "allowed": []}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


io_: dict = {"in": None, "out": None}  # binary streams: stdio, or a control-socket connection


def send(obj: dict) -> None:
    write_raw(json.dumps(obj) + "\n")


def write_raw(text: str) -> None:
    with out_lock:
        io_["out"].write(text.encode())
        io_["out"].flush()


def result(rid, res) -> None:
    msg = {"jsonrpc": "2.0", "result": res}
    if rid is not None:
        msg["id"] = rid
    send(msg)


def error(rid, code: int, message: str) -> None:
    msg = {"jsonrpc": "2.0", "error": {"code": code, "message": message}}
    if rid is not None:
        msg["id"] = rid
    send(msg)


def notify(method: str, params: dict) -> None:
    send({"jsonrpc": "2.0", "method": method, "params": params})


def gate(key: str) -> threading.Event:
    with gates_lock:
        return gates.setdefault(key, threading.Event())


def run_exec(rid, method: str, params: dict) -> None:
    cmd = params.get("command", "")
    word, _, arg = cmd.partition(" ")
    cancelled = cancels.get(rid) or threading.Event()
    out = b""
    err = b""
    code = 0
    stream = method == "exec_stream"

    def emit(kind: str, data: bytes) -> None:
        notify(f"{method}.{kind}", {"id": rid, "data": b64(data)})

    if word == "echo":
        out = arg.encode() + b"\n"
    elif word == "binary":
        out = bytes(i % 256 for i in range(int(arg)))
    elif word == "stderr":
        err = arg.encode() + b"\n"
    elif word == "exit":
        code = int(arg)
    elif word == "wait":
        gate(arg).wait()
        out = f"released {arg}\n".encode()
    elif word == "release":
        gate(arg).set()
    elif word == "sleep":
        cancelled.wait()
        error(rid, -32003, "context canceled")
        return
    elif word == "fail":
        error(rid, -32001, "exec failed: agent unreachable")
        return
    elif word == "die":
        sys.stderr.write("fake: dying on request\n")
        sys.stderr.flush()
        os._exit(3)
    elif word == "event":
        notify("event", json.loads(arg))
        if stream:
            emit("stdout", b"after-event\n")
    elif word == "hook":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(state["callback_socket"])
        sock.sendall(arg.encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            buf += chunk
        sock.close()
        out = buf
    elif word == "noise":
        write_raw("this is not json\n\n[1,2]\n")
        result(999999, {"exit_code": 9})
        notify("exec_stream.stdout", {"id": 999998, "data": b64(b"stray")})
        notify("some.future.notification", {"id": rid})
        error(None, -32700, "Parse error")
    elif word == "bigline":
        out = b"x" * int(arg)
    elif word == "stream":  # N MiB in 64 KiB chunks (benchmarks)
        chunk = b64(b"z" * 65536)
        for _ in range(int(arg) * 16):
            notify(f"{method}.stdout", {"id": rid, "data": chunk})
    elif word == "utf8split" and stream:
        e = "é".encode()
        emit("stdout", b"caf" + e[:1])
        emit("stdout", e[1:] + b"\n")
    elif word == "chunks" and stream:
        for i in range(int(arg)):
            emit("stdout", f"chunk-{i}\n".encode())
        emit("stderr", b"done\n")
    elif word == "badb64":
        result(rid, {"exit_code": 0, "stdout": "!!notbase64", "stderr": "", "duration_ms": 1})
        return
    if method == "exec":
        result(rid, {"exit_code": code, "stdout": b64(out), "stderr": b64(err), "duration_ms": 3})
        return
    if out:
        emit("stdout", out)
    if err:
        emit("stderr", err)
    result(rid, {"exit_code": code, "duration_ms": 3})


def run_interactive(rid, method: str, params: dict) -> None:
    cmd = params.get("command", "")
    with stdin_cond:
        stdin_queues[rid] = []
    resizes[rid] = []
    notify(f"{method}.ready", {"id": rid})
    if method == "exec_tty":
        head = f"rows={params.get('rows')} cols={params.get('cols')}\n".encode()
        notify("exec_tty.stdout", {"id": rid, "data": b64(head)})
    total = 0
    while True:
        with stdin_cond:
            while not stdin_queues[rid]:
                stdin_cond.wait()
            item = stdin_queues[rid].pop(0)
        if item is None:
            break
        total += len(item)
        if cmd == "cat":
            notify(f"{method}.stdout", {"id": rid, "data": b64(item)})
    if cmd == "wc":
        notify(f"{method}.stdout", {"id": rid, "data": b64(f"{total}\n".encode())})
    if method == "exec_tty" and resizes[rid]:
        tail = "".join(f"resize {r}x{c}\n" for r, c in resizes[rid]).encode()
        notify("exec_tty.stdout", {"id": rid, "data": b64(tail)})
    if method == "exec_pipe":
        notify("exec_pipe.stderr", {"id": rid, "data": b64(b"eof\n")})
    result(rid, {"exit_code": 0, "duration_ms": 5})


def handle(msg: dict) -> None:
    rid = msg.get("id")
    method = msg.get("method")
    params = msg.get("params") or {}
    if method in ("exec", "exec_stream"):
        run_exec(rid, method, params)
    elif method in ("exec_pipe", "exec_tty"):
        if rid is None:
            error(None, -32600, f"{method} requires request id")
            return
        run_interactive(rid, method, params)
    elif method == "exec_tty.resize":
        resizes.setdefault(params["id"], []).append((params["rows"], params["cols"]))
    elif method == "write_file":
        files[params["path"]] = base64.b64decode(params["content"])
        result(rid, {})
    elif method == "read_file":
        path = params["path"]
        if path.startswith("/big/"):
            n = int(path[5:])
            result(rid, {"content": b64((bytes(range(251)) * (n // 251 + 1))[:n])})
        elif path in files:
            result(rid, {"content": b64(files[path])})
        else:
            error(rid, -32002, f"guest file operation: open {path}: no such file or directory")
    elif method == "list_files":
        d = params["path"].rstrip("/") + "/"
        entries = [{"name": p[len(d):], "size": len(c), "mode": 420,
                    "mod_time": "0001-01-01T00:00:00Z", "is_dir": False}
                   for p, c in sorted(files.items()) if p.startswith(d)]
        entries.append({"name": "sub", "size": 0, "mode": 2147484141, "is_dir": True})
        result(rid, {"files": entries})
    elif method == "log":
        result(rid, {"content": b64(b"boot ok\n\xff\n")})
    elif method == "log_stream":
        cancelled = cancels.get(rid) or threading.Event()
        notify("log_stream.data", {"id": rid, "data": b64(b"line 1\n")})
        notify("log_stream.data", {"id": rid, "data": b64(b"line 2\n")})
        cancelled.wait()
        error(rid, -32003, "context canceled")
    elif method == "allow_list_add":
        added = [h for h in params["hosts"] if h not in state["allowed"]]
        state["allowed"].extend(added)
        result(rid, {"added": added, "allowed_hosts": list(state["allowed"])})
    elif method == "allow_list_delete":
        removed = [h for h in params["hosts"] if h in state["allowed"]]
        state["allowed"] = [h for h in state["allowed"] if h not in removed]
        result(rid, {"removed": removed, "allowed_hosts": state["allowed"] or None})
    elif method == "port_forward":
        bindings = [{"address": a, "local_port": f["local_port"] or 40000,
                     "remote_port": f["remote_port"]}
                    for f in params["forwards"] for a in params.get("addresses") or ["127.0.0.1"]]
        result(rid, {"bindings": bindings})
    else:
        error(rid, -32601, "Method not found")


def handle_tracked(msg: dict) -> None:
    try:
        handle(msg)
    finally:
        cancels.pop(msg.get("id"), None)  # finished: no longer cancellable


def log_line(raw: str) -> None:
    if LOG:
        with log_lock, open(LOG, "a") as f:
            f.write(raw.rstrip("\n") + "\n")


def main() -> None:
    if sys.argv[1:2] == ["--socket"]:
        # Control-socket mode (for Client.attach): serve one connection on a Unix socket,
        # printing "ready" on stdout once it listens.
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(sys.argv[2])
        srv.listen(1)
        print("ready", flush=True)
        conn, _ = srv.accept()
        io_["in"], io_["out"] = conn.makefile("rb"), conn.makefile("wb")
        state["vm"] = "vm-attached"
        serve()
        return
    argv = sys.argv[1:]
    if argv[:1] == ["rm"] and len(argv) == 2:
        log_line(json.dumps({"argv": argv}))
        print(argv[1])
        return
    if argv[:2] == ["volume", "create"] and argv[3:] == ["--size", argv[4], "--json"]:
        log_line(json.dumps({"argv": argv}))
        print(json.dumps({"name": argv[2], "size": f"{float(argv[4]):.1f} MB",
                          "path": f"/vols/{argv[2]}.ext4"}))
        return
    if argv == ["volume", "ls", "--json"]:
        print(json.dumps([{"name": "data", "size": "16.0 MB", "path": "/vols/data.ext4"}]))
        return
    if argv[:2] == ["volume", "rm"]:
        sys.stderr.write(f"error: volume {argv[2]} not found\n")
        sys.exit(1)
    if sys.argv[1:] != ["rpc"]:
        sys.stderr.write(f"fake: expected argv ['rpc'], got {sys.argv[1:]}\n")
        sys.exit(2)
    io_["in"], io_["out"] = sys.stdin.buffer, sys.stdout.buffer
    serve()
    sys.exit(0)


def serve() -> None:
    for raw in io_["in"]:
        line = raw.decode()
        log_line(line)
        if not line.strip():
            continue
        try:
            msg = json.loads(line)
        except ValueError:
            error(None, -32700, "Parse error")
            continue
        method = msg.get("method")
        rid = msg.get("id")
        params = msg.get("params") or {}
        if method == "create":
            if params.get("image") == "fail":
                error(rid, -32000, "create VM: failed to build rootfs: no such image")
                continue
            interception = (params.get("network") or {}).get("interception") or {}
            state["callback_socket"] = interception.get("callback_socket")
            state["vm"] = "vm-fake0001"
            result(rid, {"id": state["vm"]})
        elif method == "close":
            result(rid, {})
        elif method == "cancel":
            target = params.get("id")
            ev = cancels.get(target)
            if ev is not None:
                ev.set()
            result(rid, {"cancelled": ev is not None})
        elif method in ("exec_pipe.stdin", "exec_tty.stdin", "exec_pipe.stdin_eof",
                        "exec_tty.stdin_eof"):
            target = params.get("id")
            item = None if method.endswith("_eof") else base64.b64decode(params["data"])
            with stdin_cond:
                if target in stdin_queues:
                    stdin_queues[target].append(item)
                    stdin_cond.notify_all()
        else:
            if isinstance(rid, int):
                cancels[rid] = threading.Event()  # before `cancel` can name it
            threading.Thread(target=handle_tracked, args=(msg,), daemon=True).start()


if __name__ == "__main__":
    main()
