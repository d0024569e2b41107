"""Shared fixtures. E2E tests boot real QEMU VMs; they fail (never skip) without QEMU."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# A suite started in the background by a non-interactive shell (`cmd &`, nohup, some CI
# runners) inherits SIGINT ignored, and so would every CLI it starts: Ctrl-C tests would
# then see a `matchlock` that cannot be interrupted. Children get the default again.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# The suite's images (imported test bases, build results) live in a store of their own under
# the cache dir: kept between runs, never in the user's `image ls`. Set before any fixture
# copies the environment, so both the CLI and in-process ImageStore() use it.
if "MATCHLOCK_IMAGES_DIR" not in os.environ:
    from matchlock.paths import cache_dir as _cache_dir

    os.environ["MATCHLOCK_IMAGES_DIR"] = str(_cache_dir() / "test-images" / "store")


def matchlock_cmd() -> list[str]:
    return [sys.executable, "-m", "matchlock"]


@pytest.fixture(scope="session")
def state_home(tmp_path_factory) -> Path:
    """A private MATCHLOCK_HOME for the whole run; the cache (kernel, images) is shared."""
    return tmp_path_factory.mktemp("mlhome")


@pytest.fixture(scope="session")
def ml_env(state_home) -> dict[str, str]:
    env = dict(os.environ)
    env["MATCHLOCK_HOME"] = str(state_home)
    # Guest DNS lookups a test did not route to its own server must never leave the
    # machine: the default upstream resolver becomes loopback.
    resolv = state_home / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\n")
    env["MATCHLOCK_RESOLV_CONF"] = str(resolv)
    env.pop("MATCHLOCK_DEBUG", None)
    return env


@pytest.fixture(scope="session")
def ml(ml_env):
    """Run the matchlock CLI; returns CompletedProcess (bytes)."""

    def run(*args: str, input: bytes | None = None, timeout: float = 240, env=None,
            check: bool = False) -> subprocess.CompletedProcess:
        p = subprocess.run(
            [*matchlock_cmd(), *args], input=input, capture_output=True, timeout=timeout,
            env={**ml_env, **(env or {})},
        )
        if check and p.returncode != 0:
            raise AssertionError(
                f"matchlock {' '.join(args)} exited {p.returncode}: {p.stderr.decode()[-2000:]}"
            )
        return p

    return run


@pytest.fixture(scope="session")
def qemu_present() -> None:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.fail("qemu-system-x86_64 is not installed: run ./scripts/install.sh", False)
