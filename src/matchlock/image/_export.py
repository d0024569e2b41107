"""A stored image as an OCI image-layout tarball (`oci-archive`), for engines that take
images without a registry (the builder VM's Buildah). Streams; no temporary copies."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import BinaryIO

MT_LAYER = "application/vnd.oci.image.layer.v1.tar"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_INDEX = "application/vnd.oci.image.index.v1+json"


def layer_media_type(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] == b"\x1f\x8b":
        return MT_LAYER + "+gzip"
    if head == b"\x28\xb5\x2f\xfd":
        return MT_LAYER + "+zstd"
    return MT_LAYER


def _diff_id(path: Path, media_type: str) -> str:
    h = hashlib.sha256()
    if media_type.endswith("+zstd"):
        import zstandard  # only for zstd layers of images missing their diff_ids

        with open(path, "rb") as f:
            for chunk in zstandard.ZstdDecompressor().read_to_iter(f):
                h.update(chunk)
    else:
        with (gzip.open(path, "rb") if media_type.endswith("+gzip") else open(path, "rb")) as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return "sha256:" + h.hexdigest()


def fix_config(config: bytes, layers: list[tuple[Path, str]]) -> bytes:
    """`config` as engines require it: rootfs.diff_ids that match `layers` (computed for
    an image made without them, such as the built-in one) and one non-empty history
    entry per layer (tarball imports often have none; Buildah refuses a base whose
    history and layers disagree). Unchanged, and so the same id, when both are right."""
    cfg = json.loads(config)
    changed = False
    rootfs = cfg.get("rootfs") if isinstance(cfg.get("rootfs"), dict) else {}
    ids = rootfs.get("diff_ids")
    if not (isinstance(ids, list) and len(ids) == len(layers)):
        cfg["rootfs"] = {"type": "layers",
                         "diff_ids": [_diff_id(p, mt) for p, mt in layers]}
        changed = True
    history = cfg.get("history") if isinstance(cfg.get("history"), list) else None
    non_empty = [h for h in history or [] if isinstance(h, dict) and not h.get("empty_layer")]
    if len(non_empty) != len(layers):
        cfg["history"] = [{"created": cfg.get("created", "1970-01-01T00:00:00Z"),
                           "created_by": "matchlock: imported layer"} for _ in layers]
        changed = True
    if not changed:
        return config
    return json.dumps(cfg, sort_keys=True, separators=(",", ":")).encode()


def _add_bytes(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mode = len(data), 0o644
    tf.addfile(ti, io.BytesIO(data))


def write_oci_archive(out: BinaryIO, config: bytes, layers: list[tuple[Path, str, str]],
                      ref_name: str) -> str:
    """Write an OCI layout tar of one image to `out`. `layers`: (blob path, sha256 hex,
    media type), base first. Returns the config digest (the engine's image id)."""
    cfg_hex = hashlib.sha256(config).hexdigest()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": MT_MANIFEST,
        "config": {"mediaType": MT_CONFIG, "digest": f"sha256:{cfg_hex}",
                   "size": len(config)},
        "layers": [{"mediaType": mt, "digest": f"sha256:{hx}", "size": p.stat().st_size}
                   for p, hx, mt in layers],
    }, separators=(",", ":")).encode()
    man_hex = hashlib.sha256(manifest).hexdigest()
    index = json.dumps({
        "schemaVersion": 2, "mediaType": MT_INDEX,
        "manifests": [{"mediaType": MT_MANIFEST, "digest": f"sha256:{man_hex}",
                       "size": len(manifest),
                       "annotations": {"org.opencontainers.image.ref.name": ref_name}}],
    }, separators=(",", ":")).encode()
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tf:
        _add_bytes(tf, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        _add_bytes(tf, "index.json", index)
        _add_bytes(tf, f"blobs/sha256/{cfg_hex}", config)
        _add_bytes(tf, f"blobs/sha256/{man_hex}", manifest)
        seen = set()
        for p, hx, _mt in layers:
            if hx in seen:
                continue
            seen.add(hx)
            ti = tarfile.TarInfo(f"blobs/sha256/{hx}")
            ti.size, ti.mode = p.stat().st_size, 0o644
            with open(p, "rb") as f:
                tf.addfile(ti, f)
    return f"sha256:{cfg_hex}"


__all__ = ["fix_config", "layer_media_type", "write_oci_archive"]
