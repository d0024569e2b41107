import pytest

from matchlock.errors import UsageError
from matchlock.sandbox import ImageDefaults, compose_argv, compose_env
from matchlock.sandbox._command import DEFAULT_PATH

IMG = ImageDefaults(env=("PATH=/img/bin", "A=1", "B=image"), entrypoint=("/ep",),
                    cmd=("default",))


def test_argv_rules():
    assert compose_argv(IMG, [], None) == ["/ep", "default"]
    assert compose_argv(IMG, ["x", "y"], None) == ["/ep", "x", "y"]
    assert compose_argv(IMG, ["x"], "/other") == ["/other", "x"]
    assert compose_argv(IMG, [], "/other") == ["/other"]
    assert compose_argv(IMG, ["ls"], "") == ["ls"]
    assert compose_argv(ImageDefaults(), [], None) == []


def test_env_precedence(tmp_path):
    f = tmp_path / "envf"
    f.write_text("# comment\n\nB=file\nC=file\nFROM_HOST\n")
    env = compose_env(IMG, [str(f)], ["C=flag", "D"], {"D": "host", "FROM_HOST": "h"})
    assert env == {"PATH": "/img/bin", "A": "1", "B": "file", "C": "flag", "D": "host",
                   "FROM_HOST": "h"}
    assert compose_env(ImageDefaults(), host_env={})["PATH"] == DEFAULT_PATH


def test_env_errors(tmp_path):
    with pytest.raises(UsageError, match="NOPE is not set"):
        compose_env(IMG, env=["NOPE"], host_env={})
    with pytest.raises(UsageError, match="--env-file"):
        compose_env(IMG, env_files=[str(tmp_path / "missing")], host_env={})


def test_tty_sets_term():
    assert compose_env(IMG, host_env={"TERM": "screen"}, tty=True)["TERM"] == "screen"
    assert "TERM" not in compose_env(IMG, host_env={"TERM": "screen"})


def test_env_file_errors_name_file_and_line_never_the_content(tmp_path):
    secret = "sk-live-0123456789abcdef"
    f = tmp_path / "app.env"
    f.write_text(f"# c\nOK=1\n\nBAD KEY={secret}\n")
    with pytest.raises(UsageError) as e:
        compose_env(IMG, env_files=[str(f)], host_env={})
    assert str(e.value) == f"--env-file {f} line 4: invalid variable name"
    f.write_text(f"OK=1\n{secret}\n")  # a bare value pasted without KEY=
    with pytest.raises(UsageError) as e:
        compose_env(IMG, env_files=[str(f)], host_env={})
    assert str(e.value) == f"--env-file {f} line 2: the variable is not set in the host environment"
    f.write_text(f"=={secret}\n")
    with pytest.raises(UsageError) as e:
        compose_env(IMG, env_files=[str(f)], host_env={})
    assert str(e.value) == f"--env-file {f} line 1: invalid variable name"
    f.write_bytes(b"A=\xff" + secret.encode())
    with pytest.raises(UsageError) as e:
        compose_env(IMG, env_files=[str(f)], host_env={})
    assert str(e.value) == f"--env-file {f}: not a UTF-8 text file"
    # A positive control with the same file machinery.
    f.write_text(f"TOKEN={secret}\n")
    assert compose_env(IMG, env_files=[str(f)], host_env={})["TOKEN"] == secret


def test_env_flag_errors_never_echo_the_value():
    with pytest.raises(UsageError) as e:
        compose_env(IMG, env=["BAD KEY=hunter2"], host_env={})
    assert "hunter2" not in str(e.value) and "invalid variable name" in str(e.value)
