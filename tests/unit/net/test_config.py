"""CLI network flag parsing: modes, globs, secrets, add-host, DNS servers, MTU."""

from __future__ import annotations

import re

import pytest

from matchlock.errors import UsageError
from matchlock.net.config import (
    host_resolvers,
    new_placeholder,
    parse_network_flags,
    parse_private_exceptions,
)
from matchlock.net.types import DEFAULT_DNS_SERVERS, PrivateException


def parse(**kw):
    args = dict(no_network=False, allow_hosts=[], add_hosts=[], secrets=[], dns_servers=[],
                network_intercept=False, mtu=1500, host_env={})
    args.update(kw)
    return parse_network_flags(**args)


def test_placeholder_shape():
    a, b = new_placeholder(), new_placeholder()
    assert re.fullmatch(r"SANDBOX_SECRET_[0-9a-f]{32}", a)
    assert a != b


def test_defaults_open():
    c = parse()
    assert c.mode == "open"
    assert c.allow_hosts == () and c.secrets == () and c.add_hosts == ()
    assert c.dns_servers == host_resolvers() and c.mtu == 1500


def test_host_resolvers(tmp_path):
    conf = tmp_path / "resolv.conf"
    conf.write_text("# comment\nnameserver 10.1.2.3\nnameserver fe80::1%eth0\n"
                    "nameserver bogus\nnameserver 10.1.2.3\nsearch x\n")
    assert host_resolvers(str(conf)) == ("10.1.2.3", "fe80::1")
    conf.write_text("search only\n")
    assert host_resolvers(str(conf)) == DEFAULT_DNS_SERVERS
    assert host_resolvers(str(tmp_path / "missing")) == DEFAULT_DNS_SERVERS


def test_modes():
    assert parse(no_network=True).mode == "none"
    assert parse(allow_hosts=["a.com"]).mode == "intercept"
    assert parse(network_intercept=True).mode == "intercept"
    assert parse(secrets=["K=v@a.com"]).mode == "intercept"
    assert parse(allow_hosts=["", " , "]).mode == "open"


@pytest.mark.parametrize("flag,kw", [
    ("--allow-host", {"allow_hosts": ["a.com"]}),
    ("--secret", {"secrets": ["K=v@a.com"]}),
    ("--network-intercept", {"network_intercept": True}),
    ("--allow-private", {"allow_private": ["10.0.0.1"]}),
])
def test_no_network_conflicts(flag, kw):
    with pytest.raises(UsageError, match=f"--no-network cannot be combined with {flag}"):
        parse(no_network=True, **kw)


def test_no_network_allows_add_host_and_dns():
    c = parse(no_network=True, add_hosts=["db:10.0.0.1"], dns_servers=["1.1.1.1"])
    assert c.mode == "none" and c.add_hosts == (("db", "10.0.0.1"),)


def test_allow_hosts_comma_repeat_normalise():
    c = parse(allow_hosts=["A.com, *.b.COM.", "", "c.com:443,a.com", "api-*.x.com"])
    assert c.allow_hosts == ("a.com", "*.b.com", "c.com", "api-*.x.com")


@pytest.mark.parametrize("bad", [
    "a..com", ".a.com", "**.a.com", "a_b.com", "a b.com", "a/b", ".", "a.com/x", "é.com",
    "x" * 64 + ".com", "a:b:c",
])
def test_invalid_globs(bad):
    with pytest.raises(UsageError, match=r"invalid --allow-host glob"):
        parse(allow_hosts=[bad])


def test_valid_globs():
    c = parse(allow_hosts=["*", "*.a.com", "a.*", "api-*-*.x.com", "1.2.3.4", "x-1.y"])
    assert c.allow_hosts == ("*", "*.a.com", "a.*", "api-*-*.x.com", "1.2.3.4", "x-1.y")


