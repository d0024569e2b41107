"""Command-line parsing that does not go through click's own rules: exec's fast path and
flags after the id, and `run --rm=<bool>`."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from matchlock.cli._exec import ExecArgs, parse_after_id, parse_fast
from matchlock.cli._run import parse_addresses, parse_publish, run
from matchlock.errors import UsageError


def _fast(*args: str) -> tuple[str, dict] | None:
    r = parse_fast(list(args))
    if r is None:
        return None
    vm, ea = r
    return vm, {"i": ea.interactive, "t": ea.tty, "w": ea.workdir, "u": ea.user,
                "e": ea.env, "argv": ea.argv}


def test_fast_path_parses_like_click():
    assert _fast("vm-1", "--", "ls", "-la") == ("vm-1", {"i": False, "t": False, "w": None,
                                                        "u": None, "e": [], "argv": ["ls",
                                                                                     "-la"]})
    _, a = _fast("-it", "-w", "/tmp", "--user=app", "-e", "A=1", "vm-1", "sh")
    assert (a["i"], a["t"], a["w"], a["u"], a["e"], a["argv"]) == \
        (True, True, "/tmp", "app", ["A=1"], ["sh"])
    _, a = _fast("vm-1", "-i", "-e", "B=2", "--", "cat", "-e")  # flags after the id
    assert (a["i"], a["e"], a["argv"]) == (True, ["B=2"], ["cat", "-e"])
    _, a = _fast("vm-1", "ls", "-i")  # after the command starts, -i is the command's
    assert (a["i"], a["argv"]) == (False, ["ls", "-i"])
    _, a = _fast("-t", "vm-1")  # -it without a command: a shell
    assert (a["i"], a["t"], a["argv"]) == (True, True, ["sh"])


@pytest.mark.parametrize("args", [("--help",), ("vm-1", "-h"), ("--bogus", "vm-1", "true"),
                                  (), ("-i",)])
def test_fast_path_leaves_the_rest_to_click(args):
    assert parse_fast(list(args)) is None


def test_no_command_is_a_usage_error():
    with pytest.raises(UsageError, match="no command given"):
        parse_after_id(ExecArgs(), ["--"])


def test_rm_takes_a_boolean_value_only_attached():
    seen = {}

    @click.command(cls=type(run), context_settings={"allow_interspersed_args": False})
    @click.option("--rm/--no-rm", default=True)
    @click.option("--image")
    @click.argument("command", nargs=-1)
    def cmd(rm, image, command):  # noqa: ANN001, ANN202
        seen.update(rm=rm, image=image, command=command)

    r = CliRunner()
    assert r.invoke(cmd, ["--rm=false", "--image", "x", "echo", "--rm=true"]).exit_code == 0
    assert seen == {"rm": False, "image": "x", "command": ("echo", "--rm=true")}
    r.invoke(cmd, ["--image", "--rm=false", "--rm"])  # a value is not a flag
    assert seen["image"] == "--rm=false" and seen["rm"] is True
    r.invoke(cmd, ["--rm", "echo"])
    assert seen["rm"] is True and seen["command"] == ("echo",)
    res = r.invoke(cmd, ["--rm=maybe", "--image", "x"])
    assert res.exit_code != 0 and "--rm" in res.output


def test_publish_and_address():
    specs = parse_publish(("8080", "9000:80", " 9000:80 "))
    assert [(p.local, p.remote) for p in specs] == [(8080, 8080), (9000, 80)]
    for bad in ("0", "70000", "a:80", "80:", "1:2:3"):
        with pytest.raises(UsageError, match="invalid --publish"):
            parse_publish((bad,))
    assert parse_addresses(()) == ("127.0.0.1",)
    assert parse_addresses(("localhost, 0.0.0.0", "127.0.0.1", "::1")) == (
        "127.0.0.1", "0.0.0.0", "::1")
    with pytest.raises(UsageError, match="invalid --address"):
        parse_addresses(("example.com",))
