"""The build engine behind a narrow interface: what runs inside the builder VM.

An engine turns a `BuildSpec` into shell commands for the builder VM: prepare its
storage, list the images it holds, load an OCI archive under a name, build, export the
result as an OCI archive. `Buildah` is the one engine today (Debian packages it);
BuildKit would be a second implementation of the same five methods.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from typing import Protocol

WORK = "/run/matchlock-build"  # tmpfs in the guest: context, Dockerfile
CONTEXT = f"{WORK}/context"
DOCKERFILE_DIR = f"{WORK}/dockerfile"


@dataclass(frozen=True, slots=True)
class BuildSpec:
    dockerfile_name: str  # under DOCKERFILE_DIR
    build_args: tuple[tuple[str, str], ...] = ()
    target: str = ""
    no_cache: bool = False
    secrets: tuple[str, ...] = ()  # ids; env vars of that name hold the placeholders
    ca_bundle: str = ""  # the VM's trust store, mounted into RUN steps when set
    layers: bool = True  # cache intermediate layers (what makes a rebuild fast)
    extra: tuple[str, ...] = field(default_factory=tuple)


class Engine(Protocol):
    name: str

    def prepare(self, storage: str) -> str:
        """Shell: make the engine's storage and configuration ready."""

    def list_images(self) -> str:
        """Shell: print `ID NAME` lines of the images in the engine's storage."""

    def load(self, archive: str, name: str) -> str:
        """Shell: load the OCI archive at `archive` and name it `name`."""

    def build(self, spec: BuildSpec, out_ref: str) -> str:
        """Shell: build CONTEXT with the Dockerfile into image `out_ref`."""

    def export(self, out_ref: str, archive: str) -> str:
        """Shell: write image `out_ref` to `archive` as an OCI archive."""


REGISTRIES_CONF = """\
# Written by matchlock: short names mean Docker Hub (as in `matchlock pull`); the host
# loads every base image into storage first, so nothing is pulled from inside the VM.
unqualified-search-registries = ["docker.io"]
short-name-mode = "permissive"
"""


class Buildah:
    name = "buildah"

    def __init__(self) -> None:
        self._storage = "/var/lib/containers/storage"

    def _global(self) -> str:
        # overlay on the ext4 storage disk; chroot isolation: RUN steps need no OCI
        # runtime or cgroups, and share the VM's (sealed) network.
        return (f"--root {shlex.quote(self._storage)} --runroot /run/containers/storage "
                "--storage-driver overlay")

    def prepare(self, storage: str) -> str:
        self._storage = storage
        conf = "/etc/containers/registries.conf.d/zz-matchlock.conf"
        return (f"mkdir -p {shlex.quote(storage)} {WORK} && "
                f"printf %s {shlex.quote(REGISTRIES_CONF)} > {conf}")

    def list_images(self) -> str:
        return (f"buildah {self._global()} images --no-trunc --format "
                "'{{.ID}} {{.Name}}:{{.Tag}}'")

    def load(self, archive: str, name: str) -> str:
        a, n = shlex.quote(archive), shlex.quote(name)
        return (f"id=$(buildah {self._global()} pull -q oci-archive:{a}) && "
                f"buildah {self._global()} tag \"$id\" {n} && rm -f {a}")

    def build(self, spec: BuildSpec, out_ref: str) -> str:
        args = ["buildah", *shlex.split(self._global()), "bud", "--isolation", "chroot",
                "--pull=never", "--format", "oci", "--network", "host",
                f"--layers={'true' if spec.layers else 'false'}",
                "-f", f"{DOCKERFILE_DIR}/{spec.dockerfile_name}", "-t", out_ref]
        if spec.no_cache:
            args.append("--no-cache")
        if spec.target:
            args += ["--target", spec.target]
        for k, v in spec.build_args:
            args += ["--build-arg", f"{k}={v}"]
        for sid in spec.secrets:
            # From buildah's environment, which holds the placeholder (the sandbox adds it
            # to every exec). Not src=<file>: Buildah 1.28 with chroot isolation mounts
            # file secrets empty.
            args += ["--secret", f"id={sid},env={sid}"]
        if spec.ca_bundle:
            # The sandbox CA (in the VM's bundle) reaches RUN steps as a read-only bind
            # mount: in force while they run, never part of a layer.
            args += ["-v", f"{spec.ca_bundle}:/etc/ssl/certs/ca-certificates.crt:ro"]
        args += [*spec.extra, CONTEXT]
        return " ".join(shlex.quote(a) for a in args)

    def export(self, out_ref: str, archive: str) -> str:
        return (f"buildah {self._global()} push -q {shlex.quote(out_ref)} "
                f"oci-archive:{shlex.quote(archive)}")
