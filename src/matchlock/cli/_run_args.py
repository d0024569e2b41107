"""`run`'s command line without click: the common spellings only. `parse_run` returns
the same parameters click would, or None to leave the line to click (help, bundled short
flags, attached short values, values that start with `-`, bad numbers, a missing
--image, MATCHLOCK_DEBUG): click then gives the same result or the error.
tests/unit/test_run_args.py holds this table to the click command's parameters."""

from __future__ import annotations

import os

from matchlock.cli._run_core import BOOL_WORDS

_FLAG, _ONE, _MANY = "flag", "one", "many"


def _positive(v: str) -> float:
    f = float(v)
    if not f > 0:
        raise ValueError(v)
    return f


# dest: (spellings, kind, conversion, default)
OPTIONS: dict[str, tuple[tuple[str, ...], str, object, object]] = {
    "image": (("--image",), _ONE, str, None),
    "pull": (("--pull",), _FLAG, None, False),
    "interactive": (("-i", "--interactive"), _FLAG, None, False),
    "tty": (("-t", "--tty"), _FLAG, None, False),
    "detach": (("-d", "--detach"), _FLAG, None, False),
    "env": (("-e", "--env"), _MANY, str, ()),
    "env_file": (("--env-file",), _MANY, str, ()),
    "workdir": (("-w", "--workdir"), _ONE, str, None),
    "user": (("-u", "--user"), _ONE, str, None),
    "entrypoint": (("--entrypoint",), _ONE, str, None),
    "cpus": (("--cpus",), _ONE, float, 1.0),
    "memory": (("--memory",), _ONE, int, 512),
    "disk_size": (("--disk-size",), _ONE, int, 5120),
    "rm": (("--rm", "--no-rm"), _FLAG, None, True),
    "timeout": (("--timeout",), _ONE, _positive, None),
    "publish": (("-p", "--publish"), _MANY, str, ()),
    "addresses": (("--address",), _MANY, str, ()),
    "hostname": (("--hostname",), _ONE, str, ""),
    "no_network": (("--no-network",), _FLAG, None, False),
    "allow_hosts": (("--allow-host",), _MANY, str, ()),
    "add_hosts": (("--add-host",), _MANY, str, ()),
    "allow_private": (("--allow-private",), _MANY, str, ()),
    "secrets": (("--secret",), _MANY, str, ()),
    "dns_servers": (("--dns-servers",), _MANY, str, ()),
    "network_intercept": (("--network-intercept",), _FLAG, None, False),
    "mtu": (("--mtu",), _ONE, int, 1500),
    "volumes": (("-v", "--volume"), _MANY, str, ()),
    "workspace": (("--workspace",), _ONE, str, None),
    "disks": (("--disk",), _MANY, str, ()),
    "kernel": (("--kernel",), _ONE, str, None),
    "accel": (("--accel",), _ONE, str, None),
}
ENVVARS = {"kernel": "MATCHLOCK_KERNEL"}
_BY_NAME = {name: dest for dest, (names, *_rest) in OPTIONS.items() for name in names}


def parse_run(args: list[str]) -> dict[str, object] | None:
    if "MATCHLOCK_DEBUG" in os.environ:
        return None  # click's --debug envvar sets up logging
    params: dict[str, object] = {d: spec[3] for d, spec in OPTIONS.items()}
    many: dict[str, list[str]] = {}
    given: set[str] = set()
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--":
            i += 1
            break
        if not a.startswith("-") or a == "-":
            break
        name, eq, attached = a.partition("=") if a.startswith("--") else (a, "", "")
        dest = _BY_NAME.get(name)
        if dest is None:
            return None  # --help, -h, -it, -eK=V, a typo: click's to parse or word
        _names, kind, conv, _default = OPTIONS[dest]
        if kind == _FLAG:
            if eq and name != "--rm":
                return None
            if eq:
                word = attached.lower()
                if word not in BOOL_WORDS:
                    return None
                params[dest] = BOOL_WORDS[word]
            else:
                params[dest] = name != "--no-rm"
            given.add(dest)
            i += 1
            continue
        if eq:
            value = attached
            i += 1
        else:
            if i + 1 >= len(args) or args[i + 1].startswith("-"):
                return None
            value = args[i + 1]
            i += 2
        try:
            converted = conv(value)  # type: ignore[operator]
        except ValueError:
            return None
        given.add(dest)
        if kind == _MANY:
            many.setdefault(dest, []).append(converted)
        else:
            params[dest] = converted
    params.update({d: tuple(v) for d, v in many.items()})
    for dest, var in ENVVARS.items():
        if dest not in given and os.environ.get(var):
            params[dest] = os.environ[var]
    if params["image"] is None:
        return None  # click words the missing option
    params["command"] = tuple(args[i:])
    return params
