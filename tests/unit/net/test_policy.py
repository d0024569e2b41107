"""Policy engine: glob matrix, blocked ranges, runtime allow-list, secrets, DNS bookkeeping."""

from __future__ import annotations

import pytest

from matchlock.errors import UsageError
from matchlock.net.policy import Policy, match_glob, normalise_host
from matchlock.net.types import NetEvent, NetworkConfig, Secret


def pol(mode="intercept", allow=(), add=(), secrets=(), allow_private=False, **kw):
    cfg = NetworkConfig(mode=mode, allow_hosts=tuple(allow), add_hosts=tuple(add),
                        secrets=tuple(secrets), allow_private=allow_private)
    return Policy(cfg, **kw)


GLOBS = [
    # glob, host, expected
    ("*", "anything.example", True),
    ("*", "1.2.3.4", True),
    ("example.com", "example.com", True),
    ("example.com", "EXAMPLE.com.", True),
    ("example.com", "example.com:443", True),
    ("example.com", "www.example.com", False),
    ("example.com", "example.com.evil", False),
    ("*.example.com", "a.example.com", True),
    ("*.example.com", "a.b.c.example.com", True),
    ("*.example.com", "example.com", False),
    ("*.example.com", "evilexample.com", False),
    ("*.example.com", "example.com.evil.com", False),
    ("example.*", "example.com", True),
    ("example.*", "example.co.uk", True),
    ("example.*", "example", False),
    ("example.*", "examplex.com", False),
    ("api-*.x.com", "api-1.x.com", True),
    ("api-*.x.com", "api-1-2.x.com", True),
    ("api-*.x.com", "api-.x.com", False),  # not a valid host name (label ends with '-')
    ("api-*.x.com", "api-a.b.x.com", False),  # '*' stays within one label
    ("api-*.x.com", "api.x.com", False),
    ("api.*.com", "api.foo.com", True),
    ("api.*.com", "api.evil.attacker.com", False),
    ("*.*.example.com", "a.b.example.com", True),
    ("*.*.example.com", "a.example.com", False),
    ("a*b.com", "ab.com", True),
    ("a*b.com", "axxb.com", True),
    ("1.2.3.4", "1.2.3.4", True),
    ("1.2.3.*", "1.2.3.99", True),
]


@pytest.mark.parametrize("glob,host,expected", GLOBS)
def test_glob_matrix(glob, host, expected):
    assert pol(allow=[glob]).host_allowed(host) is expected


def test_match_glob_exact_empty():
    assert match_glob("a.com", "a.com") and not match_glob("a.com", "")


@pytest.mark.parametrize("host", ["", "a..b", "a b.com", "a/b.com", "evil.com\x00.x.com",
                                  "-a.com", "é.com", "a" * 64 + ".com", "x." * 130])
def test_garbage_hosts_never_allowed(host):
    assert normalise_host(host) is None
    assert not pol(allow=["*"]).host_allowed(host)
    assert not pol(mode="open").host_allowed(host)


def test_normalise_host_ip_literals():
    assert normalise_host("[::1]:443") == "::1"
    assert normalise_host("2001:DB8::1") == "2001:db8::1"
    assert normalise_host("1.2.3.4:80") == "1.2.3.4"
    assert normalise_host("_srv.Example.COM.") == "_srv.example.com"


def test_modes():
    assert pol(mode="open").host_allowed("x.com")
    assert not pol(mode="none").host_allowed("x.com")
    assert not pol(mode="none").ip_allowed("8.8.8.8")
    p = pol(allow=[])
    assert p.allow_all and p.host_allowed("anything.com")
    assert not p.ip_allowed("10.0.0.1")  # private ranges still blocked
    assert not pol(allow=["a.com"]).host_allowed("b.com")


BLOCKED = ["0.0.0.0", "0.1.2.3", "10.0.0.1", "10.213.0.1", "100.64.0.1", "100.127.255.255",
           "127.0.0.1", "127.9.9.9", "169.254.169.254", "172.16.0.1", "172.31.255.255",
           "192.168.1.1", "224.0.0.1", "239.255.255.250", "240.0.0.1", "255.255.255.255",
           "::", "::1", "::ffff:10.0.0.1", "::ffff:127.0.0.1", "::ffff:169.254.169.254",
           "::10.0.0.1", "64:ff9b::808:808", "fc00::1", "fd12:3456::1", "fe80::1", "ff02::1",
           "2002:0a00:0001::1", "2001:0:4136:e378:8000:63bf:3fff:fdd2", "not-an-ip", ""]
ALLOWED = ["8.8.8.8", "1.1.1.1", "100.63.255.255", "100.128.0.0", "172.15.255.255",
           "172.32.0.0", "192.167.255.255", "169.253.0.1", "223.255.255.255",
           "::ffff:8.8.8.8", "2606:4700:4700::1111", "2002:0808:0808::1", "11.0.0.1"]


@pytest.mark.parametrize("ip", BLOCKED)
def test_blocked_ranges(ip):
    p = pol(mode="open")
    assert not p.ip_allowed(ip)
    assert "blocked" in p.block_reason_ip(ip, 22) or "not" in p.block_reason_ip(ip, 22)


@pytest.mark.parametrize("ip", ALLOWED)
def test_public_ranges(ip):
    assert pol(mode="open").ip_allowed(ip)
    assert pol(allow=["x.com"]).ip_allowed(ip)


