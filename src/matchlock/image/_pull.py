"""From a reference to verified bytes: manifest, platform choice, config, layer blobs.

`resolve` follows an index (OCI index or docker manifest list) to the manifest for the wanted
platform and fetches the image config; `fetch_layers` downloads the missing layer blobs in
parallel into a staging directory. Everything here is checked against the digest it was
asked for; nothing here writes to the store.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import re
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from matchlock.errors import MatchlockError, NotFoundError, RegistryError
from matchlock.image._media import INDEX_TYPES, MAX_CONFIG, verify_digest
from matchlock.image._platform import Platform, host_platform, listing, pick
from matchlock.image._reference import Reference

if TYPE_CHECKING:  # httpx is imported only when something is really pulled
    from matchlock.image._registry import RegistryClient

PARALLEL_DOWNLOADS = 3
MAX_LAYERS = 128
PULL_TIMEOUT_S = 600.0
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_CONFIG_TYPES = {
    "application/vnd.docker.container.image.v1+json",
    "application/vnd.oci.image.config.v1+json",
}
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class LayerDesc:
    digest: str  # of the blob as stored by the registry (usually compressed)
    size: int
    media_type: str
    diff_id: str | None  # sha256 of the uncompressed tar, from the image config


@dataclass(frozen=True, slots=True)
class Resolved:
    manifest_digest: str  # what `pull REPO@DIGEST` of the manifest (or index) would name
    config: bytes
    config_digest: str
    layers: tuple[LayerDesc, ...]
    platform: Platform | None


class PullProgress:
    """What a pull reports; this base reports nothing. Methods run in the pulling thread."""

    def start(self, name: str, layers: list[tuple[str, int, bool]]) -> None:
        """Layers of the image as (digest, size, already in the store)."""

    def advance(self, digest: str, n: int) -> None:
        """`n` more bytes of a layer arrived (negative: a retry started it over)."""

    def layer_done(self, digest: str) -> None:
        pass

    def message(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


class LineProgress(PullProgress):
    """One plain line per event, through a `str -> None` callback."""

    def __init__(self, emit: Callable[[str], None]):
        self.emit = emit
        self.sizes: dict[str, int] = {}

    def start(self, name: str, layers: list[tuple[str, int, bool]]) -> None:
        todo = [(d, s) for d, s, have in layers if not have]
        self.sizes = dict(todo)
        mb = sum(s for _, s in todo) / 1e6
        have = len(layers) - len(todo)
        extra = f", {have} already present" if have else ""
        self.emit(f"pulling {name}: {len(todo)} layer(s), {mb:.1f} MB to download{extra}")

    def layer_done(self, digest: str) -> None:
        self.emit(f"{digest[:19]}: downloaded {self.sizes.get(digest, 0) / 1e6:.1f} MB")

    def message(self, text: str) -> None:
        self.emit(text)


def run_sync(factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to completion from synchronous code, even under a running loop
    (then in a worker thread: the caller's loop must not be blocked by our own)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(factory())
    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        return ex.submit(lambda: asyncio.run(factory())).result()


def _json(body: bytes, what: str, registry: str) -> dict:
    try:
        doc = json.loads(body)
    except ValueError:
        raise RegistryError(f"{what} from {registry} is not valid JSON") from None
    if not isinstance(doc, dict):
        raise RegistryError(f"{what} from {registry} is not a JSON object")
    return doc


def _check_desc(d: object, what: str, registry: str) -> dict:
    if not isinstance(d, dict) or not isinstance(d.get("digest"), str) \
            or not _DIGEST.match(d["digest"]):
        raise RegistryError(f"{what} from {registry} has a descriptor without a sha256 digest")
    size = d.get("size")
    if size is not None and (not isinstance(size, int) or size < 0):
        raise RegistryError(f"{what} from {registry} has a descriptor with a bad size")
    return d


async def resolve(client: RegistryClient, ref: Reference, want: Platform | None) -> Resolved:
    """Find the image manifest and config for `want` (default: this host's platform)."""
    reg = client.registry
    target = want or host_platform()
    try:
        body, ctype = await client.manifest(ref.target)
    except NotFoundError:
        if ref.digest:
            raise NotFoundError(f"{ref.repository} has no manifest {ref.digest} on "
                                f"{reg}; check the digest") from None
        try:
            tags = await client.tags()
        except MatchlockError:
            tags = []  # listing may need rights we lack: keep the plain answer
        if tags is None:
            raise NotFoundError(f"repository {ref.repository} not found on {reg}; "
                                "check the name") from None
        known = f" (it has: {', '.join(sorted(tags)[:8])})" if tags else ""
        raise NotFoundError(f"{ref.repository} has no tag {ref.tag} on {reg}{known}; "
                            "check the tag") from None
    if ref.digest:
        verify_digest(body, ref.digest, f"manifest {ref.name}", reg)
    manifest_digest = "sha256:" + hashlib.sha256(body).hexdigest()
    doc = _json(body, f"manifest of {ref.name}", reg)
    chosen_platform: Platform | None = None
    for _depth in range(3):
        if doc.get("schemaVersion") == 1:
            raise RegistryError(
                f"{ref.name} on {reg} has a schema 1 manifest, which is not supported; "
                "push it again with a current docker, buildah or skopeo"
            )
        mt = doc.get("mediaType") or ctype
        if not (mt in INDEX_TYPES or ("manifests" in doc and "layers" not in doc)):
            break
        entries = doc.get("manifests")
        if not isinstance(entries, list):
            raise RegistryError(f"the index of {ref.name} on {reg} has no manifest list")
        descs = [d for d in entries if isinstance(d, dict)]
        chosen = pick(descs, target)
        if chosen is None:
            raise NotFoundError(
                f"{ref.name} has no {target} image on {reg} (it has: {listing(descs)}); "
                "pull one of those platforms"
            )
        _check_desc(chosen, f"index of {ref.name}", reg)
        chosen_platform = Platform.of(chosen)
        sub, ctype = await client.manifest(chosen["digest"])
        verify_digest(sub, chosen["digest"], f"manifest {chosen['digest']}", reg)
        doc = _json(sub, f"manifest {chosen['digest']}", reg)
    else:
        raise RegistryError(f"the indexes of {ref.name} on {reg} nest too deeply")

    config_desc = _check_desc(doc.get("config"), f"manifest of {ref.name}", reg)
    cmt = config_desc.get("mediaType")
    if cmt and cmt not in _CONFIG_TYPES:
        raise RegistryError(
            f"{ref.name} on {reg} is not a container image (its config is {cmt})"
        )
    raw_layers = doc.get("layers")
    if not isinstance(raw_layers, list):
        raise RegistryError(f"the manifest of {ref.name} on {reg} has no layer list")
    if len(raw_layers) > MAX_LAYERS:
        raise RegistryError(f"{ref.name} has {len(raw_layers)} layers; at most {MAX_LAYERS} "
                            "are supported")
    config = await client.blob_bytes(
        config_desc["digest"], MAX_CONFIG, f"image config {config_desc['digest']}"
    )
    cfg = _json(config, f"image config of {ref.name}", reg)
    if cfg.get("config") is not None and not isinstance(cfg.get("config"), dict):
        raise RegistryError(f'the image config of {ref.name} on {reg}: "config" is not an object')
    # The index entry is the more precise (it carries the variant); else the config's.
    image_platform = chosen_platform or Platform.of(cfg)
    if want is not None and image_platform is not None and not want.matches(image_platform):
        raise NotFoundError(
            f"{ref.name} on {reg} is a {image_platform} image, not {want}"
        )
    diff_ids = (cfg.get("rootfs") or {}).get("diff_ids") if isinstance(
        cfg.get("rootfs"), dict) else None
    if not isinstance(diff_ids, list) or len(diff_ids) != len(raw_layers):
        diff_ids = [None] * len(raw_layers)
    layers = []
    for i, d in enumerate(raw_layers):
        d = _check_desc(d, f"manifest of {ref.name}", reg)
        mt = str(d.get("mediaType") or "")
        if mt and "tar" not in mt:
            raise RegistryError(
                f"layer {i + 1} of {ref.name} has media type {mt}, not a filesystem layer"
            )
        did = diff_ids[i] if isinstance(diff_ids[i], str) and _DIGEST.match(diff_ids[i]) \
            else None
        layers.append(LayerDesc(d["digest"], int(d.get("size") or 0) if "size" in d else -1,
                                mt, did))
    return Resolved(manifest_digest, config, config_desc["digest"], tuple(layers),
                    image_platform)


def _first_error(eg: BaseExceptionGroup) -> BaseException:
    for e in eg.exceptions:
        if isinstance(e, BaseExceptionGroup):
            return _first_error(e)
        if not isinstance(e, asyncio.CancelledError):
            return e
    return eg.exceptions[0]


async def fetch_layers(
    client: RegistryClient, layers: list[LayerDesc], work: Path, progress: PullProgress,
    parallel: int = PARALLEL_DOWNLOADS,
) -> dict[str, Path]:
    """Download `layers` (distinct digests) into `work`; returns digest -> file."""
    sem = asyncio.Semaphore(parallel)
    out: dict[str, Path] = {}

    async def one(layer: LayerDesc) -> None:
        async with sem:
            dest = work / f"blob-{layer.digest.removeprefix('sha256:')}"
            await client.download(
                layer.digest, layer.size if layer.size >= 0 else None, dest,
                lambda n: progress.advance(layer.digest, n),
            )
            out[layer.digest] = dest
            progress.layer_done(layer.digest)

    try:
        async with asyncio.TaskGroup() as tg:
            for layer in layers:
                tg.create_task(one(layer))
    except BaseExceptionGroup as eg:
        raise _first_error(eg) from None  # one error, as if the downloads were one call
    return out


async def with_deadline(aw: Awaitable[T], what: str, seconds: float = PULL_TIMEOUT_S) -> T:
    try:
        async with asyncio.timeout(seconds):
            return await aw
    except TimeoutError:
        raise RegistryError(f"{what} did not finish within {seconds / 60:.0f} minutes; "
                            "check the network and retry") from None

