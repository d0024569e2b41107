"""`Config`: which `matchlock` the SDK starts, and where an existing VM's control
socket lives."""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from matchlock.sdk._errors import MatchlockError

_VM_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass
class Config:
    """How to start the server.

    `binary_path`: the `matchlock` executable; empty means this package's own CLI
    (`python -m matchlock` with the running interpreter). `Client()` without a config
    reads it from `$MATCHLOCK_BIN`; an explicit `Config` does not (as in the reference).
    `use_sudo`: run it as `sudo <binary> rpc`."""

    binary_path: str = ""
    use_sudo: bool = False

    @classmethod
    def from_env(cls) -> Config:
        return cls(binary_path=os.environ.get("MATCHLOCK_BIN", ""))

    def cli_argv(self) -> list[str]:
        """argv prefix for plain sub-commands (`rm`, `volume ...`): never sudo."""
        if self.binary_path:
            return [self.binary_path]
        # -P: `-m` would put the caller's cwd first on sys.path, so a `secrets.py` there
        # (examples/python has one) would shadow the stdlib inside the VM's host process.
        return [sys.executable, "-P", "-m", "matchlock"]

    def rpc_argv(self) -> list[str]:
        argv = [*self.cli_argv(), "rpc"]
        return ["sudo", *argv] if self.use_sudo else argv


def describe_binary(config: Config) -> str:
    return config.binary_path or f"{sys.executable} -P -m matchlock"


def control_socket(vm_id: str) -> Path:
    """`<MATCHLOCK_HOME or ~/.matchlock>/vms/<id>/control.sock`."""
    if not _VM_ID.match(vm_id):
        raise MatchlockError(f"invalid VM id {vm_id!r} (expected e.g. vm-3f2a9c1d)")
    from matchlock.paths import vms_dir

    return vms_dir() / vm_id / "control.sock"