def test_allow_private_keeps_reserved_blocked():
    p = pol(mode="open", allow_private=True)
    assert p.ip_allowed("10.0.0.1") and p.ip_allowed("127.0.0.1") and p.ip_allowed("::1")
    assert p.ip_allowed("::ffff:192.168.0.1")
    for ip in ("0.0.0.0", "224.0.0.1", "255.255.255.255", "ff02::1"):
        assert not p.ip_allowed(ip)


def test_add_host_ip_exactly_allowed():
    p = pol(allow=["a.com"], add=[("db.internal", "10.1.2.3"), ("v6", "fd00::5")])
    assert p.ip_allowed("10.1.2.3") and p.ip_allowed("fd00::5")
    assert not p.ip_allowed("10.1.2.4")
    assert p.ips_for_host("DB.internal.") == ["10.1.2.3"]
    assert p.host_for_ip("10.1.2.3") == "db.internal"
    assert not p.host_allowed("db.internal")  # add-host does not imply allow


def test_block_reasons():
    p = pol(allow=["a.com"])
    assert p.block_reason_host("Evil.test:443") == (
        "host evil.test is not allowed by this sandbox's network policy; "
        "allow it with --allow-host evil.test")
    r = p.block_reason_ip("10.0.0.5", 22)
    assert "10.0.0.5:22" in r and "10.0.0.0/8" in r and "--add-host" in r
    assert "[::1]:443" in p.block_reason_ip("::1", 443)
    assert "10.0.0.0/8" in p.block_reason_ip("::ffff:10.0.0.1", 80)
    assert "--allow-host 8.8.8.8" in p.block_reason_ip("8.8.8.8", 22)


def test_runtime_allow_list():
    events: list[NetEvent] = []
    p = pol(allow=["a.com"], emit=events.append)
    assert p.add_allowed(["B.com", "a.com", "b.com", "*.c.com", " "]) == ["b.com", "*.c.com"]
    assert p.allow_hosts == ("a.com", "b.com", "*.c.com")
    assert p.host_allowed("x.c.com") and p.host_allowed("b.com")
    assert p.remove_allowed(["b.com", "nope.com", "bad..glob"]) == ["b.com"]
    assert not p.host_allowed("b.com")
    assert [e.kind for e in events] == ["allow_list_changed", "allow_list_changed"]
    assert events[0].fields["added"] == ["b.com", "*.c.com"]
    with pytest.raises(UsageError, match="invalid --allow-host glob"):
        p.add_allowed(["a..b"])
    # emptying a list that was in force blocks everything (the reference reopened egress)
    assert p.remove_allowed(["a.com", "*.c.com"]) == ["a.com", "*.c.com"]
    assert p.allow_hosts == () and not p.allow_all
    assert not p.host_allowed("a.com")


def test_runtime_allow_list_from_empty():
    p = pol(allow=[])
    assert p.host_allowed("z.com")
    p.add_allowed(["a.com"])
    assert not p.host_allowed("z.com") and p.host_allowed("a.com")


def test_runtime_allow_list_needs_intercept():
    for mode in ("open", "none"):
        with pytest.raises(UsageError, match="network interception"):
            pol(mode=mode).add_allowed(["a.com"])


def test_secrets_for_host():
    s1 = Secret("A", "va", ("api.a.com",), "SANDBOX_SECRET_" + "1" * 32)
    s2 = Secret("B", "vb", ("*.b.com", "x.com"), "SANDBOX_SECRET_" + "2" * 32)
    s3 = Secret("C", "vc", (), "SANDBOX_SECRET_" + "3" * 32)
    p = pol(allow=["*"], secrets=[s1, s2, s3])
    assert p.secrets_for_host("API.a.com:443") == [s1]
    assert p.secrets_for_host("q.b.com") == [s2]
    assert p.secrets_for_host("x.com") == [s2]
    assert p.secrets_for_host("b.com") == []
    assert p.secrets_for_host("evil.com") == []  # a secret without hosts goes nowhere
    assert p.all_secrets() == (s1, s2, s3)


def test_dns_bookkeeping_expiry():
    now = [1000.0]
    p = pol(allow=["*"], clock=lambda: now[0])
    assert p.ips_for_host("a.com") is None
    p.record_answer("A.com.", ["93.184.216.34", "93.184.216.35"], 30)
    assert p.ips_for_host("a.com") == ["93.184.216.34", "93.184.216.35"]
    assert p.host_for_ip("93.184.216.35") == "a.com"
    p.record_answer("b.com", ["93.184.216.35"], 30)
    assert p.host_for_ip("93.184.216.35") == "b.com"
    now[0] += 30 + 299
    assert p.ips_for_host("a.com") is not None
    now[0] += 2
    assert p.ips_for_host("a.com") is None
    assert p.host_for_ip("93.184.216.35") is None


def test_dns_bookkeeping_bounded():
    from matchlock.net import policy as mod
    p = pol(allow=["*"])
    for i in range(mod.MAX_RECORDED_NAMES + 10):
        p.record_answer(f"n{i}.com", ["8.8.8.8"], 60)
    assert p.ips_for_host("n0.com") is None
    assert p.ips_for_host(f"n{mod.MAX_RECORDED_NAMES + 9}.com") == ["8.8.8.8"]
    assert len(p._answers) == mod.MAX_RECORDED_NAMES
