"""Reference parsing (docker grammar, Docker Hub defaults) and platform selection."""

from __future__ import annotations

import pytest

from matchlock.errors import UsageError
from matchlock.image import Platform, parse_reference
from matchlock.image._platform import listing, pick

H = "sha256:" + "ab" * 32


@pytest.mark.parametrize("text, registry, repo, tag, digest, name", [
    ("alpine", "docker.io", "library/alpine", "latest", None, "alpine:latest"),
    ("alpine:3.19", "docker.io", "library/alpine", "3.19", None, "alpine:3.19"),
    ("docker.io/library/alpine", "docker.io", "library/alpine", "latest", None,
     "alpine:latest"),
    ("index.docker.io/foo/bar:1", "docker.io", "foo/bar", "1", None, "foo/bar:1"),
    ("foo/bar", "docker.io", "foo/bar", "latest", None, "foo/bar:latest"),
    ("ghcr.io/org/app:v1", "ghcr.io", "org/app", "v1", None, "ghcr.io/org/app:v1"),
    (f"ghcr.io/org/app@{H}", "ghcr.io", "org/app", None, H, f"ghcr.io/org/app@{H}"),
    (f"ghcr.io/org/app:v1@{H}", "ghcr.io", "org/app", "v1", H, f"ghcr.io/org/app@{H}"),
    ("localhost:5000/app", "localhost:5000", "app", "latest", None,
     "localhost:5000/app:latest"),
    ("localhost/app", "localhost", "app", "latest", None, "localhost/app:latest"),
    ("[::1]:5000/a/b:c", "[::1]:5000", "a/b", "c", None, "[::1]:5000/a/b:c"),
    ("matchlock/busybox", "docker.io", "matchlock/busybox", "latest", None,
     "matchlock/busybox:latest"),
])
def test_parse(text, registry, repo, tag, digest, name):
    r = parse_reference(text)
    assert (r.registry, r.repository, r.tag, r.digest, r.name) == (
        registry, repo, tag, digest, name)
    assert parse_reference(r.name).name == r.name  # the store key parses to itself


@pytest.mark.parametrize("text", [
    "", " ", "UPPER", "a:", "a b", "a@sha256:00", "a@md5:" + "0" * 32, "-a", "a/../b",
    "a//b", "host:99999999/x", "a:" + "t" * 200, "x/" * 200 + "y",
])
def test_invalid(text):
    with pytest.raises(UsageError):
        parse_reference(text)


@pytest.mark.parametrize("text, plain, url", [
    ("alpine", False, "https://registry-1.docker.io/v2/library/alpine"),
    ("ghcr.io/o/a", False, "https://ghcr.io/v2/o/a"),
    ("localhost:5000/a", True, "http://localhost:5000/v2/a"),
    ("127.0.0.1:5000/a", True, "http://127.0.0.1:5000/v2/a"),
    ("127.8.9.1:5000/a", True, "http://127.8.9.1:5000/v2/a"),
    ("[::1]:5000/a", True, "http://[::1]:5000/v2/a"),
    ("reg.localhost:5000/a", True, "http://reg.localhost:5000/v2/a"),
    # Look-alikes of loopback are not loopback: TLS is required.
    ("127.0.0.1.nip.io/a", False, "https://127.0.0.1.nip.io/v2/a"),
    ("localhost.example.com/a", False, "https://localhost.example.com/v2/a"),
    ("10.0.0.1:5000/a", False, "https://10.0.0.1:5000/v2/a"),
    ("[::ffff:127.0.0.1]:5000/a", False, "https://[::ffff:127.0.0.1]:5000/v2/a"),
])
def test_plain_http_only_for_loopback(text, plain, url):
    r = parse_reference(text)
    assert r.plain_http is plain
    assert r.base_url == url


def test_platform_parse_and_match():
    assert str(Platform.parse("linux/arm64/v8")) == "linux/arm64/v8"
    assert Platform.parse("linux/x86_64") == Platform("linux", "amd64")
    arm64 = Platform.parse("linux/arm64")
    assert arm64.matches(Platform("linux", "arm64", "v8"))
    assert Platform.parse("linux/arm64/v8").matches(Platform("linux", "arm64"))
    assert not Platform.parse("linux/arm/v7").matches(Platform("linux", "arm", "v6"))
    assert not Platform.parse("linux/amd64").matches(Platform("windows", "amd64"))
    for bad in ("linux", "linux/", "/amd64", "a/b/c/d"):
        with pytest.raises(UsageError):
            Platform.parse(bad)


def test_pick_prefers_exact_variant_and_skips_attestations():
    descs = [
        {"digest": "att", "platform": {"os": "unknown", "architecture": "unknown"}},
        {"digest": "v7", "platform": {"os": "linux", "architecture": "arm", "variant": "v7"}},
        {"digest": "arm64", "platform": {"os": "linux", "architecture": "arm64"}},
        {"digest": "v8", "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
        {"digest": "amd", "platform": {"os": "linux", "architecture": "amd64"}},
    ]
    assert pick(descs, Platform.parse("linux/amd64"))["digest"] == "amd"
    assert pick(descs, Platform.parse("linux/arm64/v8"))["digest"] == "v8"
    assert pick(descs, Platform.parse("linux/arm64"))["digest"] == "arm64"
    assert pick(descs, Platform.parse("linux/arm/v7"))["digest"] == "v7"
    assert pick(descs, Platform.parse("linux/s390x")) is None
    assert pick(descs, Platform("unknown", "unknown")) is None
    assert listing(descs) == "linux/amd64, linux/arm/v7, linux/arm64, linux/arm64/v8"
