"""`run`'s click-free parser (cli/_run_args.py) against the click command it stands in
for: the same parameters for every line it takes, and None for the lines it leaves."""

from __future__ import annotations

import click
import pytest

from matchlock.cli._run import run
from matchlock.cli._run_args import ENVVARS, OPTIONS, parse_run


def _click(args: list[str]) -> dict:
    ctx = run.make_context("run", list(args))
    return dict(ctx.params)


def test_the_table_is_the_click_commands():
    opts = {p.name: p for p in run.params if isinstance(p, click.Option)}
    assert set(opts) == set(OPTIONS)
    for dest, (names, kind, _conv, _default) in OPTIONS.items():  # defaults: below
        p = opts[dest]
        assert set(names) == {*p.opts, *p.secondary_opts}, dest
        assert kind == ("flag" if p.is_flag else "many" if p.multiple else "one"), dest
        assert ENVVARS.get(dest) == p.envvar, dest
    assert [p.name for p in run.params if isinstance(p, click.Argument)] == ["command"]


LINES = [
    ["--image", "alpine", "true"],
    ["--image=alpine", "--no-network", "--", "ls", "-la"],
    ["--image", "a", "-i", "-t", "-d", "--pull", "sh"],
    ["--image", "a", "-e", "A=1", "--env", "B", "-e", "C=", "--env-file", "f", "env"],
    ["--image", "a", "-w", "/w", "-u", "1:2", "--entrypoint", "", "x"],
    ["--image", "a", "--cpus", "2", "--memory=256", "--disk-size", "100", "true"],
    ["--image", "a", "--rm=false", "true"], ["--image", "a", "--rm=YES", "true"],
    ["--image", "a", "--no-rm", "--rm", "true"], ["--image", "a", "--no-rm"],
    ["--image", "a", "--timeout", "1.5", "-p", "80", "-p", "8080:80", "--address",
     "127.0.0.1,::1", "--hostname", "h", "true"],
    ["--image", "a", "--allow-host", "x.com", "--add-host", "h:1.2.3.4",
     "--allow-private", "10.0.0.1", "--secret", "K@x.com", "--dns-servers", "1.1.1.1",
     "--network-intercept", "--mtu", "1400", "true"],
    ["--image", "a", "-v", "/h:/g", "--volume=/a:/b:ro", "--workspace", "/ws", "--disk",
     "d.img:/d", "--kernel", "debian", "--accel", "tcg", "true"],
    ["--image", "a", "--image", "b", "true"],  # the last one wins
    ["--image", "a", "-"], ["--image", "a", "sh", "-c", "--help"],
    ["--image", "a", "ls", "--image", "b"],  # the command's own flags
    ["--image", "a", "--cpus", "inf", "true"],
]


@pytest.mark.parametrize("args", LINES)
def test_parses_like_click(args, monkeypatch):
    monkeypatch.delenv("MATCHLOCK_KERNEL", raising=False)
    monkeypatch.delenv("MATCHLOCK_DEBUG", raising=False)
    assert parse_run(args) == _click(args)


def test_kernel_comes_from_the_environment_unless_given(monkeypatch):
    monkeypatch.delenv("MATCHLOCK_DEBUG", raising=False)
    monkeypatch.setenv("MATCHLOCK_KERNEL", "debian")
    for args in (["--image", "a", "true"], ["--image", "a", "--kernel", "k", "true"]):
        assert parse_run(args) == _click(args)
    assert parse_run(["--image", "a", "true"])["kernel"] == "debian"


@pytest.mark.parametrize("args", [
    [], ["true"], ["--help"], ["--image", "a", "-h"], ["-it", "--image", "a", "sh"],
    ["--image", "a", "-eA=1", "env"], ["--image", "a", "--bogus", "true"],
    ["--image"], ["--image", "a", "--cpus"], ["--image", "a", "--cpus", "two", "true"],
    ["--image", "a", "--memory", "1.5", "true"], ["--image", "a", "--timeout", "0", "true"],
    ["--image", "a", "--rm=maybe", "true"], ["--image", "a", "--no-network=1", "true"],
    ["--image", "a", "-e", "-x", "true"], ["--image", "a", "--cpus", "-1", "true"],
])
def test_leaves_the_rest_to_click(args, monkeypatch):
    monkeypatch.delenv("MATCHLOCK_DEBUG", raising=False)
    assert parse_run(args) is None


def test_debug_goes_through_click(monkeypatch):
    monkeypatch.setenv("MATCHLOCK_DEBUG", "1")
    assert parse_run(["--image", "a", "true"]) is None
