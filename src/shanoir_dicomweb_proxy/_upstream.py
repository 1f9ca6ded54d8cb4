"""The upstream PACS: one streaming HTTP client, and the ASGI app that forwards to it.

Errors of the transport are translated into the proxy's hierarchy here and nowhere else.
"""

from __future__ import annotations

import asyncio
import http.cookiejar
import logging
import re
import tempfile
import time
from collections.abc import AsyncGenerator, AsyncIterator, Generator
from typing import IO

import anyio
import httpx
import orjson

from ._config import UpstreamAuthSettings, UpstreamSettings
from ._errors import (
    BadRequest,
    PayloadTooLarge,
    ProxyError,
    UpstreamError,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from ._headers import (
    header,
    parse_media_type,
    request_headers_for_upstream,
    response_headers_for_client,
)
from ._multipart import BodyRewriter
from ._observability import RECORD_KEY, RequestRecord
from ._routing import DicomWebRequest, get_dicomweb_request
from ._transport import AiohttpTransport
from ._types import Receive, Scope, Send

__all__ = ["Upstream", "UpstreamProxy"]

logger = logging.getLogger("shanoir_dicomweb_proxy.upstream")

_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS"})
_SPOOL_IN_MEMORY = 1024 * 1024
_SPOOL_WRITE = 1024 * 1024
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
        auth: httpx.Auth | None = None
        if s.auth.type == "basic":
            auth = httpx.BasicAuth(s.auth.username, s.auth.password)
        elif s.auth.type == "bearer":
            auth = _Bearer(s.auth.token)
        elif s.auth.type == "client_credentials":
            auth = _ClientCredentials(s.auth, timeout=s.connect_timeout + 10)
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
        attempts = 2 if method in _IDEMPOTENT and content is None else 1
        for attempt in range(attempts):
            try:
                return await self.client.send(request, stream=True)
            except _STALE as exc:
                if attempt + 1 < attempts:
                    logger.debug("retrying %s after a stale connection: %s", method, exc)
                    continue
                raise _translate(exc) from exc
            except httpx.HTTPError as exc:
                raise _translate(exc) from exc
        raise AssertionError("unreachable")


def _translate(exc: httpx.HTTPError) -> ProxyError:
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


class _ClientCredentials(httpx.Auth):
    """The proxy's own token for the PACS (OAuth 2.0 client credentials, RFC 6749 §4.4).

    Fetched on first use, shared by all requests, renewed 30 s before it expires, and once more
    when the PACS answers 401 to an idempotent request. A plain form POST: authlib's httpx
    integration warns that it is deprecated in the version this project runs with.
    """

    def __init__(self, settings: UpstreamAuthSettings, *, timeout: float) -> None:
        self._settings = settings
        self._timeout = timeout
        self._token = ""
        self._renew_at = 0.0
        self._lock = asyncio.Lock()

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        request.headers["Authorization"] = f"Bearer {await self._get(stale=None)}"
        response = yield request
        if response.status_code == 401 and request.method in _IDEMPOTENT:
            token = await self._get(stale=request.headers["Authorization"][7:])
            request.headers["Authorization"] = f"Bearer {token}"
            yield request

    async def _get(self, *, stale: str | None) -> str:
        async with self._lock:
            if self._token and self._token != stale and time.monotonic() < self._renew_at:
                return self._token
            s = self._settings
            data = {"grant_type": "client_credentials"}
            if s.scope:
                data["scope"] = s.scope
            try:
                async with httpx.AsyncClient(trust_env=False, timeout=self._timeout) as client:
                    response = await client.post(
                        s.token_url, data=data, auth=(s.client_id, s.client_secret)
                    )
                response.raise_for_status()
                body = response.json()
                token, expires_in = body["access_token"], float(body.get("expires_in", 60))
            except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
                logger.warning("could not obtain the proxy's upstream token: %s", exc)
                raise UpstreamError("the proxy could not obtain its own upstream token") from None
            self._token = str(token)
            self._renew_at = time.monotonic() + max(expires_in - 30.0, expires_in / 2)
            return self._token


def _no_cookies() -> http.cookiejar.CookieJar:
    """A jar that stores nothing. httpx copies a ``Cookies`` object into a fresh jar (so a
    subclass would be lost), but keeps a ``CookieJar`` as it is, with its policy."""
    return http.cookiejar.CookieJar(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))


