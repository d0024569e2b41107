"""The per-VM CA: certificate shape, leaf SANs, caching, and an in-memory handshake."""

from __future__ import annotations

import datetime
import ssl

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from matchlock.net import ca as ca_mod
from matchlock.net.ca import CertificateAuthority


def _handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, sni: str | None):
    """Drive a TLS handshake between two SSLObjects over memory BIOs."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=sni)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = [False, False]
    for _ in range(20):
        for i, (obj, out, peer_in) in enumerate(((client, c_out, s_in), (server, s_out, c_in))):
            if not done[i]:
                try:
                    obj.do_handshake()
                    done[i] = True
                except ssl.SSLWantReadError:
                    pass
            if out.pending:
                peer_in.write(out.read())
        if all(done):
            return client, server
    raise AssertionError("handshake did not finish")


def test_ca_certificate_shape():
    ca = CertificateAuthority.generate()
    cert = x509.load_pem_x509_certificate(ca.cert_pem)
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign and not ku.digital_signature
    now = datetime.datetime.now(datetime.UTC)
    assert now - datetime.timedelta(days=1, minutes=1) < cert.not_valid_before_utc < now
    assert cert.not_valid_after_utc - now <= datetime.timedelta(days=30)
    assert "Matchlock sandbox CA" in cert.subject.rfc4514_string()
    assert b"PRIVATE KEY" not in ca.cert_pem
    assert "key" not in repr(ca).lower()


def test_leaf_sans_and_chain_verify():
    ca = CertificateAuthority.generate()
    dns = x509.load_pem_x509_certificate(ca.leaf_pem("api.example.com"))
    san = dns.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["api.example.com"]
    ip = x509.load_pem_x509_certificate(ca.leaf_pem("10.1.2.3"))
    san = ip.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["10.1.2.3"]

    client_ctx = ssl.create_default_context(cadata=ca.cert_pem.decode())
    client, _ = _handshake(ca.leaf_context("api.example.com"), client_ctx, "api.example.com")
    assert client.selected_alpn_protocol() in (None, "http/1.1")
    assert client.version() in ("TLSv1.2", "TLSv1.3")


def test_sni_context_switches_leaf():
    ca = CertificateAuthority.generate()
    seen = []

    def select(sslobj, name):
        seen.append(name)
        return ca.leaf_context(name)

    client_ctx = ssl.create_default_context(cadata=ca.cert_pem.decode())
    client_ctx.set_alpn_protocols(["h2", "http/1.1"])
    client, _ = _handshake(ca.sni_context(select), client_ctx, "a.test")
    assert seen == ["a.test"] and client.selected_alpn_protocol() == "http/1.1"


def test_tls12_seclevel0_client_accepted():
    ca = CertificateAuthority.generate()
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.load_verify_locations(cadata=ca.cert_pem.decode())
    client_ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    client_ctx.set_ciphers("ECDHE-ECDSA-AES128-SHA:@SECLEVEL=0")
    client, _ = _handshake(ca.leaf_context("b.test"), client_ctx, "b.test")
    assert client.version() == "TLSv1.2"


def test_leaf_cache_is_lru_bounded(monkeypatch):
    monkeypatch.setattr(ca_mod, "LEAF_CACHE_SIZE", 3)
    ca = CertificateAuthority.generate()
    first = ca.leaf_context("h0.test")
    assert ca.leaf_context("H0.test.") is first
    for i in range(1, 4):
        ca.leaf_context(f"h{i}.test")
    assert len(ca._cache) == 3
    assert ca.leaf_context("h0.test") is not first  # evicted, minted again


def test_each_ca_is_fresh():
    a, b = CertificateAuthority.generate(), CertificateAuthority.generate()
    assert a.cert_pem != b.cert_pem
