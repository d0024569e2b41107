"""OCI/docker images as read-only ext4 root disks.

`ImageStore().pull(ref)` fetches from a registry, `ImageStore().import_tar(name, stream)`
takes a `docker save` or OCI image-layout tarball, `ImageStore().ensure_builtin()` makes the
registry-free busybox image; `ImageStore().resolve(name)` is what a VM boots from.
"""

from matchlock.image._model import Image, ImageConfig
from matchlock.image._names import normalize_name
from matchlock.image._platform import Platform, host_platform
from matchlock.image._pull import LineProgress, PullProgress
from matchlock.image._reference import Reference, parse_reference
from matchlock.image._store import BUILTIN_IMAGE, GcResult, ImageStore, PullResult

__all__ = [
    "BUILTIN_IMAGE", "GcResult", "Image", "ImageConfig", "ImageStore", "LineProgress",
    "Platform", "PullProgress", "PullResult", "Reference", "host_platform", "normalize_name",
    "parse_reference",
]
