"""Platforms (`linux/amd64`, `linux/arm64/v8`) and picking one from an image index."""

from __future__ import annotations

import os
from dataclasses import dataclass

from matchlock.errors import UsageError

_ARCH = {
    "x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64",
    "i386": "386", "i686": "386", "armv7l": "arm", "armv6l": "arm",
    "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64",
}  # fmt: skip
_DEFAULT_VARIANT = {"arm64": "v8"}
# Index entries that are not runnable images (buildx attestations, signatures).
_NOT_IMAGES = {"unknown"}


@dataclass(frozen=True, slots=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""

    def __str__(self) -> str:
        base = f"{self.os}/{self.architecture}"
        return f"{base}/{self.variant}" if self.variant else base

    @classmethod
    def parse(cls, text: str) -> Platform:
        parts = text.strip().lower().split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise UsageError(f"invalid platform {text!r}: use OS/ARCH[/VARIANT], e.g. linux/arm64")
        arch = _ARCH.get(parts[1], parts[1])
        return cls(parts[0], arch, parts[2] if len(parts) == 3 else "")

    @classmethod
    def of(cls, desc: object) -> Platform | None:
        """The platform of an index entry or image config, None when it names none."""
        if not isinstance(desc, dict):
            return None
        p = desc.get("platform", desc)
        if not isinstance(p, dict):
            return None
        os_, arch = p.get("os"), p.get("architecture")
        if not isinstance(os_, str) or not isinstance(arch, str) or not os_ or not arch:
            return None
        variant = p.get("variant")
        return cls(os_, arch, variant if isinstance(variant, str) else "")

    def matches(self, other: Platform) -> bool:
        """Whether an image for `other` runs where `self` is wanted."""
        if (self.os, self.architecture) != (other.os, other.architecture):
            return False
        if not self.variant:
            return True
        default = _DEFAULT_VARIANT.get(self.architecture)
        return other.variant == self.variant or (not other.variant and self.variant == default)


def host_platform() -> Platform:
    machine = os.uname().machine.lower()  # platform.machine(), without its import
    arch = _ARCH.get(machine, machine)
    return Platform("linux", arch)


def pick(descs: list[dict], want: Platform) -> dict | None:
    """The entry of an index (list of descriptors) for `want`; exact variants first."""
    found = []
    for d in descs:
        p = Platform.of(d)
        if p is None or p.os in _NOT_IMAGES or not want.matches(p):
            continue
        found.append((0 if p.variant == want.variant else 1, len(found), d))
    return min(found)[2] if found else None


def listing(descs: list[dict]) -> str:
    plats = sorted({str(p) for d in descs if (p := Platform.of(d)) and p.os not in _NOT_IMAGES})
    return ", ".join(plats) or "none"
