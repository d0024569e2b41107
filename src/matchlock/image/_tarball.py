"""Read a `docker save` or OCI image-layout tarball into a staging directory.

The outer tarball is streamed (stdin need not be seekable) once: every regular file is
spooled to a numbered file in the staging directory while its sha256 is computed, so member
names never become host paths. Then manifest.json (docker save) or index.json (OCI layout)
is followed to the image config and its layer blobs.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from matchlock.errors import MatchlockError, UsageError
from matchlock.image._platform import Platform, host_platform, listing, pick
from matchlock.image._tario import decompress_errors, iter_tar

_BLOB_RE = re.compile(r"^blobs/sha256/([0-9a-f]{64})$")
_MAX_JSON = 64 << 20
_CHUNK = 1 << 20

MT_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MT_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
_INDEX_TYPES = {MT_OCI_INDEX, MT_DOCKER_LIST}


class TarballError(MatchlockError):
    pass


@dataclass
class Staged:
    path: Path
    size: int
    sha256: str  # hex


@dataclass
class ResolvedImage:
    config: bytes
    layers: list[Staged]


def _corrupt(msg: str) -> TarballError:
    return TarballError(f"corrupt image tarball: {msg}")


def _norm(name: str) -> str | None:
    n = posixpath.normpath("/" + name.lstrip("/"))
    n = n.lstrip("/")
    return n or None


class StagedTarball:
    def __init__(self, label: str):
        self.label = label
        self.files: dict[str, Staged] = {}
        self.links: dict[str, str] = {}

    def bad(self, reason: str) -> TarballError:
        return TarballError(f"{self.label} is not a docker-save or OCI-layout tarball: {reason}")

    # ---- reading ---------------------------------------------------------------------

    def read(self, stream: BinaryIO, staging: Path, progress: Callable[[str], None]) -> None:
        total = 0
        next_report = 256 << 20
        n = 0
        try:
            for tf, m in iter_tar(stream, self.label):
                name = _norm(m.name)
                if name is None:
                    continue
                if m.issym():
                    target = m.linkname
                    if not target.startswith("/"):
                        target = posixpath.join(posixpath.dirname(name), target)
                    t = _norm(target)
                    if t:
                        self.links[name] = t
                    continue
                if m.islnk():
                    t = _norm(m.linkname)
                    if t and t in self.files:
                        self.files[name] = self.files[t]
                    continue
                if not m.isreg():
                    continue
                src = tf.extractfile(m)
                assert src is not None
                n += 1
                path = staging / f"f{n}"
                h = hashlib.sha256()
                size = 0
                with open(path, "wb") as out:
                    while True:
                        chunk = src.read(_CHUNK)
                        if not chunk:
                            break
                        h.update(chunk)
                        out.write(chunk)
                        size += len(chunk)
                        total += len(chunk)
                        if total >= next_report:
                            progress(f"reading image tarball: {total / 1e6:.0f} MB")
                            next_report += 256 << 20
                if size != m.size:
                    raise EOFError("unexpected end of data")
                hexd = h.hexdigest()
                mm = _BLOB_RE.match(name)
                if mm and mm.group(1) != hexd:
                    raise _corrupt(f"blob sha256:{mm.group(1)} digest mismatch")
                self.files[name] = Staged(path, size, hexd)
        except TarballError:
            raise
        except (*decompress_errors(), OSError) as e:
            if isinstance(e, OSError) and e.errno is not None:
                raise MatchlockError(
                    f"cannot spool image tarball: {e.strerror}: {e.filename or ''}"
                ) from None
            reason = str(e) or type(e).__name__
            raise self.bad(reason) from None
        if not self.files:
            raise self.bad("it contains no files")
        progress(f"read image tarball: {total / 1e6:.1f} MB in {len(self.files)} files")

    # ---- lookups ---------------------------------------------------------------------

    def lookup(self, name: str) -> Staged:
        n = _norm(name)
        for _ in range(40):
            if n is None:
                break
            if n in self.files:
                return self.files[n]
            if n not in self.links:
                break
            n = self.links[n]
        raise _corrupt(f"{name!r} is missing")

    def blob(self, desc: object, what: str) -> Staged:
        if not isinstance(desc, dict) or not isinstance(desc.get("digest"), str):
            raise _corrupt(f"{what} descriptor has no digest")
        digest: str = desc["digest"]
        alg, _, hexd = digest.partition(":")
        if alg != "sha256" or not re.fullmatch(r"[0-9a-f]{64}", hexd):
            raise _corrupt(f"{what} has unsupported digest {digest!r}")
        try:
            st = self.lookup(f"blobs/sha256/{hexd}")
        except TarballError:
            raise _corrupt(f"{what} blob {digest} is missing") from None
        if st.sha256 != hexd:
            raise _corrupt(f"blob {digest} digest mismatch")
        size = desc.get("size")
        if isinstance(size, int) and size != st.size:
            raise _corrupt(f"blob {digest} size mismatch ({st.size} bytes, expected {size})")
        return st

    def json(self, st: Staged, what: str) -> object:
        if st.size > _MAX_JSON:
            raise _corrupt(f"{what} is too large")
        try:
            return json.loads(st.path.read_bytes())
        except ValueError as e:
            raise _corrupt(f"{what} is not valid JSON: {e}") from None

    # ---- resolution ------------------------------------------------------------------

    def resolve(self, name: str) -> ResolvedImage:
        if "manifest.json" in self.files:
            return self._docker_save(name)
        if "index.json" in self.files:
            return self._oci()
        raise self.bad("it has neither manifest.json nor index.json")

    def _docker_save(self, name: str) -> ResolvedImage:
        manifest = self.json(self.files["manifest.json"], "manifest.json")
        if not isinstance(manifest, list) or not manifest:
            raise _corrupt("manifest.json is not a non-empty list")
        entries = [e for e in manifest if isinstance(e, dict)]
        if len(entries) != len(manifest):
            raise _corrupt("manifest.json has entries that are not objects")
        entry = entries[0]
        if len(entries) > 1:
            matching = [e for e in entries if name in (e.get("RepoTags") or [])]
            if not matching:
                tags = sorted({t for e in entries for t in (e.get("RepoTags") or [])})
                raise UsageError(
                    f"the tarball holds {len(entries)} images ({', '.join(tags) or 'untagged'});"
                    " import it under one of their tags or save a single image"
                )
            entry = matching[0]
        cfg_name = entry.get("Config")
        layers = entry.get("Layers")
        if not isinstance(cfg_name, str) or not isinstance(layers, list):
            raise _corrupt("manifest.json entry lacks Config or Layers")
        if not all(isinstance(x, str) for x in layers):
            raise _corrupt("manifest.json Layers must be file names")
        config = self.lookup(cfg_name)
        self._check_config(config, cfg_name)
        return ResolvedImage(config.path.read_bytes(), [self.lookup(x) for x in layers])

    def _check_config(self, config: Staged, what: str) -> None:
        cfg = self.json(config, what)
        if not isinstance(cfg, dict):
            raise _corrupt(f"image config {what} is not an object")
        inner = cfg.get("config")
        if inner is not None and not isinstance(inner, dict):
            raise _corrupt(f'image config {what}: "config" is not an object')

    def _oci(self) -> ResolvedImage:
        index = self.json(self.files["index.json"], "index.json")
        manifest = self._pick_manifest(index, "index.json", depth=0)
        if not isinstance(manifest.get("config"), dict):
            raise _corrupt("image manifest has no config descriptor")
        config = self.blob(manifest["config"], "config")
        self._check_config(config, "config blob sha256:" + config.sha256)
        layers = manifest.get("layers")
        if not isinstance(layers, list):
            raise _corrupt("image manifest has no layers list")
        staged = [self.blob(d, f"layer {i}") for i, d in enumerate(layers, 1)]
        return ResolvedImage(config.path.read_bytes(), staged)

    def _pick_manifest(self, index: object, what: str, depth: int) -> dict:
        if depth > 4:
            raise _corrupt("image indexes nest too deeply")
        if not isinstance(index, dict):
            raise _corrupt(f"{what} is not an object")
        if "layers" in index and "config" in index:
            return index  # already an image manifest
        manifests = index.get("manifests")
        if not isinstance(manifests, list) or not manifests:
            raise _corrupt(f"{what} lists no manifests")
        descs = [d for d in manifests if isinstance(d, dict)]
        chosen = _pick_platform(descs)
        if chosen is None:
            want = host_platform()
            raise TarballError(
                f"the tarball has no {want} image (found: {listing(descs)}); "
                f"save or pull it for {want}"
            )
        st = self.blob(chosen, "manifest")
        sub = self.json(st, f"manifest {chosen['digest']}")
        mt = chosen.get("mediaType") or (sub.get("mediaType") if isinstance(sub, dict) else None)
        if mt in _INDEX_TYPES or (isinstance(sub, dict) and "manifests" in sub):
            return self._pick_manifest(sub, f"index {chosen['digest']}", depth + 1)
        if not isinstance(sub, dict):
            raise _corrupt(f"manifest {chosen['digest']} is not an object")
        return sub


def _pick_platform(descs: list[dict]) -> dict | None:
    chosen = pick(descs, host_platform())
    if chosen is not None:
        return chosen
    unspecified = [d for d in descs if Platform.of(d) is None]
    return unspecified[0] if unspecified else None
