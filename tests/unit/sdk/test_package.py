"""Package surface: cheap `import matchlock`, lazy SDK names, typed, two clients alike."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import matchlock
import matchlock.sdk as sdk
from matchlock import AsyncClient, Client


def test_import_matchlock_and_the_cli_do_not_load_the_sdk():
    code = ("import sys, matchlock, matchlock.cli; "
            "print(sorted(m for m in sys.modules if m.startswith('matchlock.sdk')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_lazy_names_match_the_sdk_exports():
    assert set(sdk.__all__) == matchlock._SDK_NAMES
    assert matchlock.__all__ == sorted(sdk.__all__)
    assert matchlock.Client is sdk.Client and "Sandbox" in dir(matchlock)
    assert matchlock.MatchlockError is __import__("matchlock.errors").errors.MatchlockError


def test_py_typed_ships():
    # the installed package (editable or not) carries the marker, and the build says so
    assert (Path(matchlock.__file__).parent / "py.typed").exists()
    pyproject = (Path(__file__).resolve().parents[3] / "pyproject.toml").read_text()
    assert '"py.typed"' in pyproject


def test_async_client_mirrors_client():
    def public(cls):
        return {n: f for n, f in inspect.getmembers(cls, inspect.isfunction)
                if not n.startswith("_")}

    sync, aio = public(Client), public(AsyncClient)
    assert set(sync) - {"pending_requests"} <= set(aio)
    for name, fn in sync.items():
        afn = aio[name]
        if name != "pending_requests":
            assert inspect.iscoroutinefunction(afn), name
        s, a = inspect.signature(fn), inspect.signature(afn)
        assert list(s.parameters) == list(a.parameters), name
        assert [p.default for p in s.parameters.values()] == \
            [p.default for p in a.parameters.values()], name
    assert inspect.iscoroutinefunction(AsyncClient.attach)
