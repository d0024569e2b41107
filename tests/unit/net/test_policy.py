"""Policy engine: glob matrix, blocked ranges, runtime allow-list, secrets, DNS bookkeeping."""

from __future__ import annotations

import ipaddress

import pytest

from matchlock.errors import UsageError
from matchlock.net.config import parse_private_exceptions
from matchlock.net.hostaddrs import StaticHostAddresses
from matchlock.net.policy import Policy, match_glob, normalise_host
from matchlock.net.types import NetEvent, NetworkConfig, Secret

# The host as these tests see it: loopback, a documentation-range main address, a public
# address of its own, and an AnyIP prefix.
HOST = ("127.0.0.0/8", "::1/128", "192.0.2.2/32", "93.184.216.1/32", "2606:2800::1/128",
        "198.51.100.0/28")


def pol(mode="intercept", allow=(), add=(), secrets=(), private=(), legacy=False,
        host=HOST, **kw):
    cfg = NetworkConfig(mode=mode, allow_hosts=tuple(allow), add_hosts=tuple(add),
                        secrets=tuple(secrets), allow_private=parse_private_exceptions(private),
                        allow_private_ranges=legacy)
    return Policy(cfg, host_addresses=StaticHostAddresses(host), **kw)


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
    assert not pol(mode="none").ip_allowed("8.8.8.8", 443)
    assert "no network" in pol(mode="none").block_reason_ip("8.8.8.8", 443)
    p = pol(allow=[])
    assert p.allow_all and p.host_allowed("anything.com")
    assert not p.ip_allowed("10.0.0.1", 80)  # private ranges still blocked
    assert not pol(allow=["a.com"]).host_allowed("b.com")


BLOCKED = ["0.0.0.0", "0.1.2.3", "10.0.0.1", "10.213.0.1", "100.64.0.1", "100.127.255.255",
           "127.0.0.1", "127.9.9.9", "169.254.169.254", "172.16.0.1", "172.31.255.255",
           "192.0.0.1", "192.0.0.8", "192.0.0.170", "192.0.2.1", "192.88.99.1",
           "192.168.1.1", "198.18.0.5", "198.19.255.255", "198.51.100.77", "203.0.113.9",
           "224.0.0.1", "239.255.255.250", "240.0.0.1", "255.255.255.254", "255.255.255.255",
           "::", "::1", "::ffff:10.0.0.1", "::ffff:127.0.0.1", "::ffff:169.254.169.254",
           "::ffff:0.0.0.0", "::ffff:198.18.0.1", "::10.0.0.1", "::8.8.8.8",
           "64:ff9b::a00:1", "64:ff9b::7f00:1", "64:ff9b:1::808:808", "100::1", "100:0:0:1::1",
           "2001:db8::1", "3fff::1", "5f00::1", "fec0::1", "fc00::1", "fd12:3456::1",
           "fe80::1", "fe80::1%eth0", "ff02::1", "2001:2::1", "2001:10::1",
           "2002:0a00:0001::1", "2002:7f00:1::1", "2001:0:4136:e378:8000:63bf:3fff:fdd2",
           "4000::1", "1::", "not-an-ip", "", "1.2.3", "::ffff:192.0.2.2"]
# the IANA registry's globally reachable exceptions inside blocked ranges stay open
ALLOWED = ["8.8.8.8", "1.1.1.1", "100.63.255.255", "100.128.0.0", "172.15.255.255",
           "172.32.0.0", "192.167.255.255", "169.253.0.1", "223.255.255.255", "198.17.255.255",
           "198.20.0.0", "192.0.0.9", "192.0.0.10", "192.0.1.1", "192.0.3.0", "11.0.0.1",
           "::ffff:8.8.8.8", "64:ff9b::808:808", "2606:4700:4700::1111", "2002:0808:0808::1",
           "2001:1::1", "2001:3::1", "2001:4:112::1", "2001:20::1", "2001:200::1",
           "3fff:1000::1", "2a00:1450::1"]


@pytest.mark.parametrize("ip", BLOCKED)
def test_blocked_ranges(ip):
    for p in (pol(mode="open"), pol(allow=["*"])):
        assert not p.ip_allowed(ip, 80)
        assert not p.ip_allowed(ip, 80, "x.com")
        assert not p.answer_allowed(ip, "x.com")
        r = p.block_reason_ip(ip, 80)
        assert "--allow-host" not in r and ("--allow-private" in r or "never" in r
                                            or "not a valid" in r), r


@pytest.mark.parametrize("ip", ALLOWED)
def test_public_ranges(ip):
    assert pol(mode="open").ip_allowed(ip, 443)
    assert pol(allow=["x.com"]).ip_allowed(ip, 443)
    assert pol(mode="open").answer_allowed(ip, "x.com")


