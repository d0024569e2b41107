"""An OCI distribution-spec client on httpx: manifests, blobs, auth, retries.

One client talks to one repository. Anonymous first; a 401 with a `Bearer` challenge sends
us to the token realm (with the user's credentials when there are any), a `Basic` challenge
gets the credentials directly. Transport errors, 429 and 5xx answers are retried with
exponential backoff; every wait is bounded. `HTTPS_PROXY`/`NO_PROXY` are honoured by httpx.
Blobs stream to a file while their sha256 is computed: a blob whose bytes do not match its
digest never leaves the caller's staging directory.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from matchlock import __version__
from matchlock.errors import IntegrityError, NotFoundError, RegistryError, UnreachableError
from matchlock.image._auth import Challenge, Credentials, lookup_credentials, parse_challenges
from matchlock.image._media import (
    MAX_MANIFEST,
    MT_DOCKER_LIST,
    MT_DOCKER_MANIFEST,
    MT_OCI_INDEX,
    MT_OCI_MANIFEST,
    verify_digest,
)
from matchlock.image._reference import Reference, parse_reference

log = logging.getLogger(__name__)

_ACCEPT = ", ".join([MT_OCI_INDEX, MT_DOCKER_LIST, MT_OCI_MANIFEST, MT_DOCKER_MANIFEST])

CHUNK = 256 << 10
ATTEMPTS = 4
BACKOFF_S = 0.5
MAX_RETRY_AFTER_S = 10.0
TIMEOUT = httpx.Timeout(30.0, connect=10.0)

CredentialSource = Callable[[str], "Credentials | None"]


@dataclass
class Stats:
    """What one client did, for progress lines and benchmarks."""

    requests: int = 0
    retries: int = 0
    bytes: int = 0
    hash_s: float = 0.0  # time spent hashing downloaded bytes


def _error_detail(resp: httpx.Response) -> tuple[str, str]:
    """(code, message) from a distribution-spec error body, best effort."""
    try:
        body = json.loads(resp.content[:65536] or b"{}")
        err = (body.get("errors") or [{}])[0]
        return str(err.get("code") or ""), str(err.get("message") or "")
    except (ValueError, AttributeError, IndexError, TypeError):
        return "", ""


def _reason(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    for needle, short in (
        ("Connection refused", "connection refused"),
        ("All connection attempts failed", "connection refused"),
        ("Name or service not known", "name does not resolve"),
        ("Temporary failure in name resolution", "name does not resolve"),
        ("No address associated", "name does not resolve"),
        ("CERTIFICATE_VERIFY_FAILED", "TLS certificate not trusted"),
        ("timed out", "timed out"),
    ):
        if needle in text:
            return short
    if isinstance(exc, httpx.TimeoutException):
        return "timed out"
    return text.splitlines()[0][:200]


class RegistryClient:
    def __init__(
        self,
        ref: Reference,
        *,
        credentials: CredentialSource = lookup_credentials,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: httpx.Timeout = TIMEOUT,
        backoff_s: float = BACKOFF_S,
    ):
        self.ref = ref
        self.stats = Stats()
        self._credentials = credentials
        self._creds: Credentials | None = None
        self._creds_loaded = False
        self._auth: str | None = None  # Authorization header value once we have one
        self._auth_lock = asyncio.Lock()
        self._backoff = backoff_s
        verify: ssl.SSLContext | bool = ssl.create_default_context()
        self._http = httpx.AsyncClient(
            timeout=timeout,
            follow_redirects=True,  # blob GETs are often redirected to a CDN
            headers={"User-Agent": f"matchlock/{__version__}"},
            transport=transport,
            verify=verify,
            limits=httpx.Limits(max_connections=8, max_keepalive_connections=8),
        )

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    @property
    def registry(self) -> str:
        return self.ref.registry

    # ---- requests ---------------------------------------------------------------------

    def _url(self, kind: str, target: str) -> str:
        return f"{self.ref.base_url}/{kind}/{target}"

    async def _open(self, url: str, accept: str | None, what: str) -> httpx.Response:
        """GET `url` as a stream, authenticating and retrying; returns a 2xx response that
        the caller must close. Raises RegistryError/NotFoundError with one-line messages."""
        authed_with: str | None = None
        for attempt in range(ATTEMPTS):
            headers = {"Accept": accept} if accept else {}
            sent = self._auth
            if sent:
                headers["Authorization"] = sent
            try:
                self.stats.requests += 1
                resp = await self._http.send(
                    self._http.build_request("GET", url, headers=headers), stream=True
                )
            except httpx.TransportError as e:
                # A name that does not resolve will not resolve a second later either.
                if attempt + 1 == ATTEMPTS or _reason(e) == "name does not resolve":
                    raise self._unreachable(e) from None
                await self._sleep(attempt, None, f"{what}: {_reason(e)}")
                continue
            if resp.status_code < 300:
                return resp
            await resp.aread()
            await resp.aclose()
            status = resp.status_code
            if status == 401:
                if authed_with is not None and authed_with == sent:
                    raise self._denied(resp, what)
                await self._authenticate(resp, what, sent)
                authed_with = self._auth
                continue
            if status == 429 or status >= 500:
                if attempt + 1 == ATTEMPTS:
                    raise self._http_error(resp, what)
                await self._sleep(attempt, _retry_after(resp), f"{what}: HTTP {status}")
                continue
            raise self._http_error(resp, what)
        raise RegistryError(f"registry {self.registry} kept failing for {what}; retry later")

    async def _sleep(self, attempt: int, retry_after: float | None, why: str) -> None:
        delay = retry_after if retry_after is not None else self._backoff * (2 ** attempt)
        delay = min(delay, MAX_RETRY_AFTER_S)
        self.stats.retries += 1
        log.info("retrying %s in %.1fs", why, delay)
        await asyncio.sleep(delay)

    async def get_bytes(self, kind: str, target: str, accept: str | None, limit: int,
                        what: str) -> tuple[bytes, str]:
        """A small document (manifest, config): (body, Content-Type)."""
        url = self._url(kind, target)
        for attempt in range(ATTEMPTS):
            resp = await self._open(url, accept, what)
            try:
                length = int(resp.headers.get("content-length") or 0)
                if length > limit:
                    raise RegistryError(f"{what} from {self.registry} is {length} bytes; "
                                        f"refusing more than {limit}")
                body = bytearray()
                async for chunk in resp.aiter_raw():
                    body += chunk
                    if len(body) > limit:
                        raise RegistryError(f"{what} from {self.registry} is larger than "
                                            f"{limit} bytes; refusing it")
                ctype = resp.headers.get("content-type", "").split(";")[0].strip()
                self.stats.bytes += len(body)
                return bytes(body), ctype
            except httpx.TransportError as e:
                if attempt + 1 == ATTEMPTS:
                    raise self._unreachable(e) from None
                await self._sleep(attempt, None, f"{what}: {_reason(e)}")
            finally:
                await resp.aclose()
        raise AssertionError("unreachable")

    async def manifest(self, target: str) -> tuple[bytes, str]:
        what = f"manifest {self.ref.familiar_repo}:{target}" if ":" not in target else (
            f"manifest {self.ref.familiar_repo}@{target}")
        return await self.get_bytes("manifests", target, _ACCEPT, MAX_MANIFEST, what)

    async def tags(self) -> list[str] | None:
        """The repository's tags (first page), or None when the repository is unknown."""
        try:
            body, _ = await self.get_bytes("tags", "list?n=50", "application/json",
                                           MAX_MANIFEST, f"tags of {self.ref.familiar_repo}")
        except NotFoundError:
            return None
        try:
            tags = json.loads(body).get("tags") or []
        except (ValueError, AttributeError):
            return []
        return [t for t in tags if isinstance(t, str)]

    async def blob_bytes(self, digest: str, limit: int, what: str) -> bytes:
        body, _ = await self.get_bytes("blobs", digest, None, limit, what)
        verify_digest(body, digest, what, self.registry)
        return body

    async def download(self, digest: str, size: int | None, dest: Path,
                       on_bytes: Callable[[int], None]) -> None:
        """Stream blob `digest` into `dest`, verifying size and sha256 as bytes arrive.

        A transfer cut short is retried from the start. On a digest mismatch `dest` is
        removed and IntegrityError raised."""
        alg, _, want = digest.partition(":")
        what = f"layer {digest}"
        url = self._url("blobs", digest)
        for attempt in range(ATTEMPTS):
            resp = await self._open(url, None, what)
            h = hashlib.sha256()
            n = 0
            try:
                with open(dest, "wb") as out:
                    async for chunk in resp.aiter_raw(CHUNK):
                        t0 = time.perf_counter()
                        h.update(chunk)
                        self.stats.hash_s += time.perf_counter() - t0
                        out.write(chunk)
                        n += len(chunk)
                        if size is not None and n > size:
                            break
                        on_bytes(len(chunk))
            except httpx.TransportError as e:
                on_bytes(-n)
                if attempt + 1 == ATTEMPTS:
                    dest.unlink(missing_ok=True)
                    raise self._unreachable(e, f" while downloading {what}") from None
                await self._sleep(attempt, None, f"{what}: {_reason(e)}")
                continue
            except OSError as e:
                dest.unlink(missing_ok=True)
                raise RegistryError(
                    f"cannot store {what}: {e.strerror or e} ({dest.parent}); free some disk "
                    "space or move the image store (MATCHLOCK_IMAGES_DIR)"
                ) from None
            finally:
                await resp.aclose()
            self.stats.bytes += n
            got = h.hexdigest()
            if (size is not None and n != size) or got != want or alg != "sha256":
                dest.unlink(missing_ok=True)
                raise IntegrityError(
                    f"{what} from {self.registry} failed verification (received "
                    f"{n} bytes with digest sha256:{got}"
                    + (f", expected {size} bytes" if size is not None and n != size else "")
                    + "); the registry's copy is damaged: push the image again"
                )
            return
        raise AssertionError("unreachable")

    # ---- auth -------------------------------------------------------------------------

    def _creds_for(self) -> Credentials | None:
        if not self._creds_loaded:
            self._creds = self._credentials(self.registry)
            self._creds_loaded = True
        return self._creds

    async def _authenticate(self, resp: httpx.Response, what: str, sent: str | None) -> None:
        async with self._auth_lock:
            if self._auth != sent:
                return  # another request of ours has just authenticated
            challenges = parse_challenges(resp.headers.get("www-authenticate", ""))
            creds = self._creds_for()
            bearer = next((c for c in challenges if c.scheme == "bearer"), None)
            if bearer is not None:
                self._auth = "Bearer " + await self._token(bearer, creds)
                return
            if any(c.scheme == "basic" for c in challenges):
                if creds is None or not creds.username:
                    raise RegistryError(
                        f"registry {self.registry} needs credentials for "
                        f"{self.ref.familiar_repo}; log in (e.g. `docker login "
                        f"{self.registry}`) so that ~/.docker/config.json has them"
                    )
                self._auth = creds.basic()
                return
            raise RegistryError(
                f"registry {self.registry} refused {what} (401) without a usable "
                "authentication challenge"
            )

    async def _token(self, ch: Challenge, creds: Credentials | None) -> str:
        realm = ch.params.get("realm")
        if not realm or not realm.startswith(("https://", "http://")):
            raise RegistryError(f"registry {self.registry} sent a bearer challenge without "
                                "a valid realm")
        if creds is not None and realm.startswith("http://") and not parse_reference(
                f"{httpx.URL(realm).netloc.decode()}/x").plain_http:
            raise RegistryError(
                f"registry {self.registry} sends us to the plain-HTTP token service {realm}; "
                "refusing to send credentials there"
            )
        scope = ch.params.get("scope") or f"repository:{self.ref.repository}:pull"
        params = {"scope": scope}
        if ch.params.get("service"):
            params["service"] = ch.params["service"]
        headers = {}
        try:
            if creds is not None and creds.identity_token:
                data = {**params, "grant_type": "refresh_token", "client_id": "matchlock",
                        "refresh_token": creds.identity_token}
                r = await self._token_request("POST", realm, data=data)
            else:
                if creds is not None and creds.username:
                    headers["Authorization"] = creds.basic()
                    params["account"] = creds.username
                r = await self._token_request("GET", realm, params=params, headers=headers)
        except httpx.TransportError as e:
            raise UnreachableError(
                f"cannot reach the token service {httpx.URL(realm).host} of registry "
                f"{self.registry} ({_reason(e)}); check the network or proxy settings"
            ) from None
        if r.status_code in (401, 403):
            if creds is not None:
                raise RegistryError(
                    f"registry {self.registry} rejected the credentials for "
                    f"{creds.username or 'the identity token'} (from {creds.source}); "
                    f"log in again (e.g. `docker login {self.registry}`)"
                )
            raise RegistryError(
                f"registry {self.registry} needs credentials for {self.ref.familiar_repo}; "
                f"log in (e.g. `docker login {self.registry}`)"
            )
        if r.status_code >= 300:
            raise RegistryError(f"the token service of {self.registry} answered HTTP "
                                f"{r.status_code}; retry later")
        try:
            body = r.json()
            token = body.get("token") or body.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise RegistryError(f"the token service of {self.registry} sent no token")
        return token

    async def _token_request(self, method: str, url: str, **kw: object) -> httpx.Response:
        for attempt in range(ATTEMPTS):
            try:
                self.stats.requests += 1
                r = await self._http.request(method, url, **kw)  # type: ignore[arg-type]
            except httpx.TransportError:
                if attempt + 1 == ATTEMPTS:
                    raise
                await self._sleep(attempt, None, "token request")
                continue
            if r.status_code >= 500 and attempt + 1 < ATTEMPTS:
                await self._sleep(attempt, _retry_after(r), f"token: HTTP {r.status_code}")
                continue
            return r
        raise AssertionError("unreachable")

    # ---- errors -----------------------------------------------------------------------

    def _unreachable(self, exc: BaseException, during: str = "") -> RegistryError:
        return UnreachableError(
            f"cannot reach registry {self.registry} ({_reason(exc)}){during}; check the "
            "address, the network and proxy settings"
        )

    def _denied(self, resp: httpx.Response, what: str) -> RegistryError:
        creds = self._creds_for()
        if creds is not None and (self._auth or "").startswith("Basic "):
            return RegistryError(
                f"registry {self.registry} rejected the credentials for {creds.username} "
                f"(from {creds.source}); log in again (e.g. `docker login {self.registry}`)"
            )
        if creds is not None:
            return RegistryError(
                f"registry {self.registry} denied access to {self.ref.familiar_repo} for "
                f"{creds.username or 'the identity token'} (from {creds.source}); check the "
                "name and your access rights, or log in again"
            )
        return RegistryError(
            f"registry {self.registry} denied access to {self.ref.familiar_repo}: it does "
            f"not exist or needs credentials (log in, e.g. `docker login {self.registry}`)"
        )

    def _http_error(self, resp: httpx.Response, what: str) -> RegistryError:
        code, message = _error_detail(resp)
        repo = self.ref.familiar_repo
        if resp.status_code == 404 or code in ("NAME_UNKNOWN", "MANIFEST_UNKNOWN",
                                                "BLOB_UNKNOWN"):
            if code == "NAME_UNKNOWN":
                return NotFoundError(f"repository {repo} not found on {self.registry}; "
                                     "check the name")
            if what.startswith("manifest"):
                target = what.split(repo, 1)[-1].lstrip(":@")
                return NotFoundError(f"{repo} has no manifest {target} on {self.registry}")
            if what.startswith("tags"):
                return NotFoundError(f"repository {repo} not found on {self.registry}")
            return NotFoundError(f"{what} is missing on {self.registry}; push the image again")
        if resp.status_code == 403 or code == "DENIED":
            return self._denied(resp, what)
        if resp.status_code == 429 or code == "TOOMANYREQUESTS":
            return RegistryError(f"registry {self.registry} is rate-limiting us; log in "
                                 "(docker login) or retry later")
        detail = f": {message}" if message else ""
        return RegistryError(f"registry {self.registry} answered HTTP {resp.status_code} for "
                             f"{what}{detail}")


def _retry_after(resp: httpx.Response) -> float | None:
    value = resp.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None
