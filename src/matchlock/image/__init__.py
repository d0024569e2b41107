"""OCI/docker images as read-only ext4 root disks.

`ImageStore().pull(ref)` fetches from a registry, `ImageStore().import_tar(name, stream)`
takes a `docker save` or OCI image-layout tarball, `ImageStore().ensure_builtin()` makes the
registry-free busybox image; `ImageStore().resolve(name)` is what a VM boots from.

Names load on first use (PEP 562): booting a stored image does not import the pull
machinery.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from matchlock._lazy import lazy_names

if TYPE_CHECKING:  # the names as type checkers see them
    from matchlock.image._model import Image, ImageConfig
    from matchlock.image._names import normalize_name
    from matchlock.image._platform import Platform, host_platform
    from matchlock.image._pull import LineProgress, PullProgress
    from matchlock.image._reference import Reference, parse_reference
    from matchlock.image._store import BUILTIN_IMAGE, GcResult, ImageStore, PullResult


_WHERE = {
    "Image": "_model", "ImageConfig": "_model", "normalize_name": "_names",
    "Platform": "_platform", "host_platform": "_platform",
    "LineProgress": "_pull", "PullProgress": "_pull",
    "Reference": "_reference", "parse_reference": "_reference",
    "BUILTIN_IMAGE": "_store", "GcResult": "_store", "ImageStore": "_store",
    "PullResult": "_store",
}

__all__ = [
    "BUILTIN_IMAGE", "GcResult", "Image", "ImageConfig", "ImageStore", "LineProgress",
    "Platform", "PullProgress", "PullResult", "Reference", "host_platform", "normalize_name",
    "parse_reference",
]


__getattr__ = lazy_names(__name__, _WHERE, globals())
