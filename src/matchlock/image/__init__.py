"""OCI/docker images as read-only ext4 root disks.

`ImageStore().import_tar(name, stream)` takes a `docker save` or OCI image-layout tarball;
`ImageStore().ensure_builtin()` makes the registry-free busybox image.
"""

from matchlock.image._model import Image, ImageConfig
from matchlock.image._names import normalize_name
from matchlock.image._store import BUILTIN_IMAGE, ImageStore

__all__ = ["BUILTIN_IMAGE", "Image", "ImageConfig", "ImageStore", "normalize_name"]
