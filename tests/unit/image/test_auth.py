"""WWW-Authenticate parsing and credentials from docker/podman config files and helpers."""

from __future__ import annotations

import base64
import json
import os
import stat

import pytest

from matchlock.errors import RegistryError
from matchlock.image._auth import lookup_credentials, parse_challenges


def test_parse_bearer_challenge():
    [c] = parse_challenges(
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:library/alpine:pull"'
    )
    assert c.scheme == "bearer"
    assert c.params == {"realm": "https://auth.docker.io/token",
                        "service": "registry.docker.io",
                        "scope": "repository:library/alpine:pull"}


def test_parse_several_challenges_and_escapes():
    cs = parse_challenges('Basic realm="a \\"quoted\\" realm", Bearer realm="https://t/x", '
                          'error="insufficient_scope"')
    assert [c.scheme for c in cs] == ["basic", "bearer"]
    assert cs[0].params["realm"] == 'a "quoted" realm'
    assert cs[1].params == {"realm": "https://t/x", "error": "insufficient_scope"}
    assert parse_challenges("") == []
    assert parse_challenges("Basic")[0].scheme == "basic"


def _env(tmp_path, cfg: dict | None = None, **extra) -> dict:
    d = tmp_path / "docker"
    d.mkdir(exist_ok=True)
    if cfg is not None:
        (d / "config.json").write_text(json.dumps(cfg))
    return {"HOME": str(tmp_path), "DOCKER_CONFIG": str(d),
            "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", **extra}


def _b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def test_auths_entries(tmp_path):
    env = _env(tmp_path, {"auths": {
        "https://index.docker.io/v1/": {"auth": _b64("hub:pw:with:colons")},
        "localhost:5000": {"username": "lu", "password": "lp"},
        "https://ghcr.io/v2/": {"auth": _b64("gu:gp")},
        "other.io": {"identitytoken": "refresh-me"},
    }})
    hub = lookup_credentials("docker.io", env)
    assert (hub.username, hub.password) == ("hub", "pw:with:colons")
    assert "config.json" in hub.source
    assert lookup_credentials("localhost:5000", env).username == "lu"
    assert lookup_credentials("ghcr.io", env).password == "gp"
    assert lookup_credentials("other.io", env).identity_token == "refresh-me"
    assert lookup_credentials("localhost:5001", env) is None
    assert "pw" not in repr(hub)  # secrets never end up in logs via repr


def _helper(tmp_path, name: str, script: str) -> None:
    b = tmp_path / "bin"
    b.mkdir(exist_ok=True)
    p = b / f"docker-credential-{name}"
    p.write_text("#!/bin/sh\n" + script)
    p.chmod(p.stat().st_mode | stat.S_IEXEC)


def test_cred_helpers_and_store(tmp_path):
    _helper(tmp_path, "mine", 'read url; [ "$1" = get ] || exit 3\n'
            'case "$url" in reg.test) echo \'{"ServerURL":"reg.test","Username":"hu",'
            '"Secret":"hs"}\';; *) echo "credentials not found in native keychain"; exit 1;;'
            " esac\n")
    _helper(tmp_path, "tok", "read url; echo '{\"Username\":\"<token>\",\"Secret\":\"idt\"}'\n")
    env = _env(tmp_path, {"credHelpers": {"reg.test": "mine", "tok.test": "tok"},
                          "credsStore": "mine",
                          "auths": {"reg.test": {"auth": _b64("ignored:x")}}})
    c = lookup_credentials("reg.test", env)
    assert (c.username, c.password) == ("hu", "hs")  # credHelpers win over auths
    assert "docker-credential-mine" in c.source
    assert lookup_credentials("tok.test", env).identity_token == "idt"
    # The default store says "not found": anonymous.
    assert lookup_credentials("elsewhere.test", env) is None


def test_helper_failures_are_one_line_errors(tmp_path):
    _helper(tmp_path, "broken", "echo 'keychain locked' >&2; exit 2\n")
    _helper(tmp_path, "garbage", "echo not json\n")
    env = _env(tmp_path, {"credHelpers": {"a.test": "broken", "b.test": "garbage",
                                          "c.test": "absent"}})
    with pytest.raises(RegistryError, match="docker-credential-broken failed for a.test: "
                                            "keychain locked"):
        lookup_credentials("a.test", env)
    with pytest.raises(RegistryError, match="docker-credential-garbage answered something"):
        lookup_credentials("b.test", env)
    with pytest.raises(RegistryError, match="docker-credential-absent .* is not installed"):
        lookup_credentials("c.test", env)


def test_podman_auth_file_and_bad_json(tmp_path):
    auth = tmp_path / "auth.json"
    auth.write_text(json.dumps({"auths": {"quay.io": {"auth": _b64("q:w")}}}))
    env = _env(tmp_path, None, REGISTRY_AUTH_FILE=str(auth))
    assert lookup_credentials("quay.io", env).username == "q"
    assert lookup_credentials("docker.io", env) is None
    (tmp_path / "docker" / "config.json").write_text("{nope")
    with pytest.raises(RegistryError, match="is not valid JSON"):
        lookup_credentials("quay.io", env)
