"""The host-side proxy every guest TCP connection is redirected to.

Map of the package:

- `_http.py` — sans-I/O core: secret patterns per host (`SecretRules`: bound placeholders
  replaced, foreign placeholders and foreign real values leak; the streaming
  `BodyRewriter`), host/SNI normalisation, protocol sniffing (`sniff_protocol`), block pages.
- `_framing.py` — sans-I/O request framing rules: raw head size and framing headers
  (`check_head`), request-target forms (`split_target`); ambiguity is a 400.
- `_scrub.py` — sans-I/O response scrubbing: real values → placeholders (or same-length
  fillers where a length is fixed), streaming across chunks; gzip/deflate decoding.
- `_budget.py` — the per-VM budget of bytes held whole (`BufferBudget`).
- `_rules.py` — sans-I/O interception rules (RPC `network.interception`): compile, match
  (host glob, method, Go path glob on decoded and dot-resolved paths), request/response
  edits, the callback line codec, SSE-aware body replacement.
- `_callbacks.py` — asking the SDK's callback socket (one connection per call, peer uid
  checked, deadline); any failure blocks the request.
- `server.py` — the asyncio shell, the only code that reads/writes sockets or dials upstream:
  - `TcpRelay` (open mode): `policy.ip_allowed(dst_ip)` then a raw relay, both ways,
    half-close aware, with an idle timeout. The one relay implementation: intercept mode
    reuses it for passthrough ports and for upgraded (WebSocket) connections.
  - `InterceptProxy` (intercept mode, one per VM), per guest connection: read until the
    protocol is decided (a TLS record header → terminate TLS with a leaf from
    `ca.CertificateAuthority` for the SNI, then HTTP/1.1 via h11; port 80 → plain HTTP/1.1;
    other ports → raw relay to an address our DNS gave for an allowed host, where a silent
    guest gets a pre-dialled upstream and whoever speaks first decides). Per request:
    framing rules, Host (must equal the SNI under TLS and an absolute-form authority)
    against the allow-list, foreign placeholders/values anywhere → 403, bound ones replaced
    (target, headers, rewritten body types), upstream dialled only at addresses that pass
    `policy.ip_allowed`, verified TLS upstream, response scrubbed and streamed back.

Every refusal is an HTTP answer where the guest speaks HTTP, plus a `NetEvent`; secret values
never appear in either. Any exception in policy code blocks the flow (fail closed).
"""

from ._http import foreign_placeholders, replace_placeholders
from .server import InterceptProxy, TcpRelay

__all__ = ["InterceptProxy", "TcpRelay", "foreign_placeholders", "replace_placeholders"]
