"""The CLI's self-description: `--help` lists every command with its whole summary, and
`version` / `--version` name the commit, also in a non-editable build."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import click
import pytest

from matchlock import __version__, _version
from matchlock.cli._help import summary
from matchlock.cli._main import cli

ROOT = Path(__file__).resolve().parents[2]


def ml(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "matchlock", *args], capture_output=True,
                          text=True, timeout=60, **kw)


def head_sha() -> str:
    return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True, check=True).stdout.strip()


def _commands(group: click.Group) -> dict[str, click.Command]:
    """Through click's API, as help sees them (the top level loads its modules lazily)."""
    ctx = click.Context(group)
    return {n: c for n in group.list_commands(ctx) if (c := group.get_command(ctx, n))}


def _groups(group: click.Group, path: tuple[str, ...] = ()):
    yield path, group
    for name, cmd in _commands(group).items():
        if isinstance(cmd, click.Group):
            yield from _groups(cmd, (*path, name))


@pytest.mark.parametrize("path", [p for p, _ in _groups(cli)], ids=lambda p: " ".join(p) or "-")
def test_help_lists_every_command_with_its_whole_summary(path):
    group = cli
    for name in path:
        group = _commands(group)[name]
    p = ml(*path, "--help")
    assert p.returncode == 0 and p.stderr == ""
    # The Commands section, with wrapped summaries joined back into one line each.
    section = p.stdout.split("\nCommands:\n", 1)[1]
    listed: dict[str, str] = {}
    last = None
    for line in section.splitlines():
        m = re.match(r"^  (\S+)\s+(.*)$", line)
        if m and not line.startswith("   "):
            last = m.group(1)
            listed[last] = m.group(2).strip()
        elif last and line.strip():
            listed[last] += " " + line.strip()
    commands = _commands(group)
    visible = {n for n, c in commands.items() if not c.hidden}
    assert set(listed) == visible
    for name in visible:
        text = summary(commands[name])
        assert text and not text.endswith("..."), f"{name}: summary {text!r}"
        assert listed[name] == text, name


def test_top_level_help_names_the_commands_users_look_for():
    out = ml("--help").stdout
    for name in ("run", "image", "version"):
        assert re.search(rf"^  {name}\s", out, re.M), name


@pytest.mark.parametrize("args", [("version",), ("--version",)])
def test_version_names_the_commit(args):
    p = ml(*args)
    assert p.returncode == 0, p.stderr
    assert p.stdout == f"matchlock {__version__} (commit: {head_sha()})\n"


def test_commit_is_unknown_outside_a_checkout_without_build_info(monkeypatch, tmp_path):
    monkeypatch.setattr(_version, "_CHECKOUT", tmp_path)
    monkeypatch.setitem(sys.modules, "matchlock._build_info", None)  # import fails
    _version.commit.cache_clear()
    try:
        assert _version.commit() == "unknown"
        assert _version.version_line() == f"matchlock {__version__} (commit: unknown)"
    finally:
        _version.commit.cache_clear()


@pytest.mark.timeout(600)
def test_non_editable_build_records_the_commit(tmp_path):
    # What `pip install .` installs is this wheel: it must carry the commit itself, since
    # the installed package is no longer inside a checkout.
    wheels = tmp_path / "wheels"
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(ROOT)],
        capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    [whl] = wheels.glob("matchlock-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(whl) as z:
        assert "matchlock/_build_info.py" in z.namelist()
        assert "matchlock/_guest/matchlock-guest" in z.namelist()
        z.extractall(site)
    p = subprocess.run(
        [sys.executable, "-c", "from matchlock._version import version_line, _CHECKOUT;"
         "print(_CHECKOUT); print(version_line())"],
        capture_output=True, text=True, cwd=tmp_path, env={"PYTHONPATH": str(site)},
        timeout=60,
    )
    assert p.returncode == 0, p.stderr
    checkout, line = p.stdout.splitlines()
    assert Path(checkout) == tmp_path  # not inside the checkout: no git to ask
    assert line == f"matchlock {__version__} (commit: {head_sha()})"


def test_run_loads_no_other_command_module():
    # Subcommands load lazily: a `run` must not pay for build, pull, image, kernel,
    # volume or diagnose (nor rich, which they use for progress and tables).
    code = ("import sys, click; from matchlock.cli._main import cli; "
            "assert cli.get_command(click.Context(cli), 'run') is not None; "
            "print(sorted(m for m in sys.modules "
            "if m == 'rich' or m.startswith('matchlock.cli.')))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == str(["matchlock.cli._guard", "matchlock.cli._help",
                                    "matchlock.cli._main", "matchlock.cli._run",
                                    "matchlock.cli._run_core"]), p.stdout


