"""The fake `matchlock rpc` as a real subprocess, found through MATCHLOCK_BIN."""

from __future__ import annotations

import json
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

FAKE = Path(__file__).with_name("fake_rpc.py")


@dataclass
class FakeServer:
    bin: Path
    log_path: Path

    def sent(self) -> list[dict]:
        """Every line the SDK sent, parsed, in order."""
        if not self.log_path.exists():
            return []
        return [json.loads(line) for line in self.log_path.read_text().splitlines()
                if line.strip()]

    def sent_methods(self) -> list[str]:
        return [m.get("method") for m in self.sent()]

    def first(self, method: str) -> dict:
        for m in self.sent():
            if m.get("method") == method:
                return m
        raise AssertionError(f"the SDK never sent {method!r}: {self.sent_methods()}")


def make_fake(tmp_path: Path) -> FakeServer:
    bin_path = tmp_path / "fake-matchlock"
    bin_path.write_text(f"#!{sys.executable}\nimport runpy, sys\n"
                        f"runpy.run_path({str(FAKE)!r}, run_name='__main__')\n")
    bin_path.chmod(bin_path.stat().st_mode | stat.S_IXUSR)
    return FakeServer(bin=bin_path, log_path=tmp_path / "rpc.log")


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeServer:
    srv = make_fake(tmp_path)
    monkeypatch.setenv("MATCHLOCK_BIN", str(srv.bin))
    monkeypatch.setenv("FAKE_RPC_LOG", str(srv.log_path))
    return srv


@pytest.fixture(autouse=True)
def _no_leaked_children():
    """Every test must leave no server process behind."""
    before = _children()
    yield
    leaked = _children() - before
    assert not leaked, f"server processes left running: {sorted(leaked)}"


def _children() -> set[int]:
    me = os.getpid()
    out = set()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me and fields[0] != "Z":
            out.add(int(d.name))
    return out
