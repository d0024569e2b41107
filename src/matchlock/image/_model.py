"""Public value types: an image's runtime config and a stored image."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


def _strs(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (list, tuple)):
        return tuple(str(v) for v in value if v is not None)
    return ()


@dataclass(frozen=True, slots=True)
class ImageConfig:
    """The parts of an OCI image config that decide how a command is run."""

    env: tuple[str, ...] = ()  # "K=V"
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    working_dir: str = ""
    user: str = ""
    exposed_ports: tuple[str, ...] = ()  # "80/tcp": documentation, as in docker (no -P)

    @classmethod
    def from_oci(cls, cfg: dict) -> ImageConfig:
        """Build from the "config" object of an OCI/docker image config JSON."""
        if not isinstance(cfg, dict):
            return cls()
        return cls(
            env=_strs(cfg.get("Env")),
            entrypoint=_strs(cfg.get("Entrypoint")),
            cmd=_strs(cfg.get("Cmd")),
            working_dir=str(cfg.get("WorkingDir") or ""),
            user=str(cfg.get("User") or ""),
            exposed_ports=tuple(sorted(str(p) for p in cfg.get("ExposedPorts") or {}))
            if isinstance(cfg.get("ExposedPorts"), dict) else (),
        )


@dataclass(frozen=True, slots=True)
class Image:
    name: str  # normalised tag, e.g. "debian:test"
    id: str  # "sha256:<hex>" of the image config blob
    disk: Path  # read-only ext4 root filesystem image, shared by all VMs of this image
    config: ImageConfig
    size: int  # bytes allocated by the disk file
    created: str  # ISO-8601 UTC, when the image was added to the store
    source: str  # "import" | "builtin" | "registry" | "tag"
    digest: str = ""  # manifest digest a registry image was pulled by ("" otherwise)
    platform: str = ""  # "linux/amd64" when known
    # Held while this object lives: a shared flock on `disk`, so that `image rm`/`gc` keep
    # the file until the VM that booted from it has stopped.
    lease: object = field(default=None, compare=False, repr=False)
