"""The image store: content-addressed layer blobs, one shared ext4 disk per image id, and
SQLite metadata.

Layout under the root (default `cache_dir()/images`):

    images.db                 names -> image id, config, disk; layers per image id
    blobs/sha256/<hex>        layer blobs as given (compressed or not), stored once
    disks/<id-hex>.ext4       read-only (0444) root disk, shared by all tags of an image id
    tmp/<work>/               staging for an import in progress; removed when it ends
    .lock, builtin.lock       flock(2) locks

An import never touches blobs/, disks/ or the database until its disk is built: then, under
the store lock, staged blobs and the disk are renamed into place and the rows inserted. A
failed import leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from matchlock.errors import MatchlockError, NotFoundError
from matchlock.image import _builtin, _disk
from matchlock.image._model import Image, ImageConfig
from matchlock.image._names import normalize_name
from matchlock.image._tarball import Staged, StagedTarball
from matchlock.paths import cache_dir

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
def _flock(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class ImageStore:
    def __init__(self, root: Path | None = None):
        self.root = (Path(root) if root is not None else cache_dir() / "images").absolute()

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
        for d in (self._blobs, self._disks, self._tmp):
            d.mkdir(parents=True, exist_ok=True)

    def _connect(self) -> sqlite3.Connection:
        self.root.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.root / "images.db", timeout=30, isolation_level=None)
        conn.execute("PRAGMA busy_timeout=30000")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.executescript(_SCHEMA)
        conn.row_factory = sqlite3.Row
        return conn

    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        conn = self._connect()
        try:
            yield conn
        finally:
            conn.close()

    def _lock(self) -> contextlib.AbstractContextManager[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        return _flock(self.root / ".lock")

    def _disk_rel(self, image_id: str) -> str:
        return f"disks/{image_id.removeprefix('sha256:')}.ext4"

    def _image(self, row: sqlite3.Row) -> Image:
        try:
            cfg = json.loads(row["config_json"])
        except ValueError:
            cfg = {}
        inner = cfg.get("config") if isinstance(cfg, dict) else None
        return Image(
            name=row["name"],
            id=row["id"],
            disk=self.root / row["disk"],
            config=ImageConfig.from_oci(inner or {}),
            size=int(row["size"]),
            created=row["created"],
            source=row["source"],
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
        work = Path(tempfile.mkdtemp(prefix="import-", dir=self._tmp))
        try:
            yield work
        finally:
            _rmtree(work)

    def _sweep_tmp(self) -> None:
        """Remove staging dirs left by killed processes (older than a day)."""
        cutoff = time.time() - _STALE_TMP_S
        try:
            entries = list(os.scandir(self._tmp))
        except FileNotFoundError:
            return
        for e in entries:
            with contextlib.suppress(OSError):
                if e.stat(follow_symlinks=False).st_mtime < cutoff:
                    _rmtree(Path(e.path))

    # ---- public API ----------------------------------------------------------------

    def get(self, name: str) -> Image:
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
                f"image '{norm}' has lost its disk {img.disk}; re-import it with "
                f"`matchlock image import {norm} < image.tar`"
            )
        return img

    def list(self) -> list[Image]:
        if not (self.root / "images.db").exists():
            return []
        with self._db() as conn:
            rows = conn.execute("SELECT * FROM images ORDER BY name").fetchall()
        return [self._image(r) for r in rows]

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
                _unlink_ro(p)

    def import_tar(self, name: str, stream: BinaryIO, progress: Progress | None = None) -> Image:
        progress = progress or _noop
        norm = normalize_name(name)
        _disk.require_mke2fs()
        _disk.require_fakeroot()
        t0 = time.monotonic()
        with self._workdir() as work:
            src = StagedTarball(_stream_label(stream))
            src.read(stream, work, progress)
            resolved = src.resolve(norm)
            image_id = "sha256:" + hashlib.sha256(resolved.config).hexdigest()
            layers = [(st, f"layer sha256:{st.sha256[:12]}") for st in resolved.layers]
            img = self._install(work, norm, image_id, resolved.config, layers, "import", progress)
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
            with self._workdir() as work:
                blob = work / "layer.tar"
                _builtin.write_layer(busybox, blob)
                st = Staged(blob, blob.stat().st_size, _disk.sha256_file(blob))
                return self._install(
                    work, norm, image_id, config, [(st, "busybox layer")], "builtin", _noop
                )

    # ---- internals -----------------------------------------------------------------

    def _cached(self, name: str, image_id: str) -> Image | None:
        row = self._row(name)
        if row is None or row["id"] != image_id:
            return None
        img = self._image(row)
        return img if img.disk.exists() else None

    def _install(
        self,
        work: Path,
        name: str,
        image_id: str,
        config: bytes,
        layers: list[tuple[Staged, str]],
        source: str,
        progress: Progress,
    ) -> Image:
        """Build the disk (unless this id has one), then commit blobs, disk and rows."""
        disk_rel = self._disk_rel(image_id)
        disk = self.root / disk_rel
        built: Path | None = None
        for _attempt in range(3):
            if built is None and not disk.exists():
                built = self._build_disk(work, layers, progress)
            elif built is None:
                progress(f"reusing disk of {image_id[:19]}")
            with self._lock(), self._db() as conn:
                if not disk.exists():
                    if built is None:
                        continue  # removed meanwhile: build it after all
                    os.chmod(built, 0o444)
                    os.replace(built, disk)
                for st, _label in layers:
                    blob = self._blobs / st.sha256
                    if not blob.exists():
                        os.replace(st.path, blob)
                        os.chmod(blob, 0o444)
                size = disk.stat().st_blocks * 512
                conn.execute("BEGIN IMMEDIATE")
                try:
                    old = conn.execute("SELECT id FROM images WHERE name=?", (name,)).fetchone()
                    conn.execute(
                        "INSERT OR REPLACE INTO images"
                        " (name, id, disk, config_json, size, created, source)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (name, image_id, disk_rel, config.decode("utf-8", "replace"),
                         size, _now(), source),
                    )  # fmt: skip
                    conn.execute("DELETE FROM layers WHERE image_id=?", (image_id,))
                    conn.executemany(
                        "INSERT INTO layers (image_id, ordinal, digest) VALUES (?, ?, ?)",
                        [(image_id, i, "sha256:" + st.sha256) for i, (st, _) in enumerate(layers)],
                    )
                    doomed: list[Path] = []
                    if old is not None and old["id"] != image_id:
                        doomed = self._unreference(conn, old["id"])
                    conn.execute("COMMIT")
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                for p in doomed:
                    _unlink_ro(p)
            return self.get(name)
        raise MatchlockError(f"image disk for {name} kept disappearing; retry the import")

    def _build_disk(self, work: Path, layers: list[tuple[Staged, str]], progress: Progress) -> Path:
        rootfs = work / "rootfs"
        rootfs.mkdir()
        out = work / "disk.ext4"
        spec = {
            "rootfs": str(rootfs),
            "disk": str(out),
            "layers": [[str(st.path), label] for st, label in layers],
        }
        try:
            _disk.build(spec, progress)
        finally:
            _rmtree(rootfs)
        return out

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


def _unlink_ro(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _rmtree(path: Path) -> None:
    """rmtree that also copes with read-only directories we created."""

    def onerror(func, p, exc_info):  # noqa: ANN001
        exc = exc_info[1]
        if isinstance(exc, FileNotFoundError):
            return
        if isinstance(exc, PermissionError):
            with contextlib.suppress(OSError):
                os.chmod(os.path.dirname(p), 0o700)
                func(p)
                return
        raise exc

    if os.path.lexists(path):
        shutil.rmtree(path, onerror=onerror)
