"""Compose the guest command, environment, user and workdir (Docker rules), no I/O."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from matchlock.errors import UsageError

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True, slots=True)
class ImageDefaults:
    env: tuple[str, ...] = ()
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    working_dir: str = ""
    user: str = ""


def overlay_image(image: ImageDefaults, config) -> ImageDefaults:
    """`image_config` overrides (RPC create, spec §2.1.1) over the image's own config, per
    field: a non-empty working_dir replaces; entrypoint/cmd/env replace when given (env as
    a whole). `config`: a SandboxConfig."""
    c = config
    if not (c.image_working_dir or c.image_entrypoint is not None or c.image_cmd is not None
            or c.image_env is not None):
        return image
    return ImageDefaults(
        env=image.env if c.image_env is None else tuple(f"{k}={v}" for k, v in c.image_env),
        entrypoint=image.entrypoint if c.image_entrypoint is None else c.image_entrypoint,
        cmd=image.cmd if c.image_cmd is None else c.image_cmd,
        working_dir=c.image_working_dir or image.working_dir, user=image.user)


def compose_argv(
    image: ImageDefaults, args: Sequence[str], entrypoint: str | None
) -> list[str]:
    """ENTRYPOINT ++ (args or CMD); --entrypoint X replaces ENTRYPOINT, "" clears it."""
    ep = list(image.entrypoint) if entrypoint is None else ([entrypoint] if entrypoint else [])
    if args:
        return ep + list(args)
    # Docker drops the image CMD when --entrypoint is given explicitly.
    return ep + ([] if entrypoint is not None else list(image.cmd))


_NOT_SET = "is not set in the host environment"
_BAD_NAME = "invalid variable name"


def _split_env_item(item: str, host_env: Mapping[str, str]) -> tuple[str, str]:
    """KEY=VALUE, or KEY alone copied from the host. ValueError(_NOT_SET | _BAD_NAME)."""
    key, eq, value = item.partition("=")
    if not key or any(c in key for c in " \t\n\0"):
        raise ValueError(_BAD_NAME)
    if not eq:
        if key not in host_env:
            raise ValueError(_NOT_SET)
        value = host_env[key]
    return key, value


def parse_env_item(item: str, host_env: Mapping[str, str], origin: str) -> tuple[str, str]:
    try:
        return _split_env_item(item, host_env)
    except ValueError as e:
        key = item.partition("=")[0]  # never the value: it may be a secret
        raise UsageError(f"{origin} {key}: {key} {e}" if str(e) == _NOT_SET
                         else f"{origin} {key!r}: {e}") from None


def read_env_file(path: str, host_env: Mapping[str, str]) -> list[tuple[str, str]]:
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise UsageError(f"--env-file {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise UsageError(f"--env-file {path}: not a UTF-8 text file") from None
    out = []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            out.append(_split_env_item(line, host_env))
        except ValueError as e:
            # Env files usually hold secrets: name the place, never echo the line.
            reason = f"the variable {e}" if str(e) == _NOT_SET else str(e)
            raise UsageError(f"--env-file {path} line {number}: {reason}") from None
    return out


def compose_env(
    image: ImageDefaults,
    env_files: Sequence[str] = (),
    env: Sequence[str] = (),
    host_env: Mapping[str, str] | None = None,
    tty: bool = False,
) -> dict[str, str]:
    """base PATH < image ENV < --env-file (in order) < -e (in order)."""
    host_env = os.environ if host_env is None else host_env
    out: dict[str, str] = {"PATH": DEFAULT_PATH}
    for item in image.env:
        k, _, v = item.partition("=")
        if k:
            out[k] = v
    for path in env_files:
        out.update(read_env_file(path, host_env))
    for item in env:
        k, v = parse_env_item(item, host_env, "-e")
        out[k] = v
    if tty and "TERM" not in out:
        out["TERM"] = host_env.get("TERM") or "xterm"
    return out
