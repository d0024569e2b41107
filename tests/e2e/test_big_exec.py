"""Exec requests bigger than one channel frame: they reach the guest intact, and what the
guest kernel could not exec is refused before anything boots.

The guest computes a SHA-256 of every argument/variable it received (busybox sha256sum over
the shell's own copy), so the test judges by what the guest process really got.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import time

import pytest

from tests.e2e.conftest import NO_RESIDUE, residue

pytestmark = pytest.mark.e2e

BB = "matchlock/busybox"
DIGESTS = 'for v in "$@"; do printf %s "$v" | sha256sum; done'


def _sha(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()


def _digests(out: bytes) -> list[str]:
    return [line.split()[0] for line in out.decode().splitlines()]


def _vm_rows(state_home) -> int:
    db = state_home / "state.db"
    if not db.exists():
        return 0
    with sqlite3.connect(db) as c:
        return c.execute("SELECT count(*) FROM vms").fetchone()[0]


def test_one_mib_of_environment_reaches_the_guest_intact(ml, qemu_present, state_home,
                                                          tmp_path):
    # 1 MiB of values in 9 variables (Linux takes at most 128 KiB per variable): four by
    # -e on matchlock's command line, five from an env file.
    vals = {f"BIG{i}": os.urandom(60_000).hex()[: 116_600 + i] for i in range(9)}
    assert sum(map(len, vals.values())) >= 1 << 20
    env_file = tmp_path / "big.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in list(vals.items())[4:]))
    flags = [a for k, v in list(vals.items())[:4] for a in ("-e", f"{k}={v}")]
    names = " ".join(f'"${k}"' for k in vals)
    t0 = time.monotonic()
    p = ml("run", "--image", BB, *flags, "--env-file", str(env_file), "--",
           "sh", "-c", f"set -- {names}; {DIGESTS}")
    elapsed = time.monotonic() - t0
    assert p.returncode == 0, p.stderr[-2000:]
    assert _digests(p.stdout) == [_sha(v) for v in vals.values()]
    print(f"1 MiB of environment: run took {elapsed:.2f} s")
    assert residue(state_home) == NO_RESIDUE


def test_long_argv_reaches_the_guest_intact(ml, qemu_present, state_home):
    args = [os.urandom(605 + i % 100).hex() for i in range(1200)]  # 1.5 MiB in 1200 strings
    assert 1.4 * (1 << 20) < sum(map(len, args)) < 1.6 * (1 << 20)
    script = 'echo $#; printf "%s\\n" "$@" | sha256sum'  # one digest: one fork, not 1200
    t0 = time.monotonic()
    p = ml("run", "--image", BB, "--", "sh", "-c", script, "sh", *args)
    elapsed = time.monotonic() - t0
    assert p.returncode == 0, p.stderr[-2000:]
    count, digest = p.stdout.decode().split()[:2]
    assert int(count) == len(args) and digest == _sha("".join(a + "\n" for a in args))
    print(f"1.5 MiB of argv: run took {elapsed:.2f} s")
    t0 = time.monotonic()
    small = ml("run", "--image", BB, "--", "sh", "-c", script, "sh", "x")
    print(f"same run with one small argument: {time.monotonic() - t0:.2f} s")
    assert small.returncode == 0 and small.stdout.decode().split()[:2] == ["1", _sha("x\n")]
    assert residue(state_home) == NO_RESIDUE


@pytest.mark.parametrize("content, needle", [
    # One 1 MiB value: no Linux program can receive it (MAX_ARG_STRLEN).
    ("TOKEN=" + "t" * (1 << 20) + "\n", "environment variable TOKEN is 1.0 MiB"),
    # 2.3 MiB over 20 variables: each fits, together they pass ARG_MAX.
    ("".join(f"V{i}=" + "v" * 120_000 + "\n" for i in range(20)), "ARG_MAX"),
])
def test_over_limit_request_fails_before_boot(ml, qemu_present, state_home, tmp_path,
                                              content, needle):
    env_file = tmp_path / "over.env"
    env_file.write_text(content)
    rows = _vm_rows(state_home)
    t0 = time.monotonic()
    p = ml("run", "--image", BB, "--env-file", str(env_file), "--", "true")
    elapsed = time.monotonic() - t0
    err = p.stderr.decode().strip()
    assert p.returncode == 1, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert needle in err and "stdin" in err, err
    assert "ttttttttt" not in err and "vvvvvvvvv" not in err  # never the value
    print(f"refused in {elapsed:.2f} s: {err}")
    assert elapsed < 3, f"took {elapsed:.2f} s: it must fail before booting"
    assert residue(state_home) == NO_RESIDUE
    assert _vm_rows(state_home) == rows
    # Positive control: the same machinery with a value that fits boots and runs.
    env_file.write_text("TOKEN=" + "t" * 100_000 + "\n")
    ok = ml("run", "--image", BB, "--env-file", str(env_file), "--", "sh", "-c",
            'printf %s "$TOKEN" | wc -c')
    assert ok.returncode == 0 and ok.stdout.strip() == b"100000", ok.stderr[-1000:]
