"""A dispatcher Target backed by the real C guest agent running as a host process on a
socketpair (no VM): the real channel, the real Process, the real dispatcher."""

from __future__ import annotations

import asyncio
import socket
import subprocess
from pathlib import Path
from typing import Any

from matchlock.channel.client import GuestChannel
from matchlock.errors import NotAvailable
from matchlock.sandbox import ExecRequest, Process, VmDefaults, compose_request

ROOT = Path(__file__).resolve().parents[3]


def agent_binary(tmp: Path) -> Path:
    from matchlock.guest_build import build_guest

    return build_guest(ROOT / "guest", tmp / "matchlock-guest")


class AgentTarget:
    vm_id = "vm-agent00"

    def __init__(self, binary: Path, log: Path) -> None:
        self._binary = binary
        self._log = log
        self.closed: list[float] = []
        self.defaults = VmDefaults(env=(("PATH", "/usr/local/bin:/usr/bin:/bin"),
                                        ("LC_ALL", "C")))

    async def start(self) -> None:
        ours, theirs = socket.socketpair()
        self.proc = subprocess.Popen([str(self._binary), "agent", "--fd", str(theirs.fileno())],
                                     pass_fds=[theirs.fileno()])
        theirs.close()
        self.chan = GuestChannel(ours)
        self.chan.start()
        await asyncio.wait_for(self.chan.wait_ready(), 15)

    async def stop(self) -> None:
        await self.chan.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    async def create(self, params: dict[str, Any]) -> str:
        raise NotAvailable("no create here")

    async def exec(self, request: ExecRequest) -> Process:
        return Process(await self.chan.exec(compose_request(self.defaults, request)),
                       self.vm_id)

    async def allow_list_add(self, hosts):  # noqa: ANN001, ANN201
        return {"added": list(hosts), "allowed_hosts": list(hosts), "allow_all": False}

    async def allow_list_delete(self, hosts):  # noqa: ANN001, ANN201
        return {"removed": list(hosts), "allowed_hosts": [], "allow_all": False}

    async def port_forward(self, forwards, addresses):  # noqa: ANN001, ANN201
        raise NotAvailable("port forwarding is not available yet in this build")

    async def write_file(self, path: str, data: bytes, mode: int) -> None:
        raise NotAvailable("no files here")

    async def read_file(self, path: str) -> bytes:
        raise NotAvailable("no files here")

    async def list_files(self, path: str) -> list:
        raise NotAvailable("no files here")

    def log_paths(self):  # noqa: ANN201
        return [self._log]

    async def events(self):  # noqa: ANN201
        for i in range(3):
            yield {"type": "network", "n": i}

    async def close(self, timeout: float) -> None:
        self.closed.append(timeout)

    def info(self) -> dict:
        return {"id": self.vm_id, "status": "running"}
