"""ExecRequest -> the guest's OPEN request: Docker's precedence rules, no I/O."""

from __future__ import annotations

import pytest

from matchlock.errors import ConfigError, UsageError
from matchlock.sandbox import ExecRequest, ImageDefaults, VmDefaults, compose_request

IMAGE = ImageDefaults(env=("PATH=/img/bin", "A=image", "B=image"), entrypoint=("/ep",),
                      cmd=("default",), working_dir="/srv", user="app")


def _env(wire: dict) -> dict:
    return dict(e.split("=", 1) for e in wire["env"])


def test_env_precedence():
    vm = VmDefaults(image=IMAGE, env=(("B", "vm"), ("C", "vm"), ("SECRET", "mine")),
                    extra_env={"SECRET": "SANDBOX_SECRET_x", "SSL_CERT_FILE": "/ca"})
    wire = compose_request(vm, ExecRequest(argv=("env",), env=(("C", "req"),
                                                               ("SSL_CERT_FILE", "/evil"))))
    assert _env(wire) == {"PATH": "/img/bin", "A": "image", "B": "vm", "C": "req",
                          "SECRET": "SANDBOX_SECRET_x", "SSL_CERT_FILE": "/ca"}


def test_base_path_without_image_env():
    wire = compose_request(VmDefaults(), ExecRequest(argv=("true",)))
    assert _env(wire)["PATH"].startswith("/usr/local/sbin:")
    assert (wire["cwd"], wire["user"], wire["tty"], wire["stdin"]) == ("/", "", False, False)


def test_user_and_cwd_defaults_chain():
    vm = VmDefaults(image=IMAGE)
    assert compose_request(vm, ExecRequest(argv=("id",)))["user"] == "app"
    vm = VmDefaults(image=IMAGE, user="1000:1000")  # run -u: kept for later execs
    w = compose_request(vm, ExecRequest(argv=("id",)))
    assert (w["user"], w["cwd"]) == ("1000:1000", "/srv")
    w = compose_request(vm, ExecRequest(argv=("id",), user="", cwd="/tmp"))
    assert (w["user"], w["cwd"]) == ("", "/tmp")  # "" is root


def test_only_the_image_workdir_is_made_when_missing():
    vm = VmDefaults(image=IMAGE)
    assert compose_request(vm, ExecRequest(argv=("pwd",)))["mkcwd"] is True
    assert "mkcwd" not in compose_request(vm, ExecRequest(argv=("pwd",), cwd="/srv"))
    assert "mkcwd" not in compose_request(VmDefaults(cwd="/workspace"),
                                          ExecRequest(argv=("pwd",)))


def test_argv_shell_and_image_command():
    vm = VmDefaults(image=IMAGE)
    assert compose_request(vm, ExecRequest(shell="echo $X"))["argv"] == ["sh", "-c", "echo $X"]
    assert compose_request(vm, ExecRequest(argv=("a",)))["argv"] == ["a"]
    assert compose_request(vm, ExecRequest(image_command=True))["argv"] == ["/ep", "default"]
    assert compose_request(vm, ExecRequest(argv=("x",), image_command=True))["argv"] == \
        ["/ep", "x"]
    with pytest.raises(UsageError, match="no command"):
        compose_request(VmDefaults(), ExecRequest(image_command=True))
    with pytest.raises(UsageError):
        compose_request(vm, ExecRequest())
    with pytest.raises(UsageError):
        ExecRequest(argv=("a",), shell="b")


def test_entrypoint_override_drops_cmd():
    vm = VmDefaults(image=IMAGE)
    assert compose_request(vm, ExecRequest(image_command=True, entrypoint="/bin/sh",
                                           argv=("-c", "x")))["argv"] == ["/bin/sh", "-c", "x"]
    with pytest.raises(UsageError):  # --entrypoint "" and no args: nothing left to run
        compose_request(vm, ExecRequest(image_command=True, entrypoint=""))


def test_tty_gets_term_and_size():
    w = compose_request(VmDefaults(), ExecRequest(argv=("sh",), tty=True, rows=30, cols=100,
                                                  term="screen"))
    assert (w["rows"], w["cols"], _env(w)["TERM"]) == (30, 100, "screen")
    vm = VmDefaults(env=(("TERM", "dumb"),))
    assert _env(compose_request(vm, ExecRequest(argv=("sh",), tty=True)))["TERM"] == "dumb"
    assert "TERM" not in _env(compose_request(VmDefaults(), ExecRequest(argv=("sh",))))
    with pytest.raises(ConfigError):
        ExecRequest(argv=("sh",), rows=0)
