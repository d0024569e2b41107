"""Sealed networking without root: the VM's namespace inside an unprivileged user namespace.

A small helper process (this module, fork+exec'd: the supervisor is multi-threaded, and a
multi-threaded process may not enter a new user namespace) does
`unshare(CLONE_NEWUSER | CLONE_NEWNET)`, maps uid/gid 0 to the caller's, and then builds
exactly what the root path builds (`NetNamespace._setup_inside`: lo, TAP, addresses, IPv6
off, nftables, relay listener, DNS socket) with the capabilities it holds in its own user
namespace. It hands the TAP fd and both sockets to the supervisor over a socketpair
(SCM_RIGHTS) and then only waits: for `nft list ruleset` requests, or for EOF, when it
exits. The namespaces live as long as those fds (and the helper) do, so closing them, or
the supervisor dying for any reason, removes everything: nothing is ever left behind.

Needs: user namespaces for unprivileged users, read-write access to /dev/net/tun, nft.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

from matchlock.errors import DependencyError, VmStartError
from matchlock.net._setns import CLONE_NEWNET, CLONE_NEWUSER, unshare

SETUP_TIMEOUT_S = 20.0
_MSG_MAX = 1 << 16


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def missing_requirements(proc: str | Path = "/proc", tun: str | Path = "/dev/net/tun",
                         nft: str | None = "nft") -> list[str]:
    """What keeps this (unprivileged) process from building a namespace; [] if nothing.

    `nft` is the path found for nft, or None if there is none.
    """
    proc, tun = Path(proc), Path(tun)
    missing = []
    if _read(proc / "sys/kernel/unprivileged_userns_clone") == "0":  # Debian/Ubuntu knob
        missing.append("kernel.unprivileged_userns_clone=0")
    for knob in ("user/max_user_namespaces", "user/max_net_namespaces"):
        if _read(proc / "sys" / knob) == "0":
            missing.append(f"{knob.replace('/', '.')}=0")
    if _read(proc / "sys/kernel/apparmor_restrict_unprivileged_userns") == "1":
        missing.append("kernel.apparmor_restrict_unprivileged_userns=1")
    try:
        st = tun.stat()
    except OSError:
        missing.append(f"{tun} does not exist (modprobe tun)")
    else:
        if not os.access(tun, os.R_OK | os.W_OK):
            missing.append(f"{tun} is not read-write for uid {os.getuid()} "
                           f"(mode {stat.S_IMODE(st.st_mode):04o}, owner uid {st.st_uid})")
    if nft is None:
        missing.append("nft not found (install nftables)")
    return missing


def requirement_error(missing: list[str]) -> DependencyError:
    return DependencyError(
        "networking needs root or unprivileged user namespaces: "
        f"{', '.join(missing)}; run as root, or use --no-network"
    )


class UserNetNamespace:
    """The helper process and what it handed over. Built by `spawn`; `close()` ends it."""

    def __init__(self, proc: subprocess.Popen, ctl: socket.socket, tap_fd: int,
                 tcp: socket.socket, udp: socket.socket, timings: dict[str, float]) -> None:
        self.proc = proc
        self.pid = proc.pid
        self._ctl = ctl
        self.tap_fd = tap_fd
        self.tcp_listener = tcp
        self.udp_socket = udp
        self.timings = timings

    def ruleset_text(self) -> str:
        self._ctl.settimeout(SETUP_TIMEOUT_S)
        self._ctl.send(b"ruleset")
        reply = json.loads(self._ctl.recv(_MSG_MAX))
        if "error" in reply:
            raise VmStartError(f"nft list ruleset failed: {reply['error']}")
        return reply["ruleset"]

    def close_helper(self) -> None:
        """EOF on the control socket ends the helper; wait for it (briefly)."""
        with contextlib.suppress(OSError):
            self._ctl.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def spawn(mtu: int, dns_port: int, nft_bin: str, vm_id: str) -> UserNetNamespace:
    """Start the helper and receive the TAP fd and the two sockets. Blocking."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    src_root = str(Path(__file__).resolve().parents[2])  # the dir holding `matchlock`
    code = ("import sys; sys.path.insert(0, sys.argv[1]); "
            "from matchlock.net._userns import _child_main; _child_main()")
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", code, src_root, str(child.fileno()), vm_id, str(mtu),
             str(dns_port), nft_bin],
            pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, start_new_session=True,
        )
    except BaseException:
        parent.close()
        raise
    finally:
        child.close()
    try:
        parent.settimeout(SETUP_TIMEOUT_S)
        try:
            data, fds, _, _ = socket.recv_fds(parent, _MSG_MAX, 3)
        except TimeoutError:
            raise VmStartError("the network namespace helper did not answer") from None
        msg = json.loads(data) if data else None
        if msg is None or not msg.get("ok"):
            for fd in fds:
                os.close(fd)
            raise _helper_failure(msg, proc)
        assert proc.stderr is not None
        proc.stderr.close()
        tap_fd, tcp_fd, udp_fd = fds
        tcp = socket.socket(fileno=tcp_fd)
        udp = socket.socket(fileno=udp_fd)
        os.set_inheritable(tap_fd, False)
        return UserNetNamespace(proc, parent, tap_fd, tcp, udp, msg.get("timings", {}))
    except BaseException:
        parent.close()
        with contextlib.suppress(OSError):
            proc.kill()
        proc.wait()
        raise