def test_a_plain_run_spawns_qemu_before_click_is_imported():
    # cli/_fast.py: click's import (~25 ms) would delay QEMU's start by as much. The same
    # line with --help is the positive control: it needs click.
    code = """
import sys
import matchlock.cli._run_core as core
def prelaunch(config, argv, entrypoint, rm):
    print("click" in sys.modules, config.image, argv, rm, flush=True)
    raise SystemExit(0)
core.prelaunch = prelaunch
from matchlock.cli import main
main(sys.argv[1:])
"""
    env = {k: v for k, v in os.environ.items() if k != "MATCHLOCK_DEBUG"}
    p = subprocess.run([sys.executable, "-c", code, "run", "--image", "img", "--rm=false",
                        "--no-network", "echo", "hi"],
                       capture_output=True, text=True, timeout=60, env=env)
    assert (p.returncode, p.stdout) == (0, "False img ['echo', 'hi'] False\n"), p.stderr
    p = subprocess.run([sys.executable, "-c", code, "run", "--help"], capture_output=True,
                       text=True, timeout=60, env=env)
    assert p.returncode == 0 and "--image" in p.stdout, p.stderr


def test_the_spawn_path_imports_nothing_it_does_not_use():
    # Every module `run` loads before QEMU's spawn delays it. These are not needed there
    # (measured, each 1.5-25 ms): click (cli/_fast.py), logging (matchlock._log), platform
    # and uuid (os.uname, os.urandom), concurrent.futures (vm/_spawn.py), asyncio. The
    # second half is the positive control: the modules that do need them load them.
    code = """
import sys
import matchlock.cli._fast, matchlock.cli._run_args, matchlock.cli._run_core
import matchlock.sandbox._launch
unwanted = ("click", "logging", "platform", "uuid", "concurrent.futures", "asyncio")
print(sorted(m for m in unwanted if m in sys.modules))
import matchlock.cli._run, matchlock.cli._session, matchlock.diagnose
print(sorted(m for m in unwanted if m in sys.modules))
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    before, after = p.stdout.splitlines()
    unwanted = ["asyncio", "click", "concurrent.futures", "logging", "platform", "uuid"]
    assert before == "[]", before
    assert after == str(unwanted), after


def test_a_plain_run_loads_no_network_policy_nor_vfs_server():
    # `run --no-network` without mounts boots without the policy, the dial check, the FUSE
    # server or its providers (~45 ms of imports before QEMU starts); they load with the
    # flags that use them (the second half of the script is the positive control).
    heavy = ("matchlock.net.policy", "matchlock.net.dialcheck", "matchlock.vfs._fs",
             "matchlock.vfs.server", "matchlock.vfs._hooks", "matchlock.vfs._hostfs",
             "matchlock.vfs._snapshot")
    code = f"""
import os, sys, tempfile
from pathlib import Path
import matchlock.cli._run, matchlock.cli._session, matchlock.sandbox._sandbox
from matchlock.net.config import parse_network_flags
from matchlock.sandbox import Sandbox, SandboxConfig
from matchlock.vfs import mount_config
from matchlock.vfs._attach import SandboxMounts
flags = dict(add_hosts=(), secrets=(), dns_servers=(), network_intercept=False, mtu=1500,
             host_env={{}})
heavy = {heavy!r}
net = parse_network_flags(no_network=True, allow_hosts=(), **flags)
mounts = mount_config((), None, ())
sb = Sandbox(SandboxConfig(image="matchlock/busybox", no_network=True, network=net,
                           mounts=mounts))
with tempfile.TemporaryDirectory() as d:
    m = SandboxMounts(mounts, Path(d), None)
    m.prepare(); m.start(); m.close()
print(sorted(h for h in heavy if h in sys.modules))
parse_network_flags(no_network=False, allow_hosts=("example.com",), **flags)
with tempfile.TemporaryDirectory() as d:
    m = SandboxMounts(mount_config((d + ":/workspace/x",), None, ()), Path(d), None)
    m.prepare(); m.start(); m.close()
print(sorted(h for h in heavy if h in sys.modules))
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    before, after = p.stdout.splitlines()
    assert before == "[]", before
    assert after == str(sorted(heavy)), after
