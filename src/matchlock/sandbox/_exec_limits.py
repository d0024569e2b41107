"""What the guest kernel can exec: Linux's limits on argv + envp, checked before booting.

execve(2) copies every argument and `KEY=VALUE` string onto the new program's stack:
- one string (with its NUL) may take at most MAX_ARG_STRLEN = 32 pages = 128 KiB;
- all of them, with an 8-byte pointer each, at most a quarter of RLIMIT_STACK (8 MiB in the
  guest: the kernel's default, which init keeps) = 2 MiB, our ARG_MAX.
The kernel also copies the program's path there, the guest agent adds HOME when the request
has none, and a `#!` script adds its interpreter: EXEC_RESERVE covers those. A request that
passes here fits the channel too (its JSON is at most 6x + a little of this, < MAX_REQUEST).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from matchlock.errors import CommandTooLargeError

ARG_MAX = 2 << 20
MAX_ARG_STRLEN = 32 * 4096  # including the NUL: a string may have 131071 bytes
POINTER = 8
EXEC_RESERVE = 8 << 10
_ADVICE = "pass big data in a file or on stdin instead"


def _size(n: int) -> str:
    if n >= 1 << 20:
        return f"{n / (1 << 20):.1f} MiB"
    return f"{n / 1024:.1f} KiB" if n >= 1024 else f"{n} bytes"


def _encoded(s: str, what: str) -> bytes:
    try:
        raw = s.encode()
    except UnicodeEncodeError:  # surrogate-escaped bytes from the host's argv or environ
        raise CommandTooLargeError(f"{what} is not valid UTF-8, which the guest channel "
                                   "cannot carry") from None
    if b"\0" in raw:
        raise CommandTooLargeError(f"{what} contains a NUL byte, which no program can "
                                   "receive")
    return raw


def _env_items(env: Mapping[str, str] | Iterable[str]) -> list[tuple[str, str]]:
    if isinstance(env, Mapping):
        return [(k, f"{k}={v}") for k, v in env.items()]
    return [(item.partition("=")[0], item) for item in env]


def check_exec_size(argv: Sequence[str], env: Mapping[str, str] | Iterable[str]) -> int:
    """Raise CommandTooLargeError (naming the argument or variable) unless the guest can
    exec `argv` with `env` (a mapping or `KEY=VALUE` strings). Returns the bytes counted."""
    total_argv = total_env = 0
    for i, arg in enumerate(argv):
        n = len(_encoded(arg, f"argument argv[{i}] of the command")) + 1
        if n > MAX_ARG_STRLEN:
            raise CommandTooLargeError(
                f"argument argv[{i}] of the command is {_size(n - 1)} ({n - 1} bytes); Linux "
                f"allows at most {MAX_ARG_STRLEN - 1} bytes in one argument or variable: "
                f"{_ADVICE}")
        total_argv += n + POINTER
    for key, item in _env_items(env):
        n = len(_encoded(item, f"environment variable {key}")) + 1
        if n > MAX_ARG_STRLEN:
            raise CommandTooLargeError(
                f"environment variable {key} is {_size(n - 1)} ({n - 1} bytes as KEY=VALUE); "
                f"Linux allows at most {MAX_ARG_STRLEN - 1} bytes in one variable or "
                f"argument: {_ADVICE}")
        total_env += n + POINTER
    total = total_argv + total_env
    if total > ARG_MAX - EXEC_RESERVE:
        raise CommandTooLargeError(
            f"the command and its environment take {_size(total)} ({_size(total_argv)} "
            f"arguments + {_size(total_env)} environment, counting a NUL and an 8-byte pointer "
            f"per string); the guest can exec at most {ARG_MAX - EXEC_RESERVE} bytes "
            f"(ARG_MAX {ARG_MAX >> 20} MiB less {EXEC_RESERVE >> 10} KiB for the program path "
            f"and HOME): {_ADVICE}")
    return total