def _helper_failure(msg: dict | None, proc: subprocess.Popen) -> Exception:
    if msg is None:  # died before it could say anything
        proc.wait()
        assert proc.stderr is not None
        err = proc.stderr.read().decode(errors="replace").strip().splitlines()
        return VmStartError("the network namespace helper failed: "
                            + (err[-1] if err else f"exit status {proc.returncode}"))
    if msg.get("stage") == "userns":
        return requirement_error([f"cannot create a user namespace ({msg['error']})"])
    if msg.get("kind") == "VmStartError":
        return VmStartError(msg["error"])
    return VmStartError(f"cannot set up the VM's network namespace: {msg['error']}")


# -- the helper process ---------------------------------------------------------------------


def _enter_userns(uid: int, gid: int) -> None:
    unshare(CLONE_NEWUSER | CLONE_NEWNET)
    Path("/proc/self/setgroups").write_text("deny")
    Path("/proc/self/uid_map").write_text(f"0 {uid} 1")
    Path("/proc/self/gid_map").write_text(f"0 {gid} 1")


def _child_main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when we end
    fd, vm_id, mtu, dns_port, nft_bin = sys.argv[2:7]  # argv[1]: the source root
    ctl = socket.socket(fileno=int(fd))
    from matchlock.net.netns import NetNamespace

    t0 = time.monotonic()
    try:
        _enter_userns(os.getuid(), os.getgid())
    except OSError as e:
        ctl.send(json.dumps({"ok": False, "stage": "userns", "error": str(e)}).encode())
        sys.exit(1)
    t1 = time.monotonic()
    ns = NetNamespace(vm_id, int(mtu))
    ns._nft = nft_bin
    try:
        ns._setup_inside(int(dns_port))
    except Exception as e:  # noqa: BLE001 - reported to the supervisor
        ctl.send(json.dumps({"ok": False, "stage": "setup", "kind": type(e).__name__,
                             "error": str(e)}).encode())
        sys.exit(1)
    timings = {"userns": t1 - t0, "ns_setup": time.monotonic() - t1}
    assert ns.tap_fd is not None and ns.tcp_listener and ns.udp_socket
    socket.send_fds(ctl, [json.dumps({"ok": True, "timings": timings}).encode()],
                    [ns.tap_fd, ns.tcp_listener.fileno(), ns.udp_socket.fileno()])
    # Only the supervisor's copies keep them open from now on.
    os.close(ns.tap_fd)
    ns.tcp_listener.close()
    ns.udp_socket.close()
    while True:
        try:
            req = ctl.recv(_MSG_MAX)
        except OSError:
            return
        if not req:
            return
        if req == b"ruleset":
            r = subprocess.run([nft_bin, "list", "ruleset"], capture_output=True, text=True)
            reply = ({"ruleset": r.stdout} if r.returncode == 0
                     else {"error": r.stderr.strip()})
            ctl.send(json.dumps(reply).encode())
