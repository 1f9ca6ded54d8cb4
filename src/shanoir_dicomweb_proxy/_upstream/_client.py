"""The proxy's one HTTP client to the PACS, and how it authenticates there (``[upstream]``).

Errors of the HTTP client are translated into the proxy's hierarchy here
(:func:`upstream_error`) and nowhere else.
"""

from __future__ import annotations

import base64
import http.cookiejar
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Sequence
from typing import TypeVar

import httpx
import yarl

from .._config import UpstreamSettings
from .._errors import ProxyError, UpstreamError, UpstreamTimeout, UpstreamUnavailable
from .._oauth import ClientCredentials
from ._transport import AiohttpTransport, ResponseStream
from ._wire import WirePool

__all__ = ["Upstream", "UpstreamAnswer", "upstream_error"]

logger = logging.getLogger("shanoir_dicomweb_proxy.upstream")

_T = TypeVar("_T")

_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS"})
# Failures that mean "the pooled connection was already dead": Orthanc closes idle
# connections after 1 s (Keep-Alive: timeout=1), so a request can race that close.
_STALE = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)


class Upstream:
    """The proxy's one HTTP client to the PACS (``[upstream]``).

    Opened in the app's lifespan (or on first use when a host app runs no lifespan for it),
    closed in the lifespan. ``trust_env=False`` and no cookie jar: a ``Set-Cookie`` meant for
    one request must never be replayed for another user.
    """

    def __init__(
        self,
        settings: UpstreamSettings,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.settings = settings
        self.url = settings.url
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        # The forwarding path's shortcut past httpx's request and response objects: the
        # aiohttp transport and the Authorization header to add, when the proxy's own
        # credentials are a constant header (none, basic, bearer).
        self._direct: tuple[AiohttpTransport, list[tuple[str, str]]] | None = None
        # And for requests without a body, the proxy's own HTTP/1.1 client (_wire.py).
        self._wire: tuple[WirePool, list[tuple[bytes, bytes]]] | None = None

    def _build_client(self) -> httpx.AsyncClient:
        s = self.settings
        limits = httpx.Limits(
            max_connections=s.max_connections,
            max_keepalive_connections=s.max_keepalive_connections,
            keepalive_expiry=s.keepalive_expiry,
        )
        transport = self._transport
        if transport is None and s.transport == "aiohttp":
            transport = AiohttpTransport(
                limits=limits,
                connect_timeout=s.connect_timeout,
                read_timeout=s.read_timeout,
                pool_timeout=s.pool_timeout,
            )
            credentials = _constant_authorization(s)
            if credentials is not None:
                self._direct = (transport, credentials)
                pool = WirePool(
                    s.url,
                    max_connections=s.max_connections,
                    max_keepalive=s.max_keepalive_connections,
                    keepalive_expiry=s.keepalive_expiry,
                    connect_timeout=s.connect_timeout,
                    read_timeout=s.read_timeout,
                    pool_timeout=s.pool_timeout,
                )
                self._wire = (pool, [(k.encode(), v.encode()) for k, v in credentials])
        auth: httpx.Auth | None = None
        if s.auth.type == "basic":
            auth = httpx.BasicAuth(s.auth.username, s.auth.password)
        elif s.auth.type == "bearer":
            auth = _Bearer(s.auth.token)
        elif s.auth.type == "client_credentials":
            auth = ClientCredentials(
                s.auth.token_url,
                s.auth.client_id,
                s.auth.client_secret,
                scope=s.auth.scope,
                timeout=s.connect_timeout + 10,
                unavailable=_own_token_unavailable,
            )
        return httpx.AsyncClient(
            transport=transport,
            trust_env=False,
            follow_redirects=False,
            auth=auth,
            cookies=_no_cookies(),
            timeout=httpx.Timeout(
                connect=s.connect_timeout,
                read=s.read_timeout,
                write=s.write_timeout,
                pool=s.pool_timeout,
            ),
            limits=limits,
        )

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = self._build_client()
        return self._client

    async def aclose(self) -> None:
        if self._wire is not None:
            self._wire[0].close()
            self._wire = None
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    async def send(
        self,
        method: str,
        target: str,
        *,
        headers: list[tuple[bytes, bytes]],
        content: AsyncIterator[bytes] | None = None,
    ) -> httpx.Response:
        """Send a request and return the streamed response (the caller must ``aclose`` it).

        ``target`` is the path and query below the upstream URL. A request that fails on a
        stale pooled connection is retried once when it is idempotent.
        """
        request = self.client.build_request(
            method, self.url + target, headers=headers, content=content
        )
        return await _retrying(method, content, lambda: self.client.send(request, stream=True))

    async def forward(
        self,
        method: str,
        target: str,
        *,
        headers: list[tuple[bytes, bytes]],
        content: AsyncIterator[bytes] | None = None,
    ) -> UpstreamAnswer:
        """:meth:`send` for the forwarding path: the same request, retries and errors, with
        the answer as an :class:`UpstreamAnswer`.

        On the aiohttp transport it skips httpx's request and response objects (URL parsing,
        header merging, cookie extraction): about a third of the proxy's own work on a small
        request. A GET goes through the proxy's own HTTP/1.1 client (:class:`WirePool`), which
        costs a quarter of aiohttp's CPU per request.
        """
        _ = self.client  # builds the transport, and the shortcut, on first use
        if self._direct is None:
            response = await self.send(method, target, headers=headers, content=content)
            return UpstreamAnswer(
                response.status_code, response.headers.raw, response.aiter_raw, response.aclose
            )
        transport, credentials = self._direct
        if self._wire is not None and method == "GET" and content is None:
            pool, own = self._wire
            sent = [*headers, *own]
            reply = await _retrying(method, content, lambda: pool.request(method, target, sent))
            return UpstreamAnswer(
                reply.status, reply.headers, reply.chunks, reply.aclose, received=reply.received
            )
        fields = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in headers]
        fields += credentials
        url = yarl.URL(self.url + target, encoded=True)
        answer = await _retrying(
            method, content, lambda: transport.open(method, url, fields, content)
        )
        stream = ResponseStream(answer)
        return UpstreamAnswer(answer.status, answer.raw_headers, stream.__aiter__, stream.aclose)


