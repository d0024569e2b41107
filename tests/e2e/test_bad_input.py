"""Bad input: one-line error, non-zero exit, nothing left behind."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import NO_RESIDUE, residue

pytestmark = pytest.mark.e2e
BB = "matchlock/busybox"


def _one_line_error(p) -> str:
    err = p.stderr.decode().strip()
    assert p.returncode != 0
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    return err


def test_unknown_image(ml, state_home):
    err = _one_line_error(ml("run", "--image", "nope:missing", "true"))
    assert "nope:missing" in err and "import" in err
    assert residue(state_home) == NO_RESIDUE


def test_corrupt_tarball(ml, tmp_path):
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"this is not a tarball" * 100)
    err = _one_line_error(ml("image", "import", "bad:1", str(bad)))
    assert "tarball" in err
    assert b"bad:1" not in ml("image", "ls").stdout


@pytest.mark.parametrize("args,needle", [
    (("--memory", "0"), "--memory"),
    (("--cpus", "abc"), "--cpus"),
    (("--cpus", "0"), "--cpus"),
    (("--disk-size", "1"), "--disk-size"),
])
def test_bad_flags(ml, state_home, args, needle):
    err = _one_line_error(ml("run", "--image", BB, *args, "true"))
    assert needle in err
    assert residue(state_home) == NO_RESIDUE


def test_missing_qemu_names_package(ml, state_home):
    err = _one_line_error(ml("run", "--image", BB, "true",
                             env={"MATCHLOCK_QEMU": "/nonexistent/qemu-system-x86_64"}))
    assert "apt-get install qemu-system-x86" in err
    assert residue(state_home) == NO_RESIDUE


def test_missing_kernel_without_network(ml, state_home, tmp_path):
    # A fresh cache and an apt that cannot reach any mirror.
    env = {"MATCHLOCK_CACHE_DIR": str(tmp_path / "cache"), "MATCHLOCK_APT_GET": "false",
           "MATCHLOCK_APT_CACHE": "false"}
    err = _one_line_error(ml("run", "--image", BB, "true", env=env))
    assert "kernel" in err and "--kernel" in err
    assert residue(state_home) == NO_RESIDUE


def test_kernel_path_missing(ml, state_home):
    err = _one_line_error(ml("run", "--image", BB, "--kernel", "/nonexistent/vmlinuz", "true"))
    assert "/nonexistent/vmlinuz" in err
