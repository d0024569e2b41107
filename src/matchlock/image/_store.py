"""The image store: content-addressed layer blobs, one shared ext4 disk per image id, and
SQLite metadata. Images arrive by tarball import, by registry pull, or built in.

Layout under the root (default `images_dir()`):

    images.db                 names -> image id, config, disk; layers per image id
    blobs/sha256/<hex>        layer blobs as given (compressed or not), stored once
    disks/<id-hex>.ext4       read-only (0444) root disk, shared by all names of an image id
    tmp/<work>/               staging for an import or pull in progress (`.lock` held by its
                              process); removed when it ends, swept once its owner is gone
    locks/<hash>.lock         one per image name: pulls of one name run one at a time
    .lock, builtin.lock       flock(2) locks

An import or pull never touches blobs/, disks/ or the database until its disk is built:
then, under the store lock, staged blobs and the disk are renamed into place and the rows
inserted. A failed or killed one leaves nothing registered. Blobs already in the store are
hard-linked into the staging directory first, so a concurrent `rm`/`gc` cannot pull them
away mid-build. A process using a disk holds a shared flock on it (`Image.lease`); `rm` and
`gc` delete a disk only when they can lock it exclusively, and otherwise leave it for a
later `gc`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from matchlock._log import get_logger
from matchlock.errors import MatchlockError, NotFoundError, UnreachableError, UsageError
from matchlock.image import _builtin, _disk
from matchlock.image._model import Image, ImageConfig
from matchlock.image._names import normalize_name
from matchlock.image._platform import Platform
from matchlock.image._reference import Reference, parse_reference
from matchlock.paths import images_dir

if TYPE_CHECKING:
    # The pull machinery (registry client, layer fetch, tarball staging) loads when an
    # image is pulled, imported or rebuilt: booting a stored image needs none of it.
    from matchlock.image._pull import LayerDesc, PullProgress, Resolved
    from matchlock.image._tarball import Staged

    LayerList = list[tuple[Staged, str, str | None]]  # (blob, label, diff_id)


log = get_logger(__name__)

BUILTIN_IMAGE = "matchlock/busybox:latest"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    name TEXT PRIMARY KEY,
    id TEXT NOT NULL,
    disk TEXT NOT NULL,
    config_json TEXT NOT NULL,
    size INTEGER NOT NULL,
    created TEXT NOT NULL,
    source TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS images_id ON images(id);
CREATE TABLE IF NOT EXISTS layers (
    image_id TEXT NOT NULL,
    ordinal INTEGER NOT NULL,
    digest TEXT NOT NULL,
    PRIMARY KEY (image_id, ordinal)
);
CREATE INDEX IF NOT EXISTS layers_digest ON layers(digest);
"""
# Columns added after the first schema (ALTER TABLE on open when missing).
_EXTRA_COLUMNS = {"digest": "TEXT NOT NULL DEFAULT ''", "platform": "TEXT NOT NULL DEFAULT ''"}
_STALE_TMP_S = 24 * 3600

Progress = Callable[[str], None]


def _noop(_msg: str) -> None:
    pass


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _stream_label(stream: object) -> str:
    name = getattr(stream, "name", None)
    return name if isinstance(name, str) and name else "the input"


@contextlib.contextmanager
def _flock(path: Path, mode: int = fcntl.LOCK_EX) -> Iterator[int]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, mode)
        yield fd
    finally:
        os.close(fd)


class _Lease:
    """A shared flock on a disk file, released when closed or garbage-collected."""

    __slots__ = ("fd",)

    def __init__(self, fd: int):
        self.fd = fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        self.close()


