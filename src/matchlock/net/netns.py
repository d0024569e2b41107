"""A VM's own network namespace: `lo`, one TAP for QEMU, nftables rules, no route out.

Layout inside namespace `ml-<vm id hex>`:

    lo (up)     TAP_NAME: GATEWAY_IP/PREFIX_LEN, MTU from the config, up
    no default route, IPv6 disabled, ruleset from `nft.ruleset()`

The supervisor stays in the host namespace. It enters the namespace only on short-lived
helper threads (`_setns.run_in_netns`) to create the TAP (the device is created in the
namespace of whoever opens /dev/net/tun), the listening sockets, and to run `nft`. QEMU
gets the TAP as an inherited fd, so it runs in the host namespace too.

Deleting the namespace removes the TAP and the rules with it. An owner file under
/run/matchlock/netns lets `leftover_namespaces()` find the namespaces of dead supervisors.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import logging
import os
import shutil
import socket
import struct
import subprocess
import time
from pathlib import Path
from typing import Literal

from matchlock.errors import DependencyError, VmStartError
from matchlock.net import _mounts, _userns, nft
from matchlock.net._setns import run_in_netns
from matchlock.net.types import DEFAULT_MTU, GATEWAY_IP, PREFIX_LEN, TAP_NAME

log = logging.getLogger(__name__)

NETNS_DIR = Path("/run/netns")  # where `ip netns` keeps its bind mounts
OWNER_DIR = Path("/run/matchlock/netns")  # <name>: "<pid> <start time>" of the supervisor
NAME_PREFIX = "ml-"

# <linux/if_tun.h>, <linux/sockios.h>
TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
SIOCSIFFLAGS = 0x8914
SIOCGIFFLAGS = 0x8913
SIOCSIFADDR = 0x8916
SIOCSIFNETMASK = 0x891C
SIOCSIFMTU = 0x8922
IFF_UP = 0x1

ListenerKind = Literal["tcp", "udp"]


def _find_tool(name: str) -> str | None:
    return shutil.which(name) or next(
        (p for d in ("/usr/sbin", "/sbin", "/usr/bin", "/bin")
         if os.access(p := f"{d}/{name}", os.X_OK)), None)


def check_requirements() -> tuple[str, str]:
    """Fail with one line naming what is missing; returns the paths of `ip` and `nft`.

    Without root the namespace is built in an unprivileged user namespace (`_userns`):
    that needs user namespaces, /dev/net/tun and nft, and the error names what is missing.
    """
    if os.geteuid() != 0:
        nft_bin = _find_tool("nft")
        missing = _userns.missing_requirements(nft=nft_bin)
        if missing:
            raise _userns.requirement_error(missing)
        assert nft_bin is not None
        return _find_tool("ip") or "ip", nft_bin
    if not os.path.exists("/dev/net/tun"):
        raise DependencyError(
            "/dev/net/tun is missing: load the tun module (modprobe tun), or use --no-network"
        )
    ip = _find_tool("ip")
    if ip is None:
        raise DependencyError("ip not found: install iproute2 (apt-get install iproute2)")
    nft_bin = _find_tool("nft")
    if nft_bin is None:
        raise DependencyError("nft not found: install nftables (apt-get install nftables)")
    return ip, nft_bin


def ns_name_for(vm_id: str) -> str:
    """`vm-1a2b3c4d` -> `ml-1a2b3c4d`."""
    hexpart = vm_id.removeprefix("vm-")
    if not hexpart or not all(c in "0123456789abcdef" for c in hexpart) or len(hexpart) > 12:
        raise ValueError(f"bad VM id {vm_id!r}")
    return NAME_PREFIX + hexpart


# -- helpers that run inside the namespace (on a run_in_netns thread) ---------------------


def _ifreq(name: str, payload: bytes = b"") -> bytearray:
    return bytearray(struct.pack("16s", name.encode()) + payload.ljust(24, b"\0"))


def _sockaddr_in(ip: str) -> bytes:
    return struct.pack("=H2s4s8s", socket.AF_INET, b"\0\0", socket.inet_aton(ip), b"")


def _set_up(ctl: socket.socket, name: str) -> None:
    req = _ifreq(name)
    fcntl.ioctl(ctl, SIOCGIFFLAGS, req)
    flags = struct.unpack_from("H", req, 16)[0] | IFF_UP
    fcntl.ioctl(ctl, SIOCSIFFLAGS, _ifreq(name, struct.pack("H", flags)))


def _write_sysctl(path: str, value: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except FileNotFoundError:
        pass  # a kernel without IPv6 has nothing to disable


def _make_listener(kind: ListenerKind, ip: str, port: int) -> socket.socket:
    if kind == "tcp":
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    elif kind == "udp":
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    else:
        raise ValueError(f"listener kind must be tcp or udp, got {kind!r}")
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((ip, port))
        if kind == "tcp":
            s.listen(128)
        s.setblocking(False)
    except BaseException:
        s.close()
        raise
    return s


def _pid_start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]  # field 22: starttime


class NetNamespace:
    """One VM's namespace. `create()` is blocking; `close()` is idempotent and never raises."""

    def __init__(self, vm_id: str, mtu: int = DEFAULT_MTU) -> None:
        if not 68 <= mtu <= 65535:
            raise ValueError(f"MTU must be between 68 and 65535, got {mtu}")
        self.vm_id = vm_id
        self.name = ns_name_for(vm_id)
        self.path = str(NETNS_DIR / self.name)
        self.mtu = mtu
        self.tap_fd: int | None = None
        self.tcp_listener: socket.socket | None = None
        self.udp_socket: socket.socket | None = None
        self._ip = "ip"
        self._nft = "nft"
        self._created = False
        self._closed = False
        self._userns: _userns.UserNetNamespace | None = None  # the unprivileged path
        self.timings: dict[str, float] = {}

    @property
    def relay_port(self) -> int:
        assert self.tcp_listener is not None
        return self.tcp_listener.getsockname()[1]

    def create(self, dns_port: int = nft.DNS_PORT) -> None:
        """Namespace, TAP, addresses, rules, and the relay/DNS sockets. Cleans up on failure."""
        self._ip, self._nft = check_requirements()
        if os.geteuid() != 0:
            self._create_unprivileged(dns_port)
            return
        t0 = time.monotonic()
        try:
            OWNER_DIR.mkdir(parents=True, exist_ok=True)
            # The owner file goes first so that a namespace is never seen without an owner.
            (OWNER_DIR / self.name).write_text(f"{os.getpid()} {_pid_start_time(os.getpid())}\n")
            r = subprocess.run([self._ip, "netns", "add", self.name],
                               capture_output=True, text=True)
            if r.returncode != 0:
                raise VmStartError(f"cannot create network namespace {self.name}: "
                                   f"{r.stderr.strip()}")
            self._created = True
            self.timings["netns_add"] = time.monotonic() - t0
            run_in_netns(self.path, lambda: self._setup_inside(dns_port))
            self.timings["netns_setup"] = time.monotonic() - t0
        except BaseException:
            self.close()
            raise

    def _create_unprivileged(self, dns_port: int) -> None:
        """The same namespace, owned by a user namespace a helper process made for us."""
        t0 = time.monotonic()
        try:
            u = _userns.spawn(self.mtu, dns_port, self._nft, self.vm_id)
        except BaseException:
            self.close()
            raise
        self._userns = u
        self.tap_fd, self.tcp_listener, self.udp_socket = u.tap_fd, u.tcp_listener, u.udp_socket
        self.path = f"/proc/{u.pid}/ns/net"
        self.timings["netns_add"] = u.timings.get("userns", 0.0)
        self.timings["netns_setup"] = time.monotonic() - t0

    def _setup_inside(self, dns_port: int) -> None:
        # Before the TAP exists, so it never even gets an IPv6 link-local address.
        _write_sysctl("/proc/sys/net/ipv6/conf/default/disable_ipv6", "1")
        _write_sysctl("/proc/sys/net/ipv6/conf/all/disable_ipv6", "1")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as ctl:
            _set_up(ctl, "lo")
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
            self.tap_fd = fd
            # IFF_VNET_HDR off: QEMU then sends and receives plain Ethernet frames.
            fcntl.ioctl(fd, TUNSETIFF, _ifreq(TAP_NAME, struct.pack("H", IFF_TAP | IFF_NO_PI)))
            fcntl.ioctl(ctl, SIOCSIFMTU, _ifreq(TAP_NAME, struct.pack("i", self.mtu)))
            fcntl.ioctl(ctl, SIOCSIFADDR, _ifreq(TAP_NAME, _sockaddr_in(GATEWAY_IP)))
            mask = str(ipaddress.IPv4Network(f"0.0.0.0/{PREFIX_LEN}").netmask)
            fcntl.ioctl(ctl, SIOCSIFNETMASK, _ifreq(TAP_NAME, _sockaddr_in(mask)))
            _set_up(ctl, TAP_NAME)
        self.tcp_listener = _make_listener("tcp", GATEWAY_IP, 0)
        self.udp_socket = _make_listener("udp", GATEWAY_IP, dns_port)
        rules = nft.ruleset(self.relay_port, dns_port)
        # Forked from this thread, nft starts inside the namespace.
        r = subprocess.run([self._nft, "-f", "-"], input=rules, capture_output=True, text=True)
        if r.returncode != 0:
            raise VmStartError(f"cannot apply the VM's nftables rules: {r.stderr.strip()}")

    def ruleset_text(self) -> str:
        """The live ruleset (for tests and debugging)."""
        if self._userns is not None:
            return self._userns.ruleset_text()
        return run_in_netns(self.path, lambda: subprocess.run(
            [self._nft, "list", "ruleset"], capture_output=True, text=True, check=True).stdout)

    def close(self) -> None:
        """Close the fds and delete the namespace (TAP and rules go with it). Idempotent."""
        if self._closed:
            return
        self._closed = True
        t0 = time.monotonic()
        for s in (self.tcp_listener, self.udp_socket):
            if s is not None:
                s.close()
        if self.tap_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.tap_fd)
            self.tap_fd = None
        if self._userns is not None:
            self._userns.close_helper()  # with the fds closed, the namespaces are gone
        elif self._created:
            remove_namespace(self.name, self._ip)
        else:
            with contextlib.suppress(OSError):
                (OWNER_DIR / self.name).unlink()
        self.timings["netns_close"] = time.monotonic() - t0


