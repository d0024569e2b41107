"""Image name validation and normalisation ("busybox" -> "busybox:latest")."""

from __future__ import annotations

import re

from matchlock.errors import UsageError

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_DOMAIN = (
    r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*"
)
_REPO_RE = re.compile(rf"^(?:{_DOMAIN}(?::[0-9]+)?/)?{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


def normalize_name(name: str) -> str:
    """Return NAME:TAG for a valid image reference, or raise UsageError."""
    if not isinstance(name, str) or not name.strip():
        raise UsageError("image name is empty; give one like `debian:bookworm`")
    ref = name.strip()
    bad = (
        f"invalid image name {name!r}: use lowercase NAME[:TAG] "
        "(letters, digits, '.', '_', '-', '/'), e.g. `debian:bookworm`"
    )
    if "@" in ref or len(ref) > 255:
        raise UsageError(bad)
    repo, tag = ref, "latest"
    slash = ref.rfind("/")
    colon = ref.rfind(":")
    if colon > slash:
        repo, tag = ref[:colon], ref[colon + 1 :]
    if not _TAG_RE.match(tag) or not _REPO_RE.match(repo):
        raise UsageError(bad)
    return f"{repo}:{tag}"