def test_secret_from_env_multi_host():
    c = parse(secrets=["TOKEN@a.com,b.com"], host_env={"TOKEN": "s3cr3t"})
    (s,) = c.secrets
    assert s.name == "TOKEN" and s.value == "s3cr3t" and s.hosts == ("a.com", "b.com")
    assert re.fullmatch(r"SANDBOX_SECRET_[0-9a-f]{32}", s.placeholder)
    assert c.allow_hosts == ("a.com", "b.com")
    assert c.mode == "intercept"


def test_secret_value_with_at_comma_equals():
    c = parse(secrets=["K=p@ss,w=rd@api.x.com,*.y.com"])
    (s,) = c.secrets
    assert s.value == "p@ss,w=rd" and s.hosts == ("api.x.com", "*.y.com")


def test_secret_hosts_appended_dedup():
    c = parse(allow_hosts=["a.com"], secrets=["K=v@A.com,b.com", "L=w@c.com"])
    assert c.allow_hosts == ("a.com", "b.com", "c.com")
    assert [s.name for s in c.secrets] == ["K", "L"]


def test_secret_env_unset_or_empty():
    msg = ("--secret TOKEN: TOKEN is not set in the host environment; "
           "export it or use TOKEN=VALUE@host")
    with pytest.raises(UsageError, match=re.escape(msg)):
        parse(secrets=["TOKEN@a.com"])
    with pytest.raises(UsageError, match="not set"):
        parse(secrets=["TOKEN@a.com"], host_env={"TOKEN": ""})


@pytest.mark.parametrize("raw,match", [
    ("K=hunter2", "malformed --secret 'K'"),
    ("K=hunter2@", "no hosts after '@'"),
    ("K=hunter2@ , ", "no hosts after '@'"),
    ("=hunter2@a.com", "not a valid environment variable name"),
    ("1K=hunter2@a.com", "not a valid environment variable name"),
    ("K-X=hunter2@a.com", "not a valid environment variable name"),
    ("K=@a.com", "value after '=' is empty"),
    ("K=hunter2@a..com", "invalid --secret K host glob"),
    ("A@x,B@y", "not a valid environment variable name"),
])
def test_secret_errors_never_show_value(raw, match):
    with pytest.raises(UsageError, match=re.escape(match)) as ei:
        parse(secrets=[raw])
    assert "hunter2" not in str(ei.value)


def test_secret_twice():
    with pytest.raises(UsageError, match="more than once"):
        parse(secrets=["K=a@x.com", "K=b@y.com"])


def test_add_host():
    c = parse(add_hosts=["Db.Internal:10.1.2.3, v6:2001:0db8:0:0::10", "b:[::1]"])
    assert c.add_hosts == (("db.internal", "10.1.2.3"), ("v6", "2001:db8::10"), ("b", "::1"))
    assert c.mode == "open"


@pytest.mark.parametrize("bad", [
    "nohost", ":1.2.3.4", "h:", "h:not-an-ip", "h h:1.2.3.4", "h:1.2.3.4.5", "h:999.1.1.1",
    "*.x:1.2.3.4",
])
def test_add_host_malformed(bad):
    with pytest.raises(UsageError, match=re.escape(f"malformed --add-host {bad.strip()!r}")):
        parse(add_hosts=[bad])


def test_dns_servers():
    assert parse(dns_servers=["1.1.1.1,2606:4700:4700::1111", "1.1.1.1"]).dns_servers == (
        "1.1.1.1", "2606:4700:4700::1111")
    with pytest.raises(UsageError, match="invalid --dns-servers entry 'dns.google'"):
        parse(dns_servers=["dns.google"])


@pytest.mark.parametrize("mtu", [0, -1, 575, 65536, True])
def test_mtu_bad(mtu):
    with pytest.raises(UsageError, match="invalid --mtu"):
        parse(mtu=mtu)


@pytest.mark.parametrize("mtu", [576, 1400, 65535])
def test_mtu_ok(mtu):
    assert parse(mtu=mtu).mtu == mtu


