"""The host-side proxy every guest TCP connection is redirected to.

Map of the package:

- `_http.py` — sans-I/O core: secret placeholder rules (`SecretRules`, the streaming
  `BodyRewriter`, `replace_placeholders`, `foreign_placeholders`), host/SNI normalisation,
  ClientHello sniffing, block pages. No sockets, no asyncio; every security rule is testable
  on bytes.
- `server.py` — the asyncio shell, the only code that reads/writes sockets or dials upstream:
  - `TcpRelay` (open mode): `policy.ip_allowed(dst_ip)` then a raw relay, both ways,
    half-close aware, with an idle timeout. The one relay implementation: intercept mode
    reuses it for passthrough ports and for upgraded (WebSocket) connections.
  - `InterceptProxy` (intercept mode), per guest connection: peek at the first bytes →
    TLS ClientHello? terminate TLS with a leaf from `ca.CertificateAuthority` for the SNI
    (then HTTP/1.1 via h11) : port 80? plain HTTP/1.1 : anything else? passthrough when the
    address is one our DNS gave for an allowed host. Per request: Host (must equal the SNI
    under TLS) against the allow-list, foreign secret placeholders → 403, bound ones
    replaced (target, headers, scanned bodies), upstream dialled only at addresses that pass
    `policy.ip_allowed`, verified TLS upstream, response streamed back as it arrives.

Every refusal is an HTTP answer where the guest speaks HTTP, plus a `NetEvent`; secret values
never appear in either. Any exception in policy code blocks the flow (fail closed).
"""

from ._http import foreign_placeholders, replace_placeholders
from .server import InterceptProxy, TcpRelay

__all__ = ["InterceptProxy", "TcpRelay", "foreign_placeholders", "replace_placeholders"]
