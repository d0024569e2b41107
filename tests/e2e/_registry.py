"""Real registries for the pull tests: Debian's `docker-registry` on 127.0.0.1, images pushed
with `skopeo`, a bearer-token service signing real JWTs, and a TCP forwarder that can stall
a transfer half way. Every request the registry served is read back from its own access log.
"""

from __future__ import annotations

import base64
import datetime as dt
import gzip
import hashlib
import http.server
import io
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import tarfile
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs, urlparse

REGISTRY_BIN = "/usr/bin/docker-registry"
_ACCESS = re.compile(r'"(GET|HEAD|PUT|POST|PATCH|DELETE) (\S+) HTTP/[\d.]+" (\d{3})')


def require_tools() -> None:
    import pytest

    missing = [t for t in (REGISTRY_BIN, shutil.which("skopeo")) if not t or not
               os.path.exists(t)]
    if missing or not shutil.which("skopeo"):
        pytest.fail("docker-registry and skopeo are needed: run ./scripts/install.sh", False)


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Registry:
    """One docker-registry process with its own storage, config and logs."""

    def __init__(self, root: Path, auth: dict | None = None):
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.storage = root / "storage"
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.auth = auth
        self.lines: list[str] = []
        self._ready = threading.Event()
        self.proc: subprocess.Popen | None = None

    def start(self) -> Registry:
        cfg = {
            "version": 0.1,
            "log": {"level": "info", "accesslog": {"disabled": False}},
            "storage": {"filesystem": {"rootdirectory": str(self.storage)},
                        "delete": {"enabled": True}},
            "http": {"addr": self.host},
        }
        if self.auth:
            cfg["auth"] = self.auth
        path = self.root / "config.yml"
        path.write_text(json.dumps(cfg))  # JSON is YAML
        self.proc = subprocess.Popen(
            [REGISTRY_BIN, "serve", str(path)], stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True,
        )
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(20):
            self.stop()
            raise AssertionError(f"docker-registry did not start: {self.lines[-5:]}")
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if "listening on" in line:
                self._ready.set()
        self._ready.set()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    # ---- what it served ---------------------------------------------------------------

    def requests(self) -> list[tuple[str, str, int]]:
        """(method, path, status) of every request, from the registry's access log."""
        out = []
        for line in list(self.lines):
            m = _ACCESS.search(line)
            if m:
                out.append((m.group(1), m.group(2).split("?")[0], int(m.group(3))))
        return out

    def blob_gets(self, digest: str | None = None) -> list[str]:
        return [p for m, p, s in self.requests() if m == "GET" and "/blobs/" in p
                and s < 300 and (digest is None or p.endswith(digest))]

    def mark(self) -> int:
        return len(self.requests())

    def since(self, mark: int) -> list[tuple[str, str, int]]:
        return self.requests()[mark:]

    def blob_file(self, digest: str) -> Path:
        hexd = digest.removeprefix("sha256:")
        return (self.storage / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data")

    # ---- pushing ----------------------------------------------------------------------

    def push(self, source: str, dest: str, creds: str | None = None, all_: bool = False,
             fmt: str | None = None) -> None:
        """`skopeo copy SOURCE docker://HOST/DEST`."""
        cmd = ["skopeo", "copy", "-q", "--dest-tls-verify=false"]
        if creds:
            cmd += ["--dest-creds", creds]
        if all_:
            cmd.append("--all")
        if fmt:
            cmd += ["--format", fmt]
        cmd += [source, f"docker://{self.host}/{dest}"]
        env = {**os.environ, "HOME": str(self.root)}  # no user auth files, no proxies
        for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
            env.pop(k, None)
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
        if r.returncode != 0:
            raise AssertionError(f"skopeo push failed: {r.stderr.strip()}")


# ---- OCI layouts (multi-layer, multi-platform images) ----------------------------------------


def _sha(b: bytes) -> str:
    return "sha256:" + hashlib.sha256(b).hexdigest()


def tar_layer(files: dict[str, bytes], dirs: tuple[str, ...] = ()) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for d in dirs:
            ti = tarfile.TarInfo(d)
            ti.type, ti.mode = tarfile.DIRTYPE, 0o755
            tf.addfile(ti)
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = len(data), 0o755, 1_600_000_000
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


class Layout:
    """An OCI image layout directory, written by hand (blobs, index.json, oci-layout)."""

    def __init__(self, path: Path):
        self.path = path
        (path / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        (path / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
        self.top: list[dict] = []

    def blob(self, data: bytes, media_type: str) -> dict:
        d = _sha(data)
        (self.path / "blobs" / "sha256" / d[7:]).write_bytes(data)
        return {"mediaType": media_type, "digest": d, "size": len(data)}

    def image(self, layers: list[bytes], config: dict, arch: str = "amd64") -> dict:
        """Add an image (gzip layers); returns its manifest descriptor."""
        cfg = json.dumps({"architecture": arch, "os": "linux", "config": config,
                          "rootfs": {"type": "layers",
                                     "diff_ids": [_sha(raw) for raw in layers]}}).encode()
        m = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
             "config": self.blob(cfg, "application/vnd.oci.image.config.v1+json"),
             "layers": [self.blob(gzip.compress(raw, mtime=0),
                                  "application/vnd.oci.image.layer.v1.tar+gzip")
                        for raw in layers]}
        return self.blob(json.dumps(m).encode(), m["mediaType"])

    def tag(self, desc: dict, name: str) -> None:
        key = "org.opencontainers.image.ref.name"
        self.top = [d for d in self.top if d["annotations"][key] != name]
        self.top.append({**desc, "annotations": {"org.opencontainers.image.ref.name": name}})
        self._write()

    def index(self, entries: list[tuple[dict, dict]], name: str) -> dict:
        idx = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
               "manifests": [{**d, "platform": p} for d, p in entries]}
        desc = self.blob(json.dumps(idx).encode(), idx["mediaType"])
        self.tag(desc, name)
        return desc

    def _write(self) -> None:
        (self.path / "index.json").write_text(json.dumps(
            {"schemaVersion": 2, "manifests": self.top}))


# ---- a bearer-token service ----------------------------------------------------------------


def _b64url(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


class TokenService:
    """The docker token protocol: GET /token?service=&scope= with Basic credentials answers
    a JWT (RS256, x5c) that the registry verifies against our certificate."""

    def __init__(self, root: Path, user: str, password: str):
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import NameOID

        self.user, self.password = user, password
        self.requests: list[dict] = []
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mltest token signer")])
        now = dt.datetime.now(dt.UTC)
        self.cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.cert_path = root / "token-cert.pem"
        root.mkdir(parents=True, exist_ok=True)
        self.cert_path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        self._der = self.cert.public_bytes(serialization.Encoding.DER)
        svc = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a) -> None:  # noqa: ANN002
                pass

            def do_GET(self) -> None:  # noqa: N802
                q = parse_qs(urlparse(self.path).query)
                auth = self.headers.get("Authorization", "")
                svc.requests.append({"query": q, "auth": auth})
                want = "Basic " + base64.b64encode(
                    f"{svc.user}:{svc.password}".encode()).decode()
                if auth != want:
                    self.send_response(401)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = json.dumps({"token": svc.token(q.get("scope", []))}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.realm = f"http://127.0.0.1:{self.port}/token"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def registry_auth(self) -> dict:
        return {"token": {"realm": self.realm, "service": "mltest-registry",
                          "issuer": "mltest-issuer", "rootcertbundle": str(self.cert_path)}}

    def token(self, scopes: list[str]) -> str:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        access = []
        for scope in " ".join(scopes).split():
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256",
                  "x5c": [base64.b64encode(self._der).decode()]}
        claims = {"iss": "mltest-issuer", "sub": self.user, "aud": "mltest-registry",
                  "exp": now + 600, "nbf": now - 60, "iat": now,
                  "jti": secrets.token_hex(8), "access": access}
        signing = f"{_b64url(json.dumps(header).encode())}." \
                  f"{_b64url(json.dumps(claims).encode())}"
        sig = self.key.sign(signing.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing}.{_b64url(sig)}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# ---- a forwarder that can stall ------------------------------------------------------------


class Forwarder:
    """127.0.0.1:port -> target. With `stall_after` set, stops passing response bytes once
    that many went through (and sets `stalled`) until `release()`."""

    def __init__(self, target_port: int, stall_after: int | None = None):
        self.target = ("127.0.0.1", target_port)
        self.stall_after = stall_after
        self.stalled = threading.Event()
        self._go = threading.Event()
        self.sent = 0
        self.connections = 0
        self.srv = socket.socket()
        self.srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.srv.bind(("127.0.0.1", 0))
        self.srv.listen(16)
        self.port = self.srv.getsockname()[1]
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def release(self) -> None:
        self.stall_after = None
        self._go.set()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.srv.accept()
            except OSError:
                return
            self.connections += 1
            u = socket.create_connection(self.target)
            self._conns += [c, u]
            threading.Thread(target=self._pipe, args=(c, u, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(u, c, True), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, response: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if response and self.stall_after is not None:
                    room = self.stall_after - self.sent
                    if room <= len(data):
                        dst.sendall(data[:max(room, 0)])
                        self.sent += max(room, 0)
                        self.stalled.set()
                        self._go.wait()
                        data = data[max(room, 0):]
                if response:
                    self.sent += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._go.set()
        self.srv.close()
        for c in self._conns:
            c.close()
