"""Per-VM certificate authority for the intercepting proxy.

One fresh ECDSA P-256 CA per VM; its private key lives in this process's memory only (never
written to a file: `ssl` can only load keys from paths, so they go through a pipe). Leaf
certificates (ECDSA, SAN = the host name or IP) are minted on demand and their server-side
`ssl.SSLContext`s cached per host.

The guest-facing contexts accept TLS 1.2 and 1.3 with `@SECLEVEL=0`: Debian's static busybox
wget sends a TLS 1.2 ClientHello without `signature_algorithms`, which makes the server sign
with SHA-1, which OpenSSL refuses at the default level. Acceptable because that connection never
leaves the machine; the upstream side of the proxy stays strict (default context).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import threading
from collections import OrderedDict
from collections.abc import Callable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LEAF_CACHE_SIZE = 1024  # distinct hosts one VM talks to; a context is a few KiB
CA_VALIDITY = datetime.timedelta(days=30)  # a VM never lives that long; the CA dies with it
LEAF_VALIDITY = datetime.timedelta(days=7)
BACKDATE = datetime.timedelta(days=1)  # tolerate a guest clock that lags the host
GUEST_CIPHERS = "DEFAULT:@SECLEVEL=0"  # see the module docstring; guest side only
ALPN = ("http/1.1",)

SniSelect = Callable[[ssl.SSLObject | ssl.SSLSocket, "str | None"], "ssl.SSLContext | None"]


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _load_chain(ctx: ssl.SSLContext, chain_pem: bytes, key_pem: bytes) -> None:
    """`load_cert_chain` from memory: each PEM goes through its own pipe (no file on disk)."""
    fds: list[int] = []
    try:
        paths = []
        for pem in (chain_pem, key_pem):
            r, w = os.pipe()
            fds += [r, w]
            # A pipe holds 64 KiB; a chain and a P-256 key are ~2 KiB.
            os.write(w, pem)
            os.close(w)
            fds.remove(w)
            paths.append(f"/dev/fd/{r}")
        ctx.load_cert_chain(paths[0], paths[1])
    finally:
        for fd in fds:
            os.close(fd)


def guest_server_context() -> ssl.SSLContext:
    """A server context with the guest-facing settings and no certificate yet."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(GUEST_CIPHERS)
    ctx.set_alpn_protocols(list(ALPN))
    ctx.options |= ssl.OP_NO_COMPRESSION
    return ctx


class CertificateAuthority:
    """A CA whose key never leaves memory; mints and caches per-host leaf contexts."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        self._key = key
        self._cert = cert
        self.cert_pem: bytes = cert.public_bytes(serialization.Encoding.PEM)
        # One leaf key per CA: minting a leaf is then one signature, not a key generation.
        self._leaf_key = ec.generate_private_key(ec.SECP256R1())
        self._leaf_key_pem = self._leaf_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption())
        self._cache: OrderedDict[str, ssl.SSLContext] = OrderedDict()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"CertificateAuthority(subject={self._cert.subject.rfc4514_string()!r})"

    @classmethod
    def generate(cls, common_name: str = "Matchlock sandbox CA") -> CertificateAuthority:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Matchlock"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ])
        now = _now()
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + CA_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    def leaf_pem(self, host: str) -> bytes:
        """PEM of a fresh leaf certificate for `host` (DNS name or IP literal)."""
        now = _now()
        cn = host if len(host) <= 64 else host[:64]
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(self._cert.subject)
            .public_key(self._leaf_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(min(now + LEAF_VALIDITY, self._cert.not_valid_after_utc))
            .add_extension(x509.SubjectAlternativeName([_san(host)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self._key.public_key()), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM)

    def leaf_context(self, host: str) -> ssl.SSLContext:
        """Guest-facing server context presenting a leaf for `host` (cached, LRU)."""
        host = host.lower().rstrip(".")
        with self._lock:
            ctx = self._cache.get(host)
            if ctx is not None:
                self._cache.move_to_end(host)
                return ctx
        ctx = guest_server_context()
        _load_chain(ctx, self.leaf_pem(host) + self.cert_pem, self._leaf_key_pem)
        with self._lock:
            self._cache[host] = ctx
            while len(self._cache) > LEAF_CACHE_SIZE:
                self._cache.popitem(last=False)
        return ctx

    def sni_context(self, select: SniSelect) -> ssl.SSLContext:
        """A guest-facing context without a certificate whose SNI callback switches to
        whatever context `select(ssl_object, server_name)` returns (None → handshake alert)."""
        ctx = guest_server_context()

        def callback(sslobj, server_name, _ctx):
            try:
                chosen = select(sslobj, server_name)
            except Exception:
                chosen = None
            if chosen is None:
                return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
            sslobj.context = chosen
            return None

        ctx.sni_callback = callback
        return ctx