def remove_namespace(name: str, ip: str | None = None) -> bool:
    """Delete namespace `name` and its owner file; True if it is gone."""
    if not name.startswith(NAME_PREFIX):
        raise ValueError(f"not a matchlock namespace: {name!r}")
    ok = True
    if (NETNS_DIR / name).exists():
        r = subprocess.run([ip or _find_tool("ip") or "ip", "netns", "delete", name],
                           capture_output=True, text=True)
        if r.returncode != 0 and not _unlink_mounted_elsewhere(name):
            log.warning("cannot delete network namespace %s: %s", name, r.stderr.strip())
            ok = False
    with contextlib.suppress(OSError):
        (OWNER_DIR / name).unlink()
    return ok


def _unlink_mounted_elsewhere(name: str) -> bool:
    """The namespace file is still mounted at another path of ours (a chroot that bound
    /run made it): detach those mounts, then unlink. True if the file is gone."""
    path = str(NETNS_DIR / name)
    detached = _mounts.detach_all(path)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.debug("cannot unlink %s after detaching %s: %s", path, detached, e)
        return False
    if detached:
        log.info("namespace %s was also mounted at %s; detached", name, ", ".join(detached))
    return True


def leftover_namespaces() -> list[str]:
    """`ml-*` namespaces whose supervisor is gone (crashed or SIGKILLed): for `gc`."""
    try:
        names = sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(NAME_PREFIX))
    except OSError:
        return []
    dead = []
    for name in names:
        try:
            pid_s, _, start = (OWNER_DIR / name).read_text().strip().partition(" ")
            alive = _pid_start_time(int(pid_s)) == start
        except (OSError, ValueError):
            alive = False
        if not alive:
            dead.append(name)
    return dead