@pytest.mark.parametrize("ip", ["93.184.216.1", "2606:2800::1", "::ffff:93.184.216.1",
                                "64:ff9b::5db8:d801", "2002:5db8:d801::1", "198.51.100.3",
                                "127.0.0.1", "192.0.2.2"])
def test_host_local_addresses_need_the_exact_address(ip):
    """An address of this host, even a public one, in any form: only an exception naming
    exactly that address opens it; a network, a name or the legacy switch never does."""
    target = {"::ffff:93.184.216.1": "93.184.216.1", "64:ff9b::5db8:d801": "93.184.216.1",
              "2002:5db8:d801::1": "93.184.216.1"}.get(ip, ip)
    wide = {"93.184.216.1": "93.184.216.0/24", "127.0.0.1": "127.0.0.0/8",
            "198.51.100.3": "198.51.100.0/24", "192.0.2.2": "0.0.0.0/0"}.get(target, "::/0")
    for p in (pol(mode="open"), pol(allow=["*"]), pol(mode="open", legacy=True),
              pol(mode="open", private=[wide, "host.test"], add=[("host.test", ip)])):
        assert not p.ip_allowed(ip, 8080, "host.test"), p
        r = p.block_reason_ip(ip, 8080)
        assert "is an address of this host" in r, r
        exact = f"[{target}]:8080" if ":" in target else f"{target}:8080"
        assert r.endswith(f"--allow-private {exact}"), r
    p = pol(mode="open", private=[f"[{target}]:8080" if ":" in target else f"{target}:8080"])
    assert p.ip_allowed(ip, 8080)
    assert not p.ip_allowed(ip, 8081)  # the port too
    assert pol(mode="open", private=[target]).ip_allowed(ip, 1)


def test_host_local_view_is_asked_at_each_check():
    """Decided at dial time: an address the host gains later is blocked from then on."""
    class Growing:
        def __init__(self):
            self.local: set[str] = set()

        def local_any(self, addrs):
            return any(str(ipaddress.ip_address(value) if version == 4
                           else ipaddress.IPv6Address(value)) in self.local
                       for version, value in addrs)

        def close(self):
            pass

    view = Growing()
    p = Policy(NetworkConfig(mode="open"), host_addresses=view)
    assert p.ip_allowed("93.184.216.34", 80)
    view.local.add("93.184.216.34")
    assert not p.ip_allowed("93.184.216.34", 80)
    assert not p.ip_allowed("::ffff:93.184.216.34", 80)


def test_failing_host_view_fails_closed():
    class Broken:
        def local_any(self, addrs):
            raise OSError("netlink gone")

        def close(self):
            pass

    p = Policy(NetworkConfig(mode="open"), host_addresses=Broken())
    assert not p.ip_allowed("8.8.8.8", 443)
    assert p.block_reason_ip("8.8.8.8", 443) == (
        "address 8.8.8.8:443 is refused: this host's own addresses cannot be read from the "
        "kernel (netlink gone)")
    p.close()
    q = Policy(NetworkConfig(mode="open"))
    assert q.ip_allowed("8.8.8.8", 443)
    q.close()  # a closed view refuses rather than reopening
    assert not q.ip_allowed("8.8.8.8", 443)


@pytest.mark.parametrize("ip", ["0.0.0.0", "0.1.2.3", "::", "::ffff:0.0.0.0", "64:ff9b::",
                                "224.0.0.1", "255.255.255.255", "ff02::1", "::10.0.0.1"])
def test_never_dialled_whatever_the_exceptions(ip):
    p = pol(mode="open", private=["0.0.0.0/0", "::/0", "127.0.0.1", "::1", "x.test"],
            legacy=True, add=[("x.test", ip)])
    assert not p.ip_allowed(ip, 80, "x.test")
    assert not p.answer_allowed(ip, "x.test")
    assert "never dialled" in p.block_reason_ip(ip, 80)


def test_exceptions_open_exactly_what_they_name():
    p = pol(mode="open", private=["10.1.2.3", "172.16.0.0/12:5432", "db.internal:6379",
                                  "[fd00::5]:80", "::ffff:192.168.7.7"],
            add=[("db.internal", "10.9.9.9"), ("db.internal", "10.9.9.10")])
    assert p.ip_allowed("10.1.2.3", 1) and p.ip_allowed("10.1.2.3", 65535)
    assert p.ip_allowed("::ffff:10.1.2.3", 80)  # the same address, IPv4-mapped
    assert not p.ip_allowed("10.1.2.4", 80)
    assert p.ip_allowed("172.20.1.1", 5432) and not p.ip_allowed("172.20.1.1", 5433)
    # a name entry opens the addresses that name resolves to, on its port only
    assert p.ip_allowed("10.9.9.9", 6379) and p.ip_allowed("10.9.9.10", 6379)
    assert p.ip_allowed("10.9.9.9", 6379, "db.internal")
    assert not p.ip_allowed("10.9.9.9", 6380)
    assert not p.ip_allowed("10.9.9.11", 6379)
    assert p.ip_allowed("fd00::5", 80) and not p.ip_allowed("fd00::5", 81)
    assert not p.ip_allowed("fd00::6", 80)
    assert p.ip_allowed("192.168.7.7", 80) and not p.ip_allowed("192.168.7.8", 80)
    # other special ranges stay closed
    for ip in ("198.18.0.1", "169.254.169.254", "100.64.0.1"):
        assert not p.ip_allowed(ip, 80)