def test_public_view_has_no_values():
    c = parse(secrets=["K=hunter2@a.com"])
    assert "hunter2" not in repr(c) and "hunter2" not in repr(c.public_view())


@pytest.mark.parametrize("raw,want", [
    ("10.1.2.3", PrivateException(net="10.1.2.3/32")),
    ("10.1.2.3:5432", PrivateException(net="10.1.2.3/32", port=5432)),
    ("10.0.0.0/8", PrivateException(net="10.0.0.0/8")),
    ("198.18.0.0/15:80", PrivateException(net="198.18.0.0/15", port=80)),
    ("fd00::1", PrivateException(net="fd00::1/128")),
    ("[fd00::1]", PrivateException(net="fd00::1/128")),
    ("[fd00::1]:80", PrivateException(net="fd00::1/128", port=80)),
    ("fd00::/8", PrivateException(net="fd00::/8")),
    ("[fd00::/8]:443", PrivateException(net="fd00::/8", port=443)),
    ("::ffff:10.1.2.3", PrivateException(net="10.1.2.3/32")),  # the IPv4 it is dialled as
    ("::ffff:10.0.0.0/104", PrivateException(net="10.0.0.0/8")),
    ("DB.Internal.", PrivateException(host="db.internal")),
    ("db.internal:6379", PrivateException(host="db.internal", port=6379)),
    ("0.0.0.0/0", PrivateException(net="0.0.0.0/0")),
])
def test_allow_private_entries(raw, want):
    assert parse_private_exceptions([raw]) == (want,)
    # the canonical text parses back to the same entry
    assert parse_private_exceptions([str(want)]) == (want,)


@pytest.mark.parametrize("raw,why", [
    ("0.0.0.0", "never dialled"), ("0.0.0.0:80", "never dialled"), ("::", "never dialled"),
    ("0.0.0.0/8", "never dialled"), ("224.0.0.0/4", "never dialled"),
    ("255.255.255.255", "never dialled"), ("ff02::1", "never dialled"),
    ("10.1.2.3/8", "host bits set; did you mean 10.0.0.0/8?"),
    ("10.0.0.1:0", "port must be 1 to 65535"), ("10.0.0.1:65536", "port must be 1 to 65535"),
    ("localhost", "never opens an address of this host"),
    ("x.localhost:80", "never opens an address of this host"),
    ("*.corp", "use IP, CIDR or HOST"), ("a b", "use IP, CIDR or HOST"),
    ("1.2.3.4/33", "use IP, CIDR or HOST"), ("10.1", "use IP, CIDR or HOST"),
    ("[::1", "use IP, CIDR or HOST"), (":80", "use IP, CIDR or HOST"),
])
def test_allow_private_bad(raw, why):
    with pytest.raises(UsageError) as e:
        parse_private_exceptions([raw], "--allow-private")
    msg = str(e.value)
    assert msg.startswith(f"invalid --allow-private entry {raw!r}: ") and why in msg, msg
    assert "\n" not in msg


def test_allow_private_from_flags_and_environment():
    c = parse(allow_private=["10.0.0.1, 10.0.0.2", "10.0.0.1", "db:5432"],
              env_allow_private="198.18.0.5,10.0.0.2")
    assert [str(e) for e in c.allow_private] == ["198.18.0.5", "10.0.0.2", "10.0.0.1",
                                                 "db:5432"]
    assert c.public_view()["allow_private"] == ["198.18.0.5", "10.0.0.2", "10.0.0.1",
                                                "db:5432"]
    assert c.allow_private_ranges is False  # the CLI never sets the legacy switch
    with pytest.raises(UsageError, match="invalid MATCHLOCK_ALLOW_PRIVATE entry 'nope/1'"):
        parse(env_allow_private="nope/1")
    # the variable applies to every networked VM; without a network there is nothing to open
    assert parse(no_network=True, env_allow_private="10.0.0.1").allow_private == ()