_UID_LIKE = re.compile(r"\b[0-9]+(?:\.[0-9]+){2,}\b")


def _upstream_message(body: bytes) -> str:
    """Orthanc's short error ``Message`` (its errors are JSON without a Content-Type)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return ""
    message = data.get("Message") if isinstance(data, dict) else None
    if not isinstance(message, str):
        return ""
    # Never echo identifiers the upstream put in its message.
    return _UID_LIKE.sub("<uid>", message)[:200]


class UpstreamProxy:
    """The innermost ASGI app: forwards the parsed DICOMweb request to the PACS, streaming.

    Request and response bodies flow through with backpressure: a chunk is read from one
    side only when the other side took the previous one. A client that hangs up cancels the
    upstream request; an upstream that fails mid-body aborts the client's response.
    """

    def __init__(self, upstream: Upstream, *, max_upload_bytes: int | None = None) -> None:
        self.upstream = upstream
        self.max_upload_bytes = max_upload_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self._handle(scope, receive, send)
        except BaseExceptionGroup as group:
            raise _first_error(group) from None

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = get_dicomweb_request(scope)
        if request.method != "POST":
            await self._forward_watching(scope, request, receive, send)
            return
        limit = self.max_upload_bytes
        length = _content_length(scope)
        if length is not None:
            if limit is not None and length > limit:
                raise PayloadTooLarge(f"the request body exceeds {limit} bytes")
            await self._forward_watching(scope, request, receive, send, length=length)
            return
        # A chunked upload is spooled first (to disk past 1 MiB, never past the limit) so
        # that the PACS gets a Content-Length: Orthanc stores the complete parts of a
        # chunked body that ends early, which would half-store a batch that the client was
        # told failed. With a Content-Length a truncated body is refused whole.
        with tempfile.SpooledTemporaryFile(max_size=_SPOOL_IN_MEMORY) as spool:
            length = await spool_body(receive, spool, limit)
            if length is not None:
                await self._forward_watching(
                    scope, request, receive, send, length=length, spool=spool
                )

    async def _forward_watching(
        self,
        scope: Scope,
        request: DicomWebRequest,
        receive: Receive,
        send: Send,
        *,
        length: int | None = None,
        spool: IO[bytes] | None = None,
    ) -> None:
        """Forward while watching the client: a disconnect cancels the upstream request."""
        async with anyio.create_task_group() as tg:
            content: AsyncIterator[bytes] | None = None
            if spool is not None:
                content = _read_spool(spool)
                tg.start_soon(_watch_disconnect, receive, tg.cancel_scope)
            elif length is not None:
                sender, body = anyio.create_memory_object_stream[bytes](0)
                content = _iterate(body)
                tg.start_soon(_pump_body, receive, sender, tg.cancel_scope)
            else:
                tg.start_soon(_watch_disconnect, receive, tg.cancel_scope)
            try:
                await self._forward(scope, request, content, length, send)
            finally:
                tg.cancel_scope.cancel()

    async def _forward(
        self,
        scope: Scope,
        request: DicomWebRequest,
        content: AsyncIterator[bytes] | None,
        length: int | None,
        send: Send,
    ) -> None:
        record: RequestRecord | None = scope.get(RECORD_KEY)
        request_id = record.request_id if record is not None else None
        headers = request_headers_for_upstream(scope["headers"], request_id=request_id)
        # Bytes are rewritten on the way back; a compressed body could not be.
        headers.append((b"accept-encoding", b"identity"))
        if length is not None:
            # Some PACS refuse chunked STOW; all of them refuse a body shorter than announced.
            headers.append((b"content-length", str(length).encode()))
        target = request.path()
        query = request.query_string()
        if query:
            target += "?" + query
        # Orthanc answers HEAD with 404: ask for GET and send only the head back.
        method = "GET" if request.method == "HEAD" else request.method
        started = time.perf_counter() if record is not None else 0.0
        try:
            response = await self.upstream.send(method, target, headers=headers, content=content)
            try:
                await self._respond(request, response, send)
            finally:
                with anyio.CancelScope(shield=True):
                    await response.aclose()
        finally:
            if record is not None:
                record.upstream_seconds += time.perf_counter() - started

    async def _respond(
        self, request: DicomWebRequest, response: httpx.Response, send: Send
    ) -> None:
        status = response.status_code
        if status >= 500:
            raise UpstreamError(f"the upstream failed with status {status}")
        if status in (401, 403, 407):
            raise UpstreamError("the upstream refused the proxy's own credentials")
        if status >= 400:
            message = _upstream_message(await _read_capped(response, 65536))
            raise UpstreamRejected(message or f"the upstream answered {status}", status=status)
        headers = response_headers_for_client(response.headers.raw)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        if request.method == "HEAD":
            await send({"type": "http.response.body", "body": b""})
            return
        boundary = _multipart_boundary(response)
        keep = len(boundary) + 8 if boundary is not None else 0
        tail = b""
        try:
            async for chunk in response.aiter_raw():
                if boundary is not None:
                    tail = (tail + chunk[-keep:])[-keep:]
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except httpx.HTTPError as exc:
            raise _translate(exc) from exc
        if boundary is not None and b"--" + boundary + b"--" not in tail:
            # Orthanc ends study and series retrieves at EOF, so a connection lost in the
            # middle looks like a clean end: only the closing delimiter tells them apart.
            raise UpstreamError("the upstream's multipart answer ended before its last part")
        await send({"type": "http.response.body", "body": b""})


async def _read_capped(response: httpx.Response, cap: int) -> bytes:
    data = b""
    try:
        async for chunk in response.aiter_raw():
            data += chunk
            if len(data) >= cap:
                break
    except httpx.HTTPError:
        pass
    return data[:cap]


def _multipart_boundary(response: httpx.Response) -> bytes | None:
    content_type = response.headers.get("content-type")
    if content_type is None:
        return None
    media = parse_media_type(content_type)
    if not media.type.startswith("multipart/") or "boundary" not in media.params:
        return None
    return media.params["boundary"].encode("latin-1")


def _content_length(scope: Scope) -> int | None:
    value = header(scope, b"content-length")
    if value is None:
        return None
    if not value.isdigit():
        raise BadRequest("invalid Content-Length")
    return int(value)


def _first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error to report from a task group: a ProxyError if any, else the first."""
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            leaves.append(exc)

    walk(group)
    return next((e for e in leaves if isinstance(e, ProxyError)), leaves[0])


