"""OCI and docker media types, size limits, and digest checks (no I/O)."""

from __future__ import annotations

import hashlib

from matchlock.errors import IntegrityError, RegistryError

MT_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MT_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MT_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
INDEX_TYPES = frozenset({MT_OCI_INDEX, MT_DOCKER_LIST})
MANIFEST_TYPES = frozenset({MT_OCI_MANIFEST, MT_DOCKER_MANIFEST})
MAX_MANIFEST = 4 << 20
MAX_CONFIG = 16 << 20


def verify_digest(body: bytes, digest: str, what: str, registry: str) -> None:
    alg, _, want = digest.partition(":")
    if alg != "sha256":
        raise RegistryError(f"{what} uses digest algorithm {alg!r}; only sha256 is supported")
    got = hashlib.sha256(body).hexdigest()
    if got != want:
        raise IntegrityError(
            f"{what} from {registry} failed verification (its digest is sha256:{got}, "
            f"expected {digest}); push the image again"
        )