class UpstreamAnswer:
    """The PACS's answer to a forwarded request, its body not read yet: ``status``,
    ``headers`` as received (raw name and value pairs), then :meth:`chunks` and ``aclose``.
    ``received``, when the transport can tell, says whether the chunk just taken was the last."""

    __slots__ = ("status", "headers", "_body", "aclose", "_received")

    def __init__(
        self,
        status: int,
        headers: Sequence[tuple[bytes, bytes]],
        body: Callable[[], AsyncIterator[bytes]],
        aclose: Callable[[], Awaitable[None]],
        *,
        received: Callable[[], bool] | None = None,
    ) -> None:
        self.status = status
        self.headers = headers
        self._body = body
        #: Ends the exchange: a body read to its end gives the connection back to the pool.
        self.aclose = aclose
        self._received = received

    def received(self) -> bool:
        """Whether the whole body is in and was handed over by :meth:`chunks` (False when the
        transport cannot tell)."""
        return self._received is not None and self._received()

    def header(self, name: bytes) -> str | None:
        """The first value of a header (``name`` lower-case), or None."""
        for key, value in self.headers:
            if key.lower() == name:
                return value.decode("latin-1")
        return None

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives; a failure of the connection raises a ProxyError."""
        try:
            async for chunk in self._body():
                yield chunk
        except httpx.HTTPError as exc:
            raise upstream_error(exc) from exc


async def _retrying(
    method: str, content: AsyncIterator[bytes] | None, attempt: Callable[[], Awaitable[_T]]
) -> _T:
    """``attempt()``, again once when an idempotent request without a body met a stale
    pooled connection; the client's errors as the proxy's."""
    attempts = 2 if method in _IDEMPOTENT and content is None else 1
    for tried in range(attempts):
        try:
            return await attempt()
        except _STALE as exc:
            if tried + 1 < attempts:
                logger.debug("retrying %s after a stale connection: %s", method, exc)
                continue
            raise upstream_error(exc) from exc
        except httpx.HTTPError as exc:
            raise upstream_error(exc) from exc
    raise AssertionError("unreachable")


def upstream_error(exc: httpx.HTTPError) -> ProxyError:
    """The proxy's error for a failure of the HTTP client."""
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamTimeout("the upstream did not answer in time")
    if isinstance(exc, httpx.ConnectError):
        return UpstreamUnavailable("the upstream could not be reached")
    return UpstreamError("the upstream connection failed")


class _Bearer(httpx.Auth):
    def __init__(self, token: str) -> None:
        self._value = f"Bearer {token}"

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = self._value
        yield request


def _constant_authorization(settings: UpstreamSettings) -> list[tuple[str, str]] | None:
    """The header the proxy authenticates with upstream when it never changes (as httpx's
    ``BasicAuth`` and :class:`_Bearer` set it), else None (client credentials)."""
    auth = settings.auth
    if auth.type == "none":
        return []
    if auth.type == "basic":
        pair = f"{auth.username}:{auth.password}".encode()
        return [("Authorization", "Basic " + base64.b64encode(pair).decode("ascii"))]
    if auth.type == "bearer":
        return [("Authorization", f"Bearer {auth.token}")]
    return None


def _own_token_unavailable() -> ProxyError:
    return UpstreamError("the proxy could not obtain its own upstream token")


def _no_cookies() -> http.cookiejar.CookieJar:
    """A jar that stores nothing. httpx copies a ``Cookies`` object into a fresh jar (so a
    subclass would be lost), but keeps a ``CookieJar`` as it is, with its policy."""
    return http.cookiejar.CookieJar(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
