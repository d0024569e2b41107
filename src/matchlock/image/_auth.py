"""Registry credentials and `WWW-Authenticate` challenges.

Credentials come from the files `docker login`, `podman login` and `skopeo login` write:
`$DOCKER_CONFIG/config.json` (default `~/.docker/config.json`), then `$REGISTRY_AUTH_FILE`
and `$XDG_RUNTIME_DIR/containers/auth.json`. In each, a `credHelpers` entry for the registry
wins, then an `auths` entry, then the default `credsStore` helper; helpers are the
`docker-credential-<name>` programs of the docker credential-helper protocol.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from matchlock.errors import RegistryError
from matchlock.image._reference import DOCKER_HUB

log = logging.getLogger(__name__)

DOCKER_HUB_KEY = "https://index.docker.io/v1/"
_HUB_KEYS = {"index.docker.io", "docker.io", "registry-1.docker.io", "registry.hub.docker.com"}
HELPER_TIMEOUT_S = 30


@dataclass(frozen=True, slots=True)
class Credentials:
    username: str
    password: str = field(repr=False)
    identity_token: str = field(default="", repr=False)  # OAuth2 refresh token
    source: str = ""  # where they came from, for error messages

    def basic(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()


@dataclass(frozen=True, slots=True)
class Challenge:
    scheme: str  # lowercased: "bearer", "basic"
    params: dict[str, str]


# auth-param = token "=" ( token / quoted-string )
_PARAM = re.compile(r'\s*([!#$%&\'*+.^_`|~0-9A-Za-z-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^\s,]*)\s*,?')


def parse_challenges(header: str) -> list[Challenge]:
    """Parse a WWW-Authenticate value (RFC 7235): `Bearer realm="...",service="..."`."""
    out: list[Challenge] = []
    s = header.strip()
    while s:
        m = re.match(r"([!#$%&'*+.^_`|~0-9A-Za-z-]+)(\s+|$|,)", s)
        if not m:
            break
        scheme = m.group(1).lower()
        s = s[m.end():]
        params: dict[str, str] = {}
        while True:
            pm = _PARAM.match(s)
            if not pm:
                break
            # A token followed by another token (no '=') starts the next challenge.
            key, val = pm.group(1).lower(), pm.group(2)
            if val.startswith('"'):
                val = re.sub(r"\\(.)", r"\1", val[1:-1])
            params[key] = val
            s = s[pm.end():]
        out.append(Challenge(scheme, params))
        s = s.lstrip(", ")
    return out


def _config_files(env: Mapping[str, str]) -> list[Path]:
    docker_dir = env.get("DOCKER_CONFIG")
    home = env.get("HOME") or str(Path.home())
    files = [Path(docker_dir) / "config.json" if docker_dir else Path(home) / ".docker" /
             "config.json"]
    if env.get("REGISTRY_AUTH_FILE"):
        files.append(Path(env["REGISTRY_AUTH_FILE"]))
    if env.get("XDG_RUNTIME_DIR"):
        files.append(Path(env["XDG_RUNTIME_DIR"]) / "containers" / "auth.json")
    return files


def _key_host(key: str) -> str:
    """`https://index.docker.io/v1/` -> `index.docker.io`; `host:5000/x` -> `host:5000`."""
    k = re.sub(r"^[a-z]+://", "", key.strip().lower())
    return k.split("/", 1)[0]


def _matches(key: str, registry: str) -> bool:
    host = _key_host(key)
    if registry == DOCKER_HUB:
        return host in _HUB_KEYS
    return host == registry.lower()


def _server_url(registry: str) -> str:
    return DOCKER_HUB_KEY if registry == DOCKER_HUB else registry


def _helper(name: str, registry: str, env: Mapping[str, str], source: str) -> Credentials | None:
    exe = f"docker-credential-{name}"
    try:
        r = subprocess.run(
            [exe, "get"], input=_server_url(registry), capture_output=True, text=True,
            timeout=HELPER_TIMEOUT_S, env=dict(env),
        )
    except FileNotFoundError:
        raise RegistryError(
            f"credential helper {exe} (named in {source}) is not installed; install it or "
            f"remove it from that file"
        ) from None
    except subprocess.TimeoutExpired:
        raise RegistryError(
            f"credential helper {exe} did not answer within {HELPER_TIMEOUT_S} s"
        ) from None
    if r.returncode != 0:
        msg = (r.stdout or r.stderr).strip()
        if "not found" in msg.lower():
            return None  # the helper has nothing for this registry: pull anonymously
        raise RegistryError(f"credential helper {exe} failed for {registry}: "
                            f"{msg.splitlines()[0] if msg else f'exit {r.returncode}'}")
    try:
        data = json.loads(r.stdout)
        user, secret = str(data["Username"]), str(data["Secret"])
    except (ValueError, KeyError, TypeError):
        raise RegistryError(f"credential helper {exe} answered something that is not "
                            "{Username, Secret} JSON") from None
    where = f"credential helper {exe}"
    if user == "<token>":
        return Credentials("", "", identity_token=secret, source=where)
    return Credentials(user, secret, source=where)


def _from_auths(entry: object, source: str) -> Credentials | None:
    if not isinstance(entry, dict):
        return None
    token = entry.get("identitytoken")
    user, password = entry.get("username"), entry.get("password")
    if isinstance(entry.get("auth"), str) and entry["auth"]:
        try:
            raw = base64.b64decode(entry["auth"], validate=False).decode()
            user, _, password = raw.partition(":")
        except (ValueError, UnicodeDecodeError):
            raise RegistryError(f"the auth entry in {source} is not base64 user:password; "
                                "log in again") from None
    if isinstance(token, str) and token:
        return Credentials(str(user or ""), "", identity_token=token, source=source)
    if isinstance(user, str) and user:
        return Credentials(user, str(password or ""), source=source)
    return None


def lookup_credentials(registry: str, env: Mapping[str, str] | None = None) -> Credentials | None:
    """Credentials for `registry` ("docker.io", "host:port"), or None for anonymous."""
    env = os.environ if env is None else env
    for path in _config_files(env):
        try:
            text = path.read_text()
        except OSError:
            continue
        try:
            cfg = json.loads(text)
        except ValueError:
            raise RegistryError(f"{path} is not valid JSON; fix or remove it") from None
        if not isinstance(cfg, dict):
            continue
        helpers = cfg.get("credHelpers")
        if isinstance(helpers, dict):
            for key, name in helpers.items():
                if isinstance(name, str) and name and _matches(key, registry):
                    return _helper(name, registry, env, str(path))
        auths = cfg.get("auths")
        if isinstance(auths, dict):
            for key, entry in auths.items():
                if _matches(key, registry):
                    creds = _from_auths(entry, str(path))
                    if creds is not None:
                        return creds
        store = cfg.get("credsStore")
        if isinstance(store, str) and store:
            creds = _helper(store, registry, env, str(path))
            if creds is not None:
                return creds
    return None
