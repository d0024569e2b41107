"""NetworkStack: everything one VM's network takes, owned by its Sandbox.

    guest eth0 ── TAP (in ns ml-<id>) ── nft DNAT ──► relay listener (in the ns, opened
                                                      by us) ──► handler.handle(...) dials
                                                      upstream from the host namespace
              └── udp/53 (any address) ── DNAT ──► DNS socket ──► resolver

`prepare()` (blocking) builds the namespace, TAP, rules and sockets; `start()` serves
them on the running loop; `close()` stops serving, ends every relayed connection and
deletes the namespace. Events from the handlers land in `<vm dir>/logs/net.jsonl`
(bounded: net/eventlog.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time
from pathlib import Path

from matchlock.net.dns.resolver import GuestResolver
from matchlock.net.eventlog import EventLog
from matchlock.net.netns import NetNamespace
from matchlock.net.policy import Policy
from matchlock.net.proxy import InterceptProxy, TcpRelay
from matchlock.net.types import (
    GATEWAY_IP,
    GUEST_IP,
    PREFIX_LEN,
    ConnectionHandler,
    NetEvent,
    NetworkConfig,
)

log = logging.getLogger(__name__)

SOL_IP = 0
SO_ORIGINAL_DST = 80  # <linux/netfilter_ipv4.h>
# Concurrent guest connections of one VM (one stack per VM); more are closed at once. With
# the proxy's per-VM buffer budget this bounds what a hostile guest makes the host hold:
# ~80-170 KiB per connection (guest and upstream sockets, TLS) plus 64 MiB of held bodies.
MAX_CONNECTIONS = 512


def original_dst(sock: socket.socket) -> tuple[str, int]:
    """Where the guest was connecting to before our DNAT rule redirected it."""
    raw = sock.getsockopt(SOL_IP, SO_ORIGINAL_DST, 16)
    port, addr = struct.unpack_from("!2xH4s", raw)
    return socket.inet_ntoa(addr), port


class NetworkStack:
    def __init__(self, vm_id: str, vm_dir: Path, config: NetworkConfig,
                 handler: ConnectionHandler | None = None, ca=None) -> None:
        if config.mode == "none":
            raise ValueError("NetworkStack is for networked modes only")
        self.vm_id = vm_id
        self.config = config
        self.events_path = Path(vm_dir) / "logs" / "net.jsonl"
        self.ns = NetNamespace(vm_id, config.mtu)
        self._handler = handler
        self.ca = ca  # intercept mode: the VM's CertificateAuthority (made if not given)
        # One policy for the resolver and the proxy: DNS answers feed the IP checks.
        self.policy = Policy(config, self.emit)
        self._server: asyncio.base_events.Server | None = None
        self._dns_task: asyncio.Task | None = None
        self._conns: set[asyncio.Task] = set()
        self._events = EventLog(self.events_path, label=vm_id)
        self._prepared = False
        self._closed = False
        self.timings: dict[str, float] = {}

    # -- setup ---------------------------------------------------------------------------

    def prepare(self) -> None:
        """Namespace, TAP, rules, listening sockets (blocking). Safe to call once."""
        if self._prepared:
            return
        self._prepared = True
        t0 = time.monotonic()
        self.ns.create()
        self.timings["net_setup"] = time.monotonic() - t0

    @property
    def tap_fd(self) -> int:
        if self.ns.tap_fd is None:
            raise RuntimeError("the network namespace is not set up")
        return self.ns.tap_fd

    def guest_cmdline(self) -> list[str]:
        args = [
            f"matchlock.ip={GUEST_IP}/{PREFIX_LEN}", f"matchlock.gw={GATEWAY_IP}",
            f"matchlock.dns={GATEWAY_IP}", f"matchlock.mtu={self.config.mtu}",
        ]
        args += [f"matchlock.add_host={h}:{ip}" for h, ip in self.config.add_hosts]
        return args

    async def start(self) -> None:
        if self._closed:
            raise RuntimeError("the network stack is closed")
        if not self._prepared:
            await asyncio.to_thread(self.prepare)
        assert self.ns.tcp_listener is not None and self.ns.udp_socket is not None
        if self._handler is None:
            self._handler = self._default_handler()
        self._server = await asyncio.start_server(
            self._on_connection, sock=self.ns.tcp_listener, limit=1 << 16)
        resolver = GuestResolver(self.policy, self.config.dns_servers, self.emit)
        self._dns_task = asyncio.ensure_future(resolver.serve(self.ns.udp_socket))
        log.debug("network of %s: relay %s:%d, mode %s", self.vm_id, GATEWAY_IP,
                  self.ns.relay_port, self.config.mode)

    # -- serving -------------------------------------------------------------------------

    async def _on_connection(self, reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        try:
            if len(self._conns) >= MAX_CONNECTIONS:
                self.emit(NetEvent("blocked", detail=(
                    f"connection closed: this VM already has {MAX_CONNECTIONS} open "
                    "connections (the per-VM limit)"), fields={"limit": MAX_CONNECTIONS}))
                return
            if task is not None:
                self._conns.add(task)
            try:
                dst_ip, dst_port = original_dst(writer.get_extra_info("socket"))
            except OSError as e:
                self.emit(NetEvent("error", detail=f"no original destination: {e}"))
                return
            assert self._handler is not None
            await self._handler.handle(reader, writer, dst_ip, dst_port)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - one connection must never take the VM down
            log.exception("network handler failed")
            self.emit(NetEvent("error", detail=f"handler failed: {type(e).__name__}: {e}"))
        finally:
            if task is not None:
                self._conns.discard(task)
            writer.close()

    def emit(self, event: NetEvent) -> None:
        """Into logs/net.jsonl (rate-limited, rotated by size: see net/eventlog.py)."""
        self._events.emit(event)

    # -- teardown ------------------------------------------------------------------------

    async def close(self) -> None:
        """Stop serving, end every relayed connection, delete the namespace. Idempotent."""
        if self._closed:
            return
        self._closed = True
        t0 = time.monotonic()
        if self._server is not None:
            self._server.close()
        tasks = [t for t in (*self._conns, self._dns_task) if t is not None]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2)
        closer = getattr(self._handler, "aclose", None)
        if closer is not None:
            with contextlib.suppress(Exception):
                await closer()
        await asyncio.to_thread(self.ns.close)
        self.policy.close()
        self._events.close()
        self.timings["net_teardown"] = time.monotonic() - t0

    def _default_handler(self) -> ConnectionHandler:
        if self.config.mode == "open":
            return TcpRelay(self.policy, self.emit)
        if self.ca is None:
            from matchlock.net.ca import CertificateAuthority  # intercept mode only

            self.ca = CertificateAuthority.generate()
        rules = None
        if self.config.hook_rules:
            from matchlock.net.proxy._rules import RuleSet

            rules = RuleSet(self.config.hook_rules, self.config.callback_socket)
        return InterceptProxy(self.policy, self.ca, self.emit, rules=rules)

