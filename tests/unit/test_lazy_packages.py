"""Packages whose names load on first use: every exported name resolves, others fail."""

from __future__ import annotations

import importlib

import pytest

PACKAGES = ("matchlock.sandbox", "matchlock.vfs", "matchlock.image")


@pytest.mark.parametrize("package", PACKAGES)
def test_every_exported_name_resolves(package):
    mod = importlib.import_module(package)
    assert sorted(mod.__all__) == sorted(mod._WHERE)
    for name in mod.__all__:
        value = getattr(mod, name)
        where = importlib.import_module(f"{package}.{mod._WHERE[name]}")
        assert value is getattr(where, name)


@pytest.mark.parametrize("package", PACKAGES)
def test_an_unknown_name_is_an_attribute_error(package):
    mod = importlib.import_module(package)
    with pytest.raises(AttributeError, match="no_such_name"):
        mod.no_such_name  # noqa: B018
    with pytest.raises(ImportError):
        exec(f"from {package} import no_such_name", {})
