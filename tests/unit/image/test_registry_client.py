"""The distribution client against an in-memory registry (httpx.MockTransport)."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import pytest
from fake_registry import HOST, TOKEN_HOST, FakeRegistry, Fault, digest
from image_helpers import f, layer

from matchlock.errors import IntegrityError, NotFoundError, RegistryError, UnreachableError
from matchlock.image import Platform, parse_reference
from matchlock.image._auth import Credentials
from matchlock.image._pull import PullProgress, fetch_layers, resolve
from matchlock.image._registry import RegistryClient

L1 = layer(f("a", "one"))
L2 = layer(f("b", "two"))


def client(reg: FakeRegistry, ref: str, creds: Credentials | None = None) -> RegistryClient:
    return RegistryClient(parse_reference(ref), transport=reg.transport(),
                          credentials=lambda _r: creds, backoff_s=0.0)


def run(coro):
    return asyncio.run(coro)


async def _resolve(reg, ref, want=None, creds=None):
    async with client(reg, ref, creds) as c:
        return await resolve(c, parse_reference(ref), want), c.stats


def test_resolve_single_manifest():
    reg = FakeRegistry()
    md, cfg = reg.push_image("app", "1", [L1, L2], {"Cmd": ["sh"]})
    res, stats = run(_resolve(reg, f"{HOST}/app:1"))
    assert res.manifest_digest == md
    assert res.config == cfg and res.config_digest == digest(cfg)
    assert [la.diff_id for la in res.layers] == [digest(L1), digest(L2)]
    assert str(res.platform) == "linux/amd64"
    assert [r.headers.get("authorization") for r in reg.requests] == [None, None]
    accept = reg.requests[0].headers["accept"]
    for mt in ("oci.image.index", "manifest.list.v2", "oci.image.manifest", "manifest.v2"):
        assert mt in accept


def test_index_platform_choice_and_digest_pinning():
    reg = FakeRegistry()
    amd, _ = reg.push_image("multi", None, [L1], arch="amd64")
    arm, arm_cfg = reg.push_image("multi", None, [L2], arch="arm64")
    idx = reg.push_index("multi", "1", [(arm, {"os": "linux", "architecture": "arm64",
                                               "variant": "v8"}),
                                        (amd, {"os": "linux", "architecture": "amd64"})])
    res, _ = run(_resolve(reg, f"{HOST}/multi:1", None))
    assert res.manifest_digest == idx and str(res.platform) == "linux/amd64"
    assert res.layers[0].diff_id == digest(L1)
    res, _ = run(_resolve(reg, f"{HOST}/multi:1", Platform.parse("linux/arm64")))
    assert res.config == arm_cfg
    res, _ = run(_resolve(reg, f"{HOST}/multi@{idx}", Platform.parse("linux/arm64/v8")))
    assert res.config == arm_cfg
    with pytest.raises(NotFoundError, match=r"has no linux/s390x image .* \(it has: "
                                            r"linux/amd64, linux/arm64/v8\)"):
        run(_resolve(reg, f"{HOST}/multi:1", Platform.parse("linux/s390x")))
    # A single-platform image asked for another platform.
    with pytest.raises(NotFoundError, match="is a linux/amd64 image, not linux/arm64"):
        run(_resolve(reg, f"{HOST}/multi@{amd}", Platform.parse("linux/arm64")))


def test_digest_mismatch_of_manifests_is_refused():
    reg = FakeRegistry()
    md, _ = reg.push_image("app", "1", [L1])
    body, mt = reg.manifests["app"][md]
    other = "sha256:" + "0" * 64
    reg.manifests["app"][other] = (body, mt)  # served under a digest it does not have
    with pytest.raises(IntegrityError, match=f"expected {other}"):
        run(_resolve(reg, f"{HOST}/app@{other}"))


def test_not_found_messages():
    reg = FakeRegistry()
    reg.push_image("app", "1", [L1])
    reg.push_image("app", "2", [L2])
    with pytest.raises(NotFoundError, match=r"^repository nope not found on reg.test; check "):
        run(_resolve(reg, f"{HOST}/nope:1"))
    with pytest.raises(NotFoundError, match=r"^app has no tag 9 on reg.test "
                                            r"\(it has: 1, 2\); check the tag"):
        run(_resolve(reg, f"{HOST}/app:9"))
    with pytest.raises(NotFoundError, match="has no manifest sha256:"):
        run(_resolve(reg, f"{HOST}/app@sha256:" + "1" * 64))


def test_schema1_and_non_images_refused():
    reg = FakeRegistry()
    reg.put_manifest("old", "1", json.dumps({"schemaVersion": 1, "fsLayers": []}).encode(),
                     "application/vnd.docker.distribution.manifest.v1+prettyjws")
    with pytest.raises(RegistryError, match="schema 1 manifest, which is not supported"):
        run(_resolve(reg, f"{HOST}/old:1"))
    cfg = reg.add_blob(b"{}")
    art = {"schemaVersion": 2, "config": {"mediaType": "application/vnd.cncf.helm.config"
                                          ".v1+json", **cfg}, "layers": []}
    reg.put_manifest("chart", "1", json.dumps(art).encode(),
                     "application/vnd.oci.image.manifest.v1+json")
    with pytest.raises(RegistryError, match="is not a container image"):
        run(_resolve(reg, f"{HOST}/chart:1"))


def test_bearer_token_flow_with_credentials():
    reg = FakeRegistry(auth="bearer")
    reg.push_image("priv/app", "1", [L1])
    res, _ = run(_resolve(reg, f"{HOST}/priv/app:1", creds=Credentials("u", "p", source="t")))
    assert res.layers
    token_reqs = [r for r in reg.requests if r.url.host == TOKEN_HOST]
    assert len(token_reqs) == 1 and reg.tokens_issued == 1  # one token for the whole pull
    q = token_reqs[0].url.params
    assert q["scope"] == "repository:priv/app:pull" and q["service"] == "fake-registry"
    assert q["account"] == "u"
    authed = [r for r in reg.requests if r.url.host == HOST and "authorization" in r.headers]
    assert authed and all(r.headers["authorization"] == "Bearer tok-good" for r in authed)


def test_bearer_wrong_or_missing_credentials():
    reg = FakeRegistry(auth="bearer")
    reg.push_image("app", "1", [L1])
    with pytest.raises(RegistryError, match=r"rejected the credentials for u \(from "
                                            r"cfg.json\); log in again"):
        run(_resolve(reg, f"{HOST}/app:1", creds=Credentials("u", "bad", source="cfg.json")))
    with pytest.raises(RegistryError, match="needs credentials for reg.test/app"):
        run(_resolve(reg, f"{HOST}/app:1"))
    assert reg.tokens_issued == 0


def test_basic_auth():
    reg = FakeRegistry(auth="basic")
    reg.push_image("app", "1", [L1])
    res, _ = run(_resolve(reg, f"{HOST}/app:1", creds=Credentials("u", "p")))
    assert res.layers
    with pytest.raises(RegistryError, match="needs credentials"):
        run(_resolve(reg, f"{HOST}/app:1"))
    with pytest.raises(RegistryError, match=r"rejected the credentials for u \(from t\)"):
        run(_resolve(reg, f"{HOST}/app:1", creds=Credentials("u", "wrong", source="t")))


async def _download(reg, ref, layers, work, parallel=3):
    async with client(reg, ref) as c:
        res = await resolve(c, parse_reference(ref), None)
        todo = [la for la in res.layers if la.digest in layers] if layers else list(res.layers)
        got = await fetch_layers(c, todo, work, PullProgress(), parallel)
        return res, got, c.stats


def test_download_verifies_and_retries(tmp_path):
    reg = FakeRegistry()
    reg.push_image("app", "1", [L1, L2])
    res, _ = run(_resolve(reg, f"{HOST}/app:1"))
    d1, d2 = (la.digest for la in res.layers)
    reg.faults[f"/v2/app/blobs/{d1}"] = Fault(status=503, times=2)
    reg.faults[f"/v2/app/blobs/{d2}"] = Fault(cut_after=10, times=1)  # reset mid-body
    _, got, stats = run(_download(reg, f"{HOST}/app:1", None, tmp_path))
    assert set(got) == {d1, d2} and stats.retries == 3
    assert got[d1].read_bytes() == reg.blobs[d1]
    assert got[d2].read_bytes() == reg.blobs[d2]
    assert reg.blob_requests().count(f"/v2/app/blobs/{d1}") == 3


def test_corrupt_blob_names_the_digest_and_leaves_no_file(tmp_path):
    reg = FakeRegistry()
    reg.push_image("app", "1", [L1])
    res, _ = run(_resolve(reg, f"{HOST}/app:1"))
    d = res.layers[0].digest
    good = reg.blobs[d]
    reg.faults[f"/v2/app/blobs/{d}"] = Fault(body=good[:-1] + bytes([good[-1] ^ 1]), times=9)
    with pytest.raises(IntegrityError, match=f"layer {d} from reg.test failed verification"):
        run(_download(reg, f"{HOST}/app:1", None, tmp_path))
    assert list(tmp_path.iterdir()) == []
    # Too many bytes: stops reading past the declared size.
    reg.faults[f"/v2/app/blobs/{d}"] = Fault(body=good * 50, times=9)
    with pytest.raises(IntegrityError, match=f"expected {len(good)} bytes"):
        run(_download(reg, f"{HOST}/app:1", None, tmp_path))


def test_5xx_gives_up_with_a_one_line_error():
    reg = FakeRegistry()
    reg.push_image("app", "1", [L1])
    reg.faults["/v2/app/manifests/1"] = Fault(status=502, times=99)
    with pytest.raises(RegistryError, match="answered HTTP 502 for manifest reg.test/app:1"):
        run(_resolve(reg, f"{HOST}/app:1"))
    assert len(reg.requests) == 4


def test_rate_limit_honours_retry_after_bounded():
    reg = FakeRegistry()
    reg.push_image("app", "1", [L1])
    reg.faults["/v2/app/manifests/1"] = Fault(status=429, times=1,
                                              headers={"retry-after": "0"})
    res, stats = run(_resolve(reg, f"{HOST}/app:1"))
    assert res.layers and stats.retries == 1


def test_unreachable_registry_is_bounded_and_one_line():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now

    async def go():
        ref = parse_reference(f"127.0.0.1:{port}/app:1")
        async with RegistryClient(ref, credentials=lambda _r: None, backoff_s=0.01) as c:
            await resolve(c, ref, None)

    t0 = time.monotonic()
    with pytest.raises(UnreachableError) as ei:
        run(go())
    assert time.monotonic() - t0 < 5
    assert str(ei.value) == (f"cannot reach registry 127.0.0.1:{port} (connection refused); "
                             "check the address, the network and proxy settings")


def test_proxy_from_environment(monkeypatch):
    """HTTPS_PROXY/HTTP_PROXY are honoured (httpx), NO_PROXY exempts hosts."""
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.invalid:3128")
    ref = parse_reference("127.0.0.1:5/app")
    c = RegistryClient(ref, credentials=lambda _r: None)
    try:
        assert c._http._transport_for_url(httpx.URL("http://127.0.0.1:5/v2/")) is not \
            c._http._transport
    finally:
        run(c.aclose())
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    c = RegistryClient(ref, credentials=lambda _r: None)
    try:
        assert c._http._transport_for_url(httpx.URL("http://127.0.0.1:5/v2/")) is \
            c._http._transport
    finally:
        run(c.aclose())


def test_parallel_downloads_are_bounded(tmp_path):
    reg = FakeRegistry()
    layers = [layer(f(f"f{i}", str(i) * 1000)) for i in range(6)]
    reg.push_image("app", "1", layers)
    live = 0
    peak = 0
    inner = reg._handle

    async def slow(req):
        nonlocal live, peak
        if "/blobs/" in req.url.path:
            live += 1
            peak = max(peak, live)
            await asyncio.sleep(0.02)
            live -= 1
        return await inner(req)

    reg._handle = slow
    _, got, _ = run(_download(reg, f"{HOST}/app:1", None, tmp_path, parallel=3))
    assert len(got) == 6 and peak == 3


def test_redirected_blobs_do_not_carry_credentials(tmp_path):
    """Registries redirect blob GETs to CDNs; the token must not follow."""
    reg = FakeRegistry(auth="bearer")
    reg.push_image("app", "1", [L1])
    res, _ = run(_resolve(reg, f"{HOST}/app:1", creds=Credentials("u", "p")))
    d = res.layers[0].digest
    seen: list[httpx.Request] = []
    inner = reg._handle

    async def cdn(req):
        if req.url.host == "cdn.test":
            seen.append(req)
            return await inner(httpx.Request("GET", f"https://{HOST}/v2/app/blobs/{d}",
                                             headers={"authorization": "Bearer tok-good"}))
        if req.url.path.endswith(d):
            return httpx.Response(307, headers={"location": f"https://cdn.test/b/{d}?sig=1"})
        return await inner(req)

    reg._handle = cdn

    async def go():
        async with client(reg, f"{HOST}/app:1", Credentials("u", "p")) as c:
            res = await resolve(c, parse_reference(f"{HOST}/app:1"), None)
            return await fetch_layers(c, list(res.layers), tmp_path, PullProgress())

    got = run(go())
    assert got[d].read_bytes() == reg.blobs[d]
    assert seen and all("authorization" not in r.headers for r in seen)


def test_no_credentials_to_a_plain_http_token_service():
    reg = FakeRegistry(auth="bearer")
    reg.push_image("app", "1", [L1])
    inner = reg._handle

    async def plain_realm(req):
        resp = await inner(req)
        if resp.status_code == 401:
            resp.headers["www-authenticate"] = 'Bearer realm="http://evil.test/token"'
        return resp

    reg._handle = plain_realm
    with pytest.raises(RegistryError, match="refusing to send credentials there"):
        run(_resolve(reg, f"{HOST}/app:1", creds=Credentials("u", "p")))
    assert not [r for r in reg.requests if r.url.host == "evil.test"]
