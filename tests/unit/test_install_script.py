"""scripts/install.sh installs every external tool the code and the test suite call.

A fresh Debian 12 machine once failed the README's test command because `cpio` was not
installed. This test finds the commands src/, tests/ and bench/ run (shutil.which / find
tool helpers, and literal argv[0] of subprocess calls) and requires each to be in the
script's TOOLS list, which the script checks after installing."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "install.sh"

# Always there on Debian (Essential/required packages), or optional and documented as such.
BASE = {"sh", "bash", "sleep", "chown", "true", "env", "cat", "ls", "id", "kill", "sha256sum"}
OPTIONAL = {"mitmdump"}  # bench/proxy.py: an optional comparison, skipped when absent

CALL = re.compile(
    r"""(?:shutil\.which|_?find_tool|_need|\bwhich)\(\s*["']([A-Za-z0-9_.+-]+)["']"""
    r"""|(?:subprocess\.(?:run|Popen|check_output|check_call)|\bsh)\(\s*\[?\s*["']"""
    r"""([A-Za-z0-9_.+-]+)["']"""
)


def called_tools() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for base in ("src", "tests", "bench"):
        for path in (ROOT / base).rglob("*.py"):
            if path.name in ("test_install_script.py", "test_diagnose.py"):
                continue
            for m in CALL.finditer(path.read_text()):
                tool = m.group(1) or m.group(2)
                found.setdefault(tool, set()).add(str(path.relative_to(ROOT)))
    return found


def script_tools() -> set[str]:
    text = SCRIPT.read_text()
    block = re.search(r"^TOOLS=\((.*?)^\)", text, re.S | re.M)
    assert block, "install.sh has no TOOLS=( ... ) list"
    tools = {t.split(":")[0].strip('"') for t in block.group(1).split()}
    qemu = set(re.findall(r"QEMU_BIN=(\S+)", text))
    return (tools - {"$QEMU_BIN"}) | qemu


def test_finder_sees_the_known_callers():
    tools = called_tools()
    # Sanity: the scan finds calls of both shapes, e.g. the one that once broke.
    assert {"cpio", "zstd", "mke2fs", "ip", "tmux", "git"} <= set(tools)


def test_install_script_covers_every_tool_called():
    have = script_tools() | BASE | OPTIONAL
    missing = {t: sorted(w) for t, w in called_tools().items() if t not in have}
    assert not missing, f"add these to scripts/install.sh (PKGS and TOOLS): {missing}"


def test_every_tool_has_its_package_installed():
    text = SCRIPT.read_text()
    pkgs_block = re.search(r"^PKGS=\((.*?)^\)", text, re.S | re.M).group(1)
    pkgs = {w for line in pkgs_block.splitlines() for w in line.split("#")[0].split()}
    block = re.search(r"^TOOLS=\((.*?)^\)", text, re.S | re.M).group(1)
    # Essential/required on Debian: present on every machine, never in PKGS.
    essential = {"dpkg", "apt", "util-linux"}
    for entry in block.split():
        tool, _, pkg = entry.strip('"').partition(":")
        assert pkg, f"TOOLS entry {entry} names no package"
        assert pkg in pkgs | essential or pkg == "$QEMU_PKG", f"{tool}: {pkg} not in PKGS"
