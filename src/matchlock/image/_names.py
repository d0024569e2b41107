"""Image name validation and normalisation ("busybox" -> "busybox:latest")."""

from __future__ import annotations

from matchlock.image._reference import parse_reference


def normalize_name(name: str) -> str:
    """The store key for a valid image reference (see `Reference.name`), or UsageError."""
    return parse_reference(name).name
