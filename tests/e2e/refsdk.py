"""The unmodified reference Python SDK (PyPI `matchlock==0.2.17`) in a virtualenv of its
own under the cache dir, for compatibility tests:

    from tests.e2e.refsdk import run_ref
    proc = run_ref(SCRIPT, env={"MATCHLOCK_BIN": our_cli})   # SCRIPT: `import matchlock` ...

The venv is built once (under a file lock, so parallel tests share it) and checked: the
`matchlock` it imports must be the wheel's 0.2.17, never this repository's package.
Failures raise with pip's output: a compat test that cannot get the SDK fails loudly.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from matchlock.paths import cache_dir

REF_VERSION = "0.2.17"
_CHECK = ("import json, matchlock; print(json.dumps("
          "{'version': matchlock.__version__, 'file': matchlock.__file__}))")


def ref_venv() -> Path:
    return cache_dir() / f"refsdk-{REF_VERSION}"


def _clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")}
    env.update(extra or {})
    return env


def ref_python() -> Path:
    """The reference venv's interpreter, building the venv on first use."""
    venv = ref_venv()
    py = venv / "bin" / "python"
    marker = venv / ".matchlock-refsdk-ok"
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f"refsdk-{REF_VERSION}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists() and py.exists():
            return py
        shutil.rmtree(venv, ignore_errors=True)
        _run([sys.executable, "-m", "venv", str(venv)], "create the reference SDK venv")
        _run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check",
              f"matchlock=={REF_VERSION}"], f"pip install matchlock=={REF_VERSION}")
        import json

        info = json.loads(_run([str(py), "-c", _CHECK], "import the reference SDK",
                               cwd=venv).stdout)
        if info["version"] != REF_VERSION or not info["file"].startswith(str(venv)):
            raise RuntimeError(f"reference SDK venv imports the wrong matchlock: {info}")
        marker.write_text(REF_VERSION + "\n")
    return py


def ref_source() -> Path:
    """The installed reference package (for reading what it sends)."""
    py = ref_python()
    out = _run([str(py), "-c", "import matchlock, os; print(os.path.dirname(matchlock.__file__))"],
               "locate the reference SDK", cwd=ref_venv()).stdout
    return Path(out.strip())


def run_ref(script: str, env: dict[str, str] | None = None, timeout: float = 300,
            check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `script` with the reference SDK's interpreter, from an empty directory (so
    this checkout's `src/` can never shadow the wheel). `env` adds to a clean copy of
    os.environ (MATCHLOCK_BIN goes there)."""
    py = ref_python()
    with tempfile.TemporaryDirectory(prefix="refsdk-") as d:
        path = Path(d) / "ref_script.py"
        path.write_text(script)
        proc = subprocess.run([str(py), str(path)], cwd=d, env=_clean_env(env),
                              capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"reference SDK script failed (exit {proc.returncode}):\n"
                             f"--- stdout\n{proc.stdout[-4000:]}\n"
                             f"--- stderr\n{proc.stderr[-4000:]}")
    return proc


def _run(argv: list[str], what: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, env=_clean_env(), cwd=cwd)
    if proc.returncode != 0:
        raise RuntimeError(f"cannot {what} (exit {proc.returncode}): "
                           f"{(proc.stderr or proc.stdout).strip()[-2000:]}")
    return proc