def test_name_exception_follows_dns_answers():
    p = pol(allow=["*"], private=["api.corp"])
    assert p.answer_allowed("10.5.5.5", "api.corp")
    assert not p.answer_allowed("10.5.5.5", "evil.test")
    p.record_answer("api.corp", ["10.5.5.5"], 60)
    assert p.ip_allowed("10.5.5.5", 443)  # a relayed connection: the name is looked up
    assert p.ip_allowed("10.5.5.6", 443, "API.corp.")  # the name the proxy resolved
    assert not p.ip_allowed("10.5.5.6", 443)
    assert not p.ip_allowed("127.0.0.1", 443, "api.corp")  # never the host itself


def test_legacy_switch_lifts_only_the_reference_private_set():
    p = pol(mode="open", legacy=True)
    for ip in ("10.0.0.1", "172.16.0.1", "192.168.0.1", "169.254.169.254", "fd00::1",
               "fe80::1", "::ffff:192.168.0.1"):
        assert p.ip_allowed(ip, 80), ip
    for ip in ("127.0.0.1", "::1", "192.0.2.2", "100.64.0.1", "198.18.0.1", "0.0.0.0",
               "224.0.0.1", "255.255.255.255", "ff02::1", "2001:db8::1"):
        assert not p.ip_allowed(ip, 80), ip


def test_add_host_addresses_get_no_pass():
    p = pol(allow=["a.com"], add=[("db.internal", "10.1.2.3"), ("v6", "fd00::5"),
                                  ("hole", "0.0.0.0"), ("me", "192.0.2.2")])
    for ip in ("10.1.2.3", "fd00::5", "0.0.0.0", "192.0.2.2"):
        assert not p.ip_allowed(ip, 80)
    assert not p.ip_allowed("0.0.0.0", 80, "hole")
    assert p.ips_for_host("DB.internal.") == ["10.1.2.3"]
    assert p.host_for_ip("10.1.2.3") == "db.internal"
    assert not p.host_allowed("db.internal")  # add-host does not imply allow
    p = pol(allow=["a.com"], add=[("db.internal", "10.1.2.3")], private=["db.internal"])
    assert p.ip_allowed("10.1.2.3", 5432)


def test_block_reasons():
    p = pol(allow=["a.com"])
    assert p.block_reason_host("Evil.test:443") == (
        "host evil.test is not allowed by this sandbox's network policy; "
        "allow it with --allow-host evil.test")
    assert p.block_reason_ip("198.18.0.5", 80) == (
        "address 198.18.0.5:80 is in 198.18.0.0/15 (benchmarking), a special-use range this "
        "sandbox may not reach; allow it with --allow-private 198.18.0.5:80")
    assert p.block_reason_ip("10.0.0.5", 22) == (
        "address 10.0.0.5:22 is in 10.0.0.0/8 (private-use), a private range this sandbox "
        "may not reach; allow it with --allow-private 10.0.0.5:22")
    assert p.block_reason_ip("192.0.2.2", 8080) == (
        "address 192.0.2.2:8080 is an address of this host, which a sandbox may not reach; "
        "allow exactly this address with --allow-private 192.0.2.2:8080")
    assert p.block_reason_ip("::1", 443).endswith("--allow-private [::1]:443")
    assert "[::1]:443" in p.block_reason_ip("::1", 443)
    r = p.block_reason_ip("::ffff:10.0.0.1", 80)
    assert r.startswith("address [::ffff:a00:1]:80 carries 10.0.0.1 (::ffff:0:0/96 "
                        "(IPv4-mapped)), which is in 10.0.0.0/8"), r
    assert r.endswith("--allow-private 10.0.0.1:80"), r
    assert p.block_reason_ip("0.0.0.0", 80) == (
        'address 0.0.0.0:80 is in 0.0.0.0/8 ("this network": dialling it reaches the host '
        "itself) and is never dialled; to reach a service on the host's loopback name it "
        "exactly, e.g. --allow-private 127.0.0.1:PORT")
    assert p.block_reason_ip("10.0.0.5", None).endswith("--allow-private 10.0.0.5")
    assert "--allow-host 8.8.8.8" in p.block_reason_ip("8.8.8.8", 22)
    assert "not a valid IP address" in p.block_reason_ip("nope", 22)


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