async def _iterate(stream: anyio.abc.ObjectReceiveStream[bytes]) -> AsyncIterator[bytes]:
    async with stream:
        async for chunk in stream:
            yield chunk


async def _pump_body(
    receive: Receive,
    sender: anyio.abc.ObjectSendStream[bytes],
    cancel_scope: anyio.CancelScope,
) -> None:
    """Hand the request body to the upstream request one chunk at a time, then watch for a
    disconnect.

    The stream to the upstream is closed only when the body is complete. On a disconnect it is
    left open and the upstream request is cancelled instead, so the PACS sees fewer bytes than
    the Content-Length it was promised and stores nothing.
    """
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            cancel_scope.cancel()
            return
        chunk: bytes = message.get("body", b"")
        if chunk:
            await sender.send(chunk)
        if not message.get("more_body", False):
            break
    await sender.aclose()
    await _watch_disconnect(receive, cancel_scope)


async def spool_body(
    receive: Receive, spool: IO[bytes], limit: int | None, rewriter: BodyRewriter | None = None
) -> int | None:
    """Write the whole request body to ``spool`` (through ``rewriter`` when given) and rewind
    it: the size written, or None if the client left. More than ``limit`` bytes received is
    :class:`PayloadTooLarge`."""
    received = 0
    size = 0
    pending = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk: bytes = message.get("body", b"")
        received += len(chunk)
        if limit is not None and received > limit:
            raise PayloadTooLarge(f"the request body exceeds {limit} bytes")
        more = message.get("more_body", False)
        pending += chunk if rewriter is None else await rewriter.feed(chunk)
        if rewriter is not None and not more:
            pending += await rewriter.close()
        if len(pending) >= _SPOOL_WRITE or not more:
            size += len(pending)
            await anyio.to_thread.run_sync(spool.write, bytes(pending))
            pending.clear()
        if not more:
            break
    await anyio.to_thread.run_sync(spool.seek, 0)
    return size


async def _read_spool(spool: IO[bytes]) -> AsyncIterator[bytes]:
    while chunk := await anyio.to_thread.run_sync(spool.read, _SPOOL_WRITE):
        yield chunk


async def _watch_disconnect(receive: Receive, cancel_scope: anyio.CancelScope) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    cancel_scope.cancel()