def _lease(disk: Path) -> _Lease:
    """Open and share-lock `disk`; FileNotFoundError if it is (being) removed."""
    fd = os.open(disk, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        # An `rm` may have unlinked the path between our open and our lock.
        if os.fstat(fd).st_ino != os.stat(disk).st_ino:
            raise FileNotFoundError(errno.ENOENT, "disk replaced", str(disk))
    except BaseException:
        os.close(fd)
        raise
    return _Lease(fd)


def _try_unlink_disk(path: Path) -> bool:
    """Delete a disk unless a process holds a lease on it; True if it is gone."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return True
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("disk %s is in use; a later `image gc` removes it", path.name)
            return False
        # Unlinked while we hold the exclusive lock: no new lease can slip in between.
        path.unlink(missing_ok=True)
        return True
    finally:
        os.close(fd)


@dataclass
class PullResult:
    image: Image
    cached: bool  # nothing was fetched: the name was in the store already
    built: bool = False  # a root disk was built
    downloaded: int = 0  # layer bytes fetched
    layers: int = 0
    reused_layers: int = 0
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class GcResult:
    blobs: int = 0
    disks: int = 0
    staging: int = 0
    kept_in_use: int = 0
    freed: int = 0  # bytes


class ImageStore:
    def __init__(self, root: Path | None = None, *, registry: dict | None = None):
        self.root = (Path(root) if root is not None else images_dir()).absolute()
        # Extra RegistryClient arguments (credentials=, transport=, backoff_s=): for tests.
        self._registry_kw = dict(registry or {})
        self._schema_ok = False

    # ---- plumbing ------------------------------------------------------------------

    @property
    def _blobs(self) -> Path:
        return self.root / "blobs" / "sha256"

    @property
    def _disks(self) -> Path:
        return self.root / "disks"

    @property
    def _tmp(self) -> Path:
        return self.root / "tmp"

    def _ensure_dirs(self) -> None:
        try:
            for d in (self._blobs, self._disks, self._tmp, self.root / "locks"):
                d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise MatchlockError(
                f"cannot create the image store at {self.root}: {e.strerror or e}; make it "
                "writable or point MATCHLOCK_IMAGES_DIR elsewhere"
            ) from None

    def _connect(self) -> sqlite3.Connection:
        self.root.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.root / "images.db", timeout=30, isolation_level=None)
        conn.execute("PRAGMA busy_timeout=30000")
        if not self._schema_ok:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(_SCHEMA)
            have = {r[1] for r in conn.execute("PRAGMA table_info(images)")}
            for col, decl in _EXTRA_COLUMNS.items():
                if col not in have:
                    with contextlib.suppress(sqlite3.OperationalError):  # a racer won
                        conn.execute(f"ALTER TABLE images ADD COLUMN {col} {decl}")
            self._schema_ok = True
        conn.row_factory = sqlite3.Row
        return conn

    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        conn = self._connect()
        try:
            yield conn
        finally:
            conn.close()

    def _lock(self) -> contextlib.AbstractContextManager[int]:
        self.root.mkdir(parents=True, exist_ok=True)
        return _flock(self.root / ".lock")

    def _name_lock(self, name: str) -> contextlib.AbstractContextManager[int]:
        self._ensure_dirs()
        key = hashlib.sha256(name.encode()).hexdigest()[:32]
        return _flock(self.root / "locks" / f"{key}.lock")

    def _disk_rel(self, image_id: str) -> str:
        return f"disks/{image_id.removeprefix('sha256:')}.ext4"

    def _image(self, row: sqlite3.Row, lease: object = None) -> Image:
        try:
            cfg = json.loads(row["config_json"])
        except ValueError:
            cfg = {}
        inner = cfg.get("config") if isinstance(cfg, dict) else None
        keys = row.keys()
        return Image(
            name=row["name"],
            id=row["id"],
            disk=self.root / row["disk"],
            config=ImageConfig.from_oci(inner or {}),
            size=int(row["size"]),
            created=row["created"],
            source=row["source"],
            digest=row["digest"] if "digest" in keys else "",
            platform=row["platform"] if "platform" in keys else "",
            lease=lease,
        )

    def _row(self, name: str) -> sqlite3.Row | None:
        if not (self.root / "images.db").exists():
            return None
        with self._db() as conn:
            return conn.execute("SELECT * FROM images WHERE name=?", (name,)).fetchone()

    @contextlib.contextmanager
    def _workdir(self) -> Iterator[Path]:
        self._ensure_dirs()
        self._sweep_tmp()
        import tempfile  # not at the top: `run` starts without it

        work = Path(tempfile.mkdtemp(prefix="work-", dir=self._tmp))
        # Held for as long as we live: the sweep of another process can tell we are alive.
        fd = os.open(work / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield work
        finally:
            _disk.remove_unpack_dir(work)
            _disk.rmtree_any(work)
            os.close(fd)

    def _sweep_tmp(self) -> int:
        """Remove staging dirs of processes that are gone; returns how many."""
        removed = 0
        cutoff = time.time() - _STALE_TMP_S
        try:
            entries = list(os.scandir(self._tmp))
        except FileNotFoundError:
            return 0
        for e in entries:
            work = Path(e.path)
            try:
                fd = os.open(work / ".lock", os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                # No lock (an old layout, or just being created): go by age.
                with contextlib.suppress(OSError):
                    if e.stat(follow_symlinks=False).st_mtime < cutoff:
                        _disk.remove_unpack_dir(work)
                        _disk.rmtree_any(work)
                        removed += 1
                continue
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its owner is alive
            finally:
                os.close(fd)
            _disk.remove_unpack_dir(work)
            _disk.rmtree_any(work)
            removed += 1
        return removed

    # ---- public API ----------------------------------------------------------------

    def get(self, name: str) -> Image:
        """The stored image `name`; NotFoundError if absent."""
        norm = normalize_name(name)
        row = self._row(norm)
        if row is None:
            raise NotFoundError(
                f"image '{norm}' not found; import it with "
                f"`matchlock image import {norm} < image.tar`"
            )
        img = self._image(row)
        if not img.disk.exists():
            raise NotFoundError(
                f"image '{norm}' has lost its disk {img.disk}; rebuild it with "
                f"`matchlock build {norm}`, or pull or re-import it"
            )
        return img

    def lease(self, img: Image) -> Image:
        """`img` holding a shared lock on its disk for as long as the returned object
        lives (or until `lease.close()`): `rm` and `gc` then leave the disk in place."""
        try:
            return dataclasses.replace(img, lease=_lease(img.disk))
        except FileNotFoundError:
            raise NotFoundError(
                f"image '{img.name}' was removed while starting; pull or import it again"
            ) from None

    def list(self) -> list[Image]:
        if not (self.root / "images.db").exists():
            return []
        with self._db() as conn:
            rows = conn.execute("SELECT * FROM images ORDER BY name").fetchall()
        images = [self._image(r) for r in rows]
        # Local names (imports, tags, built in) first, then what came from registries.
        return sorted(images, key=lambda i: (i.source == "registry", i.name))

    def remove(self, name: str) -> None:
        norm = normalize_name(name)
        with self._lock(), self._db() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                row = conn.execute("SELECT id FROM images WHERE name=?", (norm,)).fetchone()
                if row is None:
                    raise NotFoundError(
                        f"image '{norm}' not found; `matchlock image ls` lists images"
                    )
                conn.execute("DELETE FROM images WHERE name=?", (norm,))
                doomed = self._unreference(conn, row["id"])
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            for p in doomed:  # still under the lock: an import may be about to reuse them
                _discard(p)

    def tag(self, name: str, new_name: str) -> Image:
        """Give the stored image `name` a second name (source "tag")."""
        src = normalize_name(name)
        dst = parse_reference(new_name)
        if dst.digest:
            raise UsageError(f"a tag cannot contain a digest: {new_name!r}")
        with self._lock(), self._db() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                row = conn.execute("SELECT * FROM images WHERE name=?", (src,)).fetchone()
                if row is None:
                    raise NotFoundError(f"image '{src}' not found")
                old = conn.execute("SELECT id FROM images WHERE name=?", (dst.name,)).fetchone()
                conn.execute(
                    "INSERT OR REPLACE INTO images (name, id, disk, config_json, size, created,"
                    " source, digest, platform) VALUES (?, ?, ?, ?, ?, ?, 'tag', ?, ?)",
                    (dst.name, row["id"], row["disk"], row["config_json"], row["size"], _now(),
                     row["digest"], row["platform"]),
                )  # fmt: skip
                doomed = []
                if old is not None and old["id"] != row["id"]:
                    doomed = self._unreference(conn, old["id"])
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            for p in doomed:
                _discard(p)
        return self.get(dst.name)

    def import_tar(self, name: str, stream: BinaryIO, progress: Progress | None = None) -> Image:
        from matchlock.image._tarball import StagedTarball

        progress = progress or _noop
        ref = parse_reference(name)
        if ref.digest:
            raise UsageError(
                f"import {name!r} under a tag, not a digest (e.g. `{ref.familiar_repo}:v1`)"
            )
        norm = ref.name
        _disk.require_mke2fs()
        _disk.require_fakeroot()
        t0 = time.monotonic()
        with self._workdir() as work:
            src = StagedTarball(_stream_label(stream))
            src.read(stream, work, progress)
            resolved = src.resolve(norm)
            image_id = "sha256:" + hashlib.sha256(resolved.config).hexdigest()
            diff_ids = _diff_ids(resolved.config, len(resolved.layers))
            layers = [(st, f"layer sha256:{st.sha256[:12]}", did)
                      for st, did in zip(resolved.layers, diff_ids, strict=True)]
            img, _ = self._install(work, norm, image_id, resolved.config, layers, "import",
                                   progress, platform=_platform_of(resolved.config))
        progress(f"imported {norm} ({image_id[:19]}) in {time.monotonic() - t0:.1f}s")
        return img

    def ensure_builtin(self, name: str = "matchlock/busybox") -> Image:
        norm = normalize_name(name)
        busybox = _builtin.find_busybox()
        config = _builtin.config_blob(busybox)
        image_id = "sha256:" + hashlib.sha256(config).hexdigest()
        cached = self._cached(norm, image_id)
        if cached is not None:
            return cached
        _disk.require_mke2fs()
        _disk.require_fakeroot()
        self._ensure_dirs()
        with _flock(self.root / "builtin.lock"):
            cached = self._cached(norm, image_id)
            if cached is not None:
                return cached
            from matchlock.image._tarball import Staged

            with self._workdir() as work:
                blob = work / "layer.tar"
                _builtin.write_layer(busybox, blob)
                st = Staged(blob, blob.stat().st_size, _disk.sha256_file(blob))
                img, _ = self._install(
                    work, norm, image_id, config, [(st, "busybox layer", None)], "builtin",
                    _noop,
                )
                return img

    # ---- registry ------------------------------------------------------------------

    def resolve(self, name: str, *, pull: bool = False,
                progress: PullProgress | Progress | None = None) -> Image:
        """The image to boot: from the store, pulled from its registry when it is not
        there (or always, with `pull`). A stored image never touches the network.
        The image holds a lease on its disk (see `lease`) for as long as it lives."""
        norm = normalize_name(name)
        if norm == BUILTIN_IMAGE:
            return self.lease(self.ensure_builtin())
        if not pull:
            row = self._row(norm)
            if row is not None:
                img = self._image(row)
                if img.disk.exists():
                    return self.lease(img)
                return self.lease(self.build(norm, progress=progress).image)
        return self.lease(self.pull(name, force=pull, progress=progress).image)

    def pull(
        self,
        reference: str,
        *,
        force: bool = False,
        platform: str | None = None,
        progress: PullProgress | Progress | None = None,
    ) -> PullResult:
        """Fetch `reference` from its registry and build its root disk.

        Without `force` a name already in the store is returned as it is (no network).
        With it the registry is asked again; layers and disks already stored are reused."""
        ref = parse_reference(reference)
        want = Platform.parse(platform) if platform else None
        prog = _as_progress(progress)
        name = ref.name
        if not force:
            hit = self._cached_pull(name, want)
            if hit is not None:
                return PullResult(hit, cached=True)
        _disk.require_mke2fs()
        _disk.require_fakeroot()
        try:
            with self._name_lock(name):
                if not force:  # another process may have pulled it while we waited
                    hit = self._cached_pull(name, want)
                    if hit is not None:
                        return PullResult(hit, cached=True)
                return self._pull_locked(ref, want, prog)
        except (UnreachableError, NotFoundError) as e:
            raise type(e)(
                f"{e}, or import the image from a `docker save` tarball "
                f"(`matchlock image import {name} < image.tar`)"
            ) from None
        finally:
            prog.close()

    def _cached_pull(self, name: str, want: Platform | None) -> Image | None:
        row = self._row(name)
        if row is None:
            return None
        if want is not None and row["platform"] and not want.matches(
                Platform.parse(row["platform"])):
            return None
        try:
            return self.get(name)
        except NotFoundError:
            return None  # lost its disk: pull again

    def _pull_locked(self, ref: Reference, want: Platform | None,
                     prog: PullProgress) -> PullResult:
        from matchlock.image._pull import fetch_layers, resolve, run_sync, with_deadline
        from matchlock.image._tarball import Staged

        t0 = time.perf_counter()
        with self._workdir() as work:

            from matchlock.image._registry import RegistryClient

            async def fetch():  # noqa: ANN202
                client = RegistryClient(ref, **self._registry_kw)
                async with client:
                    resolved = await resolve(client, ref, want)
                    t_resolved = time.perf_counter()
                    image_id = resolved.config_digest
                    existing = self._link_existing(ref.name, image_id, resolved, prog)
                    if existing is not None:
                        return resolved, existing, {}, {}, client.stats, t_resolved
                    pinned: dict[str, Path] = {}
                    todo: list[LayerDesc] = []
                    for layer in resolved.layers:
                        if layer.digest in pinned or any(t.digest == layer.digest for t in todo):
                            continue
                        p = self._pin_blob(layer.digest, work)
                        if p is not None:
                            pinned[layer.digest] = p
                        else:
                            todo.append(layer)
                    prog.start(ref.name, [(la.digest, la.size, la.digest in pinned)
                                          for la in resolved.layers])
                    got = await fetch_layers(client, todo, work, prog)
                    return resolved, None, pinned, got, client.stats, t_resolved

            resolved, existing, pinned, got, stats, t_resolved = run_sync(
                lambda: with_deadline(fetch(), f"pulling {ref.name}")
            )
            t_fetched = time.perf_counter()
            timings = {"resolve_s": t_resolved - t0, "download_s": t_fetched - t_resolved,
                       "verify_s": stats.hash_s}
            if existing is not None:
                timings["total_s"] = time.perf_counter() - t0
                return PullResult(existing, cached=False, layers=len(resolved.layers),
                                  reused_layers=len(resolved.layers), timings=timings)
            files = {**pinned, **got}
            downloaded = sum(p.stat().st_size for p in got.values())
            layers: LayerList = []
            for la in resolved.layers:
                path = files[la.digest]
                hexd = la.digest.removeprefix("sha256:")
                layers.append((Staged(path, path.stat().st_size, hexd),
                               f"layer {la.digest[:19]}", la.diff_id))
            img, build = self._install(
                work, ref.name, resolved.config_digest, resolved.config, layers, "registry",
                prog.message, digest=resolved.manifest_digest,
                platform=str(resolved.platform or ""),
            )
        timings.update({k: v for k, v in build.items() if k.endswith("_s")})
        timings["total_s"] = time.perf_counter() - t0
        if build:
            prog.message(f"Built rootfs from {ref.name} ({img.size / 1e6:.1f} MB)")
        return PullResult(
            img, cached=False, built=bool(build),
            downloaded=downloaded,
            layers=len(resolved.layers), reused_layers=len(pinned), timings=timings,
        )

    def _link_existing(self, name: str, image_id: str, resolved: Resolved,
                       prog: PullProgress) -> Image | None:
        """If image `image_id` is stored (disk and layer rows), name it `name` at once."""
        disk_rel = self._disk_rel(image_id)
        with self._lock(), self._db() as conn:
            if not (self.root / disk_rel).exists():
                return None
            if not conn.execute("SELECT 1 FROM layers WHERE image_id=?", (image_id,)).fetchone():
                return None
            conn.execute("BEGIN IMMEDIATE")
            try:
                old_doomed = self._upsert(
                    conn, name, image_id, disk_rel, resolved.config, "registry",
                    resolved.manifest_digest, str(resolved.platform or ""),
                )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            for p in old_doomed:
                _discard(p)
        prog.message(f"{name}: image {image_id[:19]} is already stored")
        return self.get(name)

    def _pin_blob(self, digest: str, work: Path) -> Path | None:
        """Hard-link a stored blob into `work` (so rm/gc cannot take it from us)."""
        src = self._blobs / digest.removeprefix("sha256:")
        dst = work / f"have-{digest.removeprefix('sha256:')}"
        try:
            os.link(src, dst)
        except FileNotFoundError:
            return None
        except OSError as e:  # e.g. EXDEV, EMLINK: fall back to downloading it
            log.debug("cannot link %s: %s", src, e)
            return None
        return dst

    def build(self, reference: str, *, progress: PullProgress | Progress | None = None
              ) -> PullResult:
        """Make sure `reference` has its root disk: from the store's layers when it has
        them, else pulled (a registry request only when the image is not stored)."""
        ref = parse_reference(reference)
        row = self._row(ref.name)
        if row is not None:
            try:
                return PullResult(self.get(ref.name), cached=True)
            except NotFoundError:
                pass
            rebuilt = self._rebuild(ref.name, _as_progress(progress))
            if rebuilt is not None:
                return rebuilt
        return self.pull(reference, progress=progress)

    def _rebuild(self, name: str, prog: PullProgress) -> PullResult | None:
        """Rebuild a lost disk from stored layers; None when some blob is missing too."""
        from matchlock.image._tarball import Staged

        with self._name_lock(name), self._workdir() as work:
            row = self._row(name)
            if row is None:
                return None
            with self._db() as conn:
                digests = [r["digest"] for r in conn.execute(
                    "SELECT digest FROM layers WHERE image_id=? ORDER BY ordinal", (row["id"],))]
            layers: LayerList = []
            diff_ids = _diff_ids(row["config_json"].encode(), len(digests))
            for dg, did in zip(digests, diff_ids, strict=True):
                p = self._pin_blob(dg, work)
                if p is None:
                    return None
                layers.append((Staged(p, p.stat().st_size, dg.removeprefix("sha256:")),
                               f"layer {dg[:19]}", did))
            if not layers:
                return None
            t0 = time.perf_counter()
            img, build = self._install(
                work, name, row["id"], row["config_json"].encode(), layers, row["source"],
                prog.message, digest=row["digest"], platform=row["platform"],
            )
        prog.message(f"Built rootfs from {name} ({img.size / 1e6:.1f} MB)")
        return PullResult(img, cached=False, built=True,
                          timings={**build, "total_s": time.perf_counter() - t0})

    def layer_count(self, name: str) -> int:
        """How many layers the stored image `name` has (0 when it is not stored)."""
        row = self._row(normalize_name(name))
        if row is None:
            return 0
        with self._db() as conn:
            (n,) = conn.execute("SELECT COUNT(*) FROM layers WHERE image_id=?",
                                (row["id"],)).fetchone()
        return int(n)

    def export_oci(self, name: str, out: BinaryIO | None, ref_name: str = "") -> str:
        """Stream the stored image `name` to `out` as an OCI layout tarball (its
        manifest annotated `ref_name`); returns the config digest, i.e. the id an engine
        gives the image (with `out` None only that is computed). The config is adjusted
        where engines need it (see _export.fix_config). Layer blobs are hard-linked into
        staging first, so a concurrent `rm`/`gc` cannot take them mid-stream."""
        from matchlock.image import _export

        norm = normalize_name(name)
        if norm == BUILTIN_IMAGE:
            self.ensure_builtin()
        with self._lock(), self._db() as conn:
            row = conn.execute("SELECT * FROM images WHERE name=?", (norm,)).fetchone()
            if row is None:
                raise NotFoundError(f"image '{norm}' not found")
            digests = [r["digest"].removeprefix("sha256:") for r in conn.execute(
                "SELECT digest FROM layers WHERE image_id=? ORDER BY ordinal", (row["id"],))]
            self._ensure_dirs()
            import tempfile  # not at the top: `run` starts without it

            work = Path(tempfile.mkdtemp(prefix="export-", dir=self._tmp))
            pinned = []
            try:
                for hx in digests:
                    dst = work / hx
                    if not dst.exists():
                        os.link(self._blobs / hx, dst)
                    pinned.append(dst)
            except FileNotFoundError:
                _disk.rmtree_any(work)
                raise NotFoundError(f"image '{norm}' has lost a layer; pull or import it "
                                    "again") from None
        try:
            layers = [(p, p.name, _export.layer_media_type(p)) for p in pinned]
            config = _export.fix_config(row["config_json"].encode(),
                                        [(p, mt) for p, _, mt in layers])
            if out is None:
                return "sha256:" + hashlib.sha256(config).hexdigest()
            return _export.write_oci_archive(out, config, layers, ref_name)
        finally:
            _disk.rmtree_any(work)

    def gc(self) -> GcResult:
        """Drop blobs and disks no image uses, and staging left by dead processes."""
        res = GcResult()
        if not self.root.exists():
            return res
        self._ensure_dirs()
        res.staging = self._sweep_tmp()
        with self._lock(), self._db() as conn:
            conn.execute(
                "DELETE FROM layers WHERE image_id NOT IN (SELECT id FROM images)"
            )
            used = {r["digest"].removeprefix("sha256:")
                    for r in conn.execute("SELECT DISTINCT digest FROM layers")}
            disks = {r["disk"] for r in conn.execute("SELECT DISTINCT disk FROM images")}
            for e in list(os.scandir(self._blobs)):
                if e.name not in used:
                    size = e.stat(follow_symlinks=False).st_blocks * 512
                    _discard(Path(e.path))
                    res.blobs += 1
                    res.freed += size
            for e in list(os.scandir(self._disks)):
                if f"disks/{e.name}" in disks:
                    continue
                size = e.stat(follow_symlinks=False).st_blocks * 512
                if _try_unlink_disk(Path(e.path)):
                    res.disks += 1
                    res.freed += size
                else:
                    res.kept_in_use += 1
        return res

    # ---- internals -----------------------------------------------------------------

    def _cached(self, name: str, image_id: str) -> Image | None:
        row = self._row(name)
        if row is None or row["id"] != image_id:
            return None
        try:
            return self.get(name)
        except NotFoundError:
            return None

    def _upsert(self, conn: sqlite3.Connection, name: str, image_id: str, disk_rel: str,
                config: bytes, source: str, digest: str, platform: str) -> list[Path]:
        """Within a transaction: point `name` at `image_id`. Returns the files that the
        image it pointed at before leaves unreferenced."""
        disk = self.root / disk_rel
        size = disk.stat().st_blocks * 512
        old = conn.execute("SELECT id FROM images WHERE name=?", (name,)).fetchone()
        conn.execute(
            "INSERT OR REPLACE INTO images"
            " (name, id, disk, config_json, size, created, source, digest, platform)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (name, image_id, disk_rel, config.decode("utf-8", "replace"), size, _now(), source,
             digest, platform),
        )  # fmt: skip
        if old is not None and old["id"] != image_id:
            return self._unreference(conn, old["id"])
        return []

    def _install(
        self,
        work: Path,
        name: str,
        image_id: str,
        config: bytes,
        layers: LayerList,
        source: str,
        progress: Progress,
        *,
        digest: str = "",
        platform: str = "",
    ) -> tuple[Image, dict]:
        """Build the disk (unless this id has one), then commit blobs, disk and rows.
        Returns the image and the disk build's result ({} when the disk existed)."""
        disk_rel = self._disk_rel(image_id)
        disk = self.root / disk_rel
        built: Path | None = None
        build: dict = {}
        for _attempt in range(3):
            if built is None and not disk.exists():
                built, build = self._build_disk(work, layers, progress)
            elif built is None:
                progress(f"reusing disk of {image_id[:19]}")
            with self._lock(), self._db() as conn:
                if not disk.exists():
                    if built is None:
                        continue  # removed meanwhile: build it after all
                    os.chmod(built, 0o444)
                    os.replace(built, disk)
                for st, _label, _did in layers:
                    blob = self._blobs / st.sha256
                    if not blob.exists():
                        os.replace(st.path, blob)
                        os.chmod(blob, 0o444)
                conn.execute("BEGIN IMMEDIATE")
                try:
                    # The new image's layer rows first: the image this name pointed at
                    # may share blobs with it (same base), and those must not be doomed.
                    conn.execute("DELETE FROM layers WHERE image_id=?", (image_id,))
                    conn.executemany(
                        "INSERT INTO layers (image_id, ordinal, digest) VALUES (?, ?, ?)",
                        [(image_id, i, "sha256:" + st.sha256)
                         for i, (st, _, _) in enumerate(layers)],
                    )
                    doomed = self._upsert(conn, name, image_id, disk_rel, config, source,
                                          digest, platform)
                    conn.execute("COMMIT")
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                for p in doomed:
                    _discard(p)
            return self.get(name), build
        raise MatchlockError(f"image disk for {name} kept disappearing; retry")

    def _build_disk(self, work: Path, layers: LayerList, progress: Progress
                    ) -> tuple[Path, dict]:
        from matchlock.image._layers import NoSpaceError

        out = work / "disk.ext4"
        estimate = _disk.unpack_estimate(
            [(st.size, _compressed(st.path)) for st, _, _ in layers]
        )
        for prefer_tmpfs in (True, False):
            rootfs = _disk.make_unpack_dir(work, estimate, prefer_tmpfs)
            spec = {
                "rootfs": str(rootfs),
                "disk": str(out),
                "layers": [[str(st.path), label, did] for st, label, did in layers],
            }
            try:
                return out, _disk.build(spec, progress)
            except NoSpaceError:
                if rootfs.parent == work:
                    raise
                progress("tmpfs is full; unpacking on disk instead")
            finally:
                _disk.remove_unpack_dir(work)
                _disk.rmtree_any(rootfs)
                if out.exists() and not out.stat().st_size:
                    out.unlink()
        raise AssertionError("unreachable")

    def _unreference(self, conn: sqlite3.Connection, image_id: str) -> list[Path]:
        """Within a transaction: if no name refers to `image_id` any more, drop its layer
        rows. Returns the files (disk, blobs) that nothing references now."""
        if conn.execute("SELECT 1 FROM images WHERE id=?", (image_id,)).fetchone():
            return []
        digests = [
            r["digest"]
            for r in conn.execute("SELECT digest FROM layers WHERE image_id=?", (image_id,))
        ]
        conn.execute("DELETE FROM layers WHERE image_id=?", (image_id,))
        doomed = [self.root / self._disk_rel(image_id)]
        for d in set(digests):
            if not conn.execute("SELECT 1 FROM layers WHERE digest=?", (d,)).fetchone():
                doomed.append(self._blobs / d.removeprefix("sha256:"))
        return doomed


def _discard(path: Path) -> None:
    if path.parent.name == "disks":
        _try_unlink_disk(path)
        return
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _compressed(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4)
    return head[:2] == b"\x1f\x8b" or head == b"\x28\xb5\x2f\xfd"


def _diff_ids(config: bytes, n: int) -> list[str | None]:
    try:
        cfg = json.loads(config)
        ids = cfg["rootfs"]["diff_ids"]
    except (ValueError, KeyError, TypeError):
        return [None] * n
    if not isinstance(ids, list) or len(ids) != n:
        return [None] * n
    return [i if isinstance(i, str) and i.startswith("sha256:") and len(i) == 71 else None
            for i in ids]


def _platform_of(config: bytes) -> str:
    try:
        p = Platform.of(json.loads(config))
    except ValueError:
        p = None
    return str(p) if p else ""


def _as_progress(progress: PullProgress | Progress | None) -> PullProgress:
    from matchlock.image._pull import LineProgress, PullProgress

    if progress is None:
        return PullProgress()
    if isinstance(progress, PullProgress):
        return progress
    return LineProgress(progress)
