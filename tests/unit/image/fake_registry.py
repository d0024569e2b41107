"""An in-memory OCI registry behind httpx.MockTransport, for unit tests of the client.

It speaks the distribution-spec subset a pull uses (manifests and blobs by tag or digest,
error bodies, `WWW-Authenticate` challenges, a token endpoint) and records every request.
Faults are injected per path. The e2e tests use Debian's real `docker-registry` instead.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
from image_helpers import f, image_config, layer  # noqa: F401 - re-exported for tests

HOST = "reg.test"
TOKEN_HOST = "auth.test"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


def digest(b: bytes) -> str:
    return "sha256:" + hashlib.sha256(b).hexdigest()


@dataclass
class Fault:
    status: int = 500
    times: int = 1  # how many requests it hits
    cut_after: int | None = None  # send this many body bytes, then a connection reset
    body: bytes | None = None  # serve these bytes instead (corruption)
    headers: dict = field(default_factory=dict)


class FakeRegistry:
    def __init__(self, auth: str | None = None, user: str = "u", password: str = "p"):
        self.blobs: dict[str, bytes] = {}
        self.manifests: dict[str, dict[str, tuple[bytes, str]]] = {}  # repo -> ref -> doc
        self.auth = auth  # None | "basic" | "bearer"
        self.user, self.password = user, password
        self.requests: list[httpx.Request] = []
        self.faults: dict[str, Fault] = {}
        self.tokens_issued = 0

    # ---- content ------------------------------------------------------------------------

    def add_blob(self, data: bytes) -> dict:
        d = digest(data)
        self.blobs[d] = data
        return {"digest": d, "size": len(data)}

    def push_image(self, repo: str, tag: str | None, layers: list[bytes], config: dict | None
                   = None, arch: str = "amd64", compress: bool = True) -> tuple[str, bytes]:
        """Store an image; returns (manifest digest, config blob)."""
        cfg = image_config(layers, config, arch)
        cdesc = {"mediaType": "application/vnd.oci.image.config.v1+json", **self.add_blob(cfg)}
        ldescs = []
        for raw in layers:
            blob = gzip.compress(raw, mtime=0) if compress else raw
            mt = LAYER_GZIP if compress else "application/vnd.oci.image.layer.v1.tar"
            ldescs.append({"mediaType": mt, **self.add_blob(blob)})
        m = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": cdesc,
                        "layers": ldescs}).encode()
        md = self.put_manifest(repo, tag, m, OCI_MANIFEST)
        return md, cfg

    def put_manifest(self, repo: str, tag: str | None, body: bytes, mt: str) -> str:
        d = digest(body)
        refs = self.manifests.setdefault(repo, {})
        refs[d] = (body, mt)
        if tag:
            refs[tag] = (body, mt)
        return d

    def push_index(self, repo: str, tag: str, entries: list[tuple[str, dict]]) -> str:
        """entries: (manifest digest, platform)."""
        manifests = []
        for md, plat in entries:
            body, mt = self.manifests[repo][md]
            manifests.append({"mediaType": mt, "digest": md, "size": len(body),
                              "platform": plat})
        idx = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX,
                          "manifests": manifests}).encode()
        return self.put_manifest(repo, tag, idx, OCI_INDEX)

    # ---- requests -----------------------------------------------------------------------

    def blob_requests(self) -> list[str]:
        return [r.url.path for r in self.requests if "/blobs/" in r.url.path]

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self._handle)

    def _authorized(self, req: httpx.Request) -> bool:
        got = req.headers.get("authorization", "")
        if self.auth == "basic":
            want = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
            return got == f"Basic {want}"
        if self.auth == "bearer":
            return got == "Bearer tok-good"
        return True

    def _challenge(self, repo: str) -> httpx.Response:
        if self.auth == "basic":
            h = 'Basic realm="fake"'
        else:
            h = (f'Bearer realm="https://{TOKEN_HOST}/token",service="fake-registry",'
                 f'scope="repository:{repo}:pull"')
        return httpx.Response(401, headers={"www-authenticate": h},
                              json={"errors": [{"code": "UNAUTHORIZED", "message": "auth"}]})

    def _token(self, req: httpx.Request) -> httpx.Response:
        want = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        if req.headers.get("authorization") != f"Basic {want}":
            return httpx.Response(401, json={"details": "bad credentials"})
        self.tokens_issued += 1
        return _ok(json.dumps({"token": "tok-good"}).encode())

    async def _handle(self, req: httpx.Request) -> httpx.Response:
        self.requests.append(req)
        path = req.url.path
        fault = self.faults.get(path)
        if fault is not None and fault.times > 0:
            fault.times -= 1
            if fault.cut_after is not None:
                data = self._lookup(path)
                return httpx.Response(200, stream=_Cut(data[:fault.cut_after]),
                                      headers={"content-length": str(len(data))})
            if fault.body is not None:
                return _ok(fault.body)
            return httpx.Response(fault.status, headers=fault.headers)
        if req.url.host == TOKEN_HOST:
            return self._token(req)
        if path == "/v2/":
            return httpx.Response(200, json={})
        parts = path.split("/")
        try:
            kind_at = max(i for i, p in enumerate(parts) if p in ("manifests", "blobs", "tags"))
        except ValueError:
            return httpx.Response(404)
        repo = "/".join(parts[2:kind_at])
        if not self._authorized(req):
            return self._challenge(repo)
        kind, ref = parts[kind_at], "/".join(parts[kind_at + 1:])
        if kind == "tags":
            if repo not in self.manifests:
                return _err(404, "NAME_UNKNOWN")
            tags = [t for t in self.manifests[repo] if not t.startswith("sha256:")]
            return _ok(json.dumps({"name": repo, "tags": tags}).encode(),
                       {"content-type": "application/json"})
        if kind == "manifests":
            doc = self.manifests.get(repo, {}).get(ref)
            if doc is None:
                return _err(404, "MANIFEST_UNKNOWN")
            return _ok(doc[0], {"content-type": doc[1]})
        data = self.blobs.get(ref)
        if data is None:
            return _err(404, "BLOB_UNKNOWN")
        return _ok(data)

    def _lookup(self, path: str) -> bytes:
        return self.blobs[path.rsplit("/", 1)[1]]


def _ok(data: bytes, headers: dict | None = None) -> httpx.Response:
    # A streamed body, like a real transport's (content= would arrive already read).
    return httpx.Response(200, stream=_Stream(data),
                          headers={"content-length": str(len(data)), **(headers or {})})


class _Stream(httpx.AsyncByteStream):
    def __init__(self, data: bytes):
        self.data = data

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for i in range(0, len(self.data), 65536):
            yield self.data[i:i + 65536]


def _err(status: int, code: str) -> httpx.Response:
    return httpx.Response(status, json={"errors": [{"code": code, "message": code.lower()}]})


class _Cut(httpx.AsyncByteStream):
    """A body that breaks off with a connection reset."""

    def __init__(self, data: bytes):
        self.data = data

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.data
        raise httpx.ReadError("connection reset by peer")
