"""Image references: `alpine`, `ghcr.io/org/app:1`, `localhost:5000/x@sha256:...`.

Follows the docker reference grammar: the first path component is a registry when it has a
'.' or ':' or is `localhost`; otherwise the image is on Docker Hub, where one-component names
live under `library/`. The store keys images by `Reference.name`, the short ("familiar") form
people type: `alpine:latest`, not `docker.io/library/alpine:latest`.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from matchlock.errors import UsageError

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
_HUB_ALIASES = {"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}

_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_HOST = re.compile(
    r"^(?:(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*"
    r"|\[[0-9a-fA-F:.]+\])(?::[0-9]{1,5})?$"
)
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


@dataclass(frozen=True, slots=True)
class Reference:
    registry: str  # "docker.io", "ghcr.io", "localhost:5000"
    repository: str  # "library/alpine"
    tag: str | None = None
    digest: str | None = None  # "sha256:<hex>"

    @property
    def target(self) -> str:
        """What to ask the registry's manifests endpoint for."""
        return self.digest or self.tag or "latest"

    @property
    def familiar_repo(self) -> str:
        if self.registry == DOCKER_HUB:
            return self.repository.removeprefix("library/")
        return f"{self.registry}/{self.repository}"

    @property
    def name(self) -> str:
        """The store key: `alpine:latest`, `ghcr.io/o/a@sha256:...`."""
        if self.digest:
            return f"{self.familiar_repo}@{self.digest}"
        return f"{self.familiar_repo}:{self.tag or 'latest'}"

    @property
    def api_host(self) -> str:
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def host(self) -> str:
        """The registry without its port."""
        h = self.registry
        if h.startswith("["):
            return h[1 : h.index("]")]
        return h.rsplit(":", 1)[0] if ":" in h else h

    @property
    def plain_http(self) -> bool:
        """Only registries on this machine may be spoken to without TLS."""
        h = self.host
        if h == "localhost" or h.endswith(".localhost"):
            return True
        try:
            return ipaddress.ip_address(h).is_loopback
        except ValueError:
            return False

    @property
    def base_url(self) -> str:
        scheme = "http" if self.plain_http else "https"
        return f"{scheme}://{self.api_host}/v2/{self.repository}"

    def with_tag(self, tag: str) -> Reference:
        return Reference(self.registry, self.repository, tag, None)


def _bad(text: str, why: str) -> UsageError:
    return UsageError(
        f"invalid image reference {text!r}: {why}; use [REGISTRY/]NAME[:TAG][@sha256:DIGEST] "
        "with a lowercase NAME, e.g. `debian:bookworm`"
    )


def parse_reference(text: str) -> Reference:
    """Parse and normalise an image reference, or raise UsageError."""
    if not isinstance(text, str) or not text.strip():
        raise UsageError("image name is empty; give one like `debian:bookworm`")
    ref = text.strip()
    if len(ref) > 512 or any(c.isspace() for c in ref):
        raise _bad(text, "it is too long or has spaces")
    digest = None
    if "@" in ref:
        ref, digest = ref.split("@", 1)
        if not _DIGEST.match(digest):
            raise _bad(text, "the digest must be sha256: followed by 64 lowercase hex digits")
    tag = None
    slash, colon = ref.rfind("/"), ref.rfind(":")
    if colon > slash:
        ref, tag = ref[:colon], ref[colon + 1 :]
        if not _TAG.match(tag):
            raise _bad(text, f"bad tag {tag!r}")
    parts = ref.split("/")
    registry = DOCKER_HUB
    if len(parts) > 1 and ("." in parts[0] or ":" in parts[0] or parts[0] == "localhost"
                           or parts[0].startswith("[")):
        registry, parts = parts[0], parts[1:]
        if not _HOST.match(registry):
            raise _bad(text, f"bad registry {registry!r}")
        if registry in _HUB_ALIASES:
            registry = DOCKER_HUB
    if not parts or not all(_COMPONENT.match(p) for p in parts):
        raise _bad(text, "bad repository name")
    repository = "/".join(parts)
    if registry == DOCKER_HUB and len(parts) == 1:
        repository = f"library/{repository}"
    if len(repository) > 255:
        raise _bad(text, "the repository name is longer than 255 characters")
    if digest is None and tag is None:
        tag = "latest"
    return Reference(registry, repository, tag, digest)
