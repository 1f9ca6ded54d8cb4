"""The forwarding path's own HTTP/1.1 client, for requests without a body (most of them).

A viewer's frames and metadata are many small answers, and per request aiohttp's client cost
about four times the CPU of a plain protocol on httptools (the C parser uvicorn uses):
~365 against ~80 µs here. This is that plain protocol, with what forwarding needs and nothing
more: a pool of kept-alive connections, connect, read and pool timeouts, streamed bodies with
backpressure, and httpx's errors, which the upstream layer already knows how to answer.
Answers framed by the end of the connection (Orthanc's series retrieves) end at EOF; their
completeness is the caller's to check, as with every transport.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from collections.abc import AsyncIterator, Sequence
from typing import cast
from urllib.parse import urlsplit

import httptools
import httpx

__all__ = ["WirePool", "WireResponse"]

# Reading pauses when this much of a body waits for the client, and resumes below a quarter.
_HIGH_WATER = 1024 * 1024
_LOW_WATER = _HIGH_WATER // 4


class _Connection(asyncio.Protocol):
    """One connection to the upstream and the exchange under way on it."""

    def __init__(self, read_timeout: float) -> None:
        self.read_timeout = read_timeout
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._reset()

    def _reset(self) -> None:
        self.parser = httptools.HttpResponseParser(self)  # a fresh one for each exchange
        self.head: asyncio.Future[None] | None = None
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.framed = False  # Content-Length or chunked: the end is known without EOF
        self.length: int | None = None  # the Content-Length announced
        self.chunked = False
        # Body bytes still to come past the parser (None: every byte goes through it).
        self.direct: int | None = None
        self.body: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.paused = False
        self.complete = False
        self.keep_alive = False
        self.error: Exception | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.deadline = 0.0  # loop time by which the upstream must have sent something

    # -- asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        if self.head is None:  # nothing was asked: a stray byte makes the connection unusable
            self.closed = True
            self._abort()
            return
        self._arm()
        if self.direct is not None:
            self._direct_body(data)
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(httpx.RemoteProtocolError(f"a malformed answer from the upstream: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._disarm()
        if self.head is None or self.complete or self.error is not None:
            return
        if self.head.done() and not self.framed:
            self.complete = True  # framed by the end of the connection
            self._wake()
        elif self.head.done():
            self._fail(httpx.RemoteProtocolError("the upstream closed the connection mid-body"))
        else:
            self._fail(httpx.RemoteProtocolError("the upstream closed the connection"))

    # -- httptools callbacks ---------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))
        lowered = name.lower()
        if lowered == b"content-length":
            self.framed = True
            self.length = int(value) if value.strip().isdigit() else None
        elif lowered == b"transfer-encoding" and b"chunked" in value.lower():
            self.framed = self.chunked = True

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        if self.status < 200:  # 1xx: the real head follows
            self.headers = []
            self.framed = self.chunked = False
            self.length = None
            return
        if self.head is not None and not self.head.done():
            self.head.set_result(None)
        if not self.chunked and self.status not in (204, 304):
            # httptools copies each piece of body it hands over (~130 µs per 512 KiB here): past
            # the head, the bytes as received are the body, up to the Content-Length or EOF.
            self.keep_alive = self.parser.should_keep_alive()
            self.direct = self.length if self.length is not None else -1

    def on_body(self, body: bytes) -> None:
        if self.direct is not None and self.direct > 0:
            self.direct -= len(body)
        self._take(body)

    def _direct_body(self, data: bytes) -> None:
        """Body bytes received past the parser (see on_headers_complete)."""
        left = self.direct
        assert left is not None
        if left < 0:  # framed by the end of the connection
            self._take(data)
            return
        if len(data) > left or self.complete:
            # Bytes past the announced end: the connection is out of step, never reused.
            self.keep_alive = False
            data = data[:left]
        if data:
            self.direct = left - len(data)
            self._take(data)
        if self.direct == 0 and not self.complete:
            self.complete = True
            self._disarm()
            self._wake()

    def _take(self, body: bytes) -> None:
        self.body.append(body)
        self.buffered += len(body)
        if self.buffered > _HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
            self._disarm()  # waiting for the client is not the upstream's delay
        self._wake()

    def on_message_complete(self) -> None:
        if self.status < 200:
            return
        self.complete = True
        self.direct = None
        self.keep_alive = self.parser.should_keep_alive()
        self._disarm()
        self._wake()

    # -- the exchange ----------------------------------------------------------------------------

    def start(self, request: bytes) -> asyncio.Future[None]:
        """Send ``request``; the future is done when the answer's head is in."""
        assert self.transport is not None
        self._reset()
        self.head = asyncio.get_running_loop().create_future()
        if self.closed or self.transport.is_closing():
            self._fail(httpx.RemoteProtocolError("the pooled connection was closed"))
        else:
            self.transport.write(request)
            self._arm()
        return self.head

    async def chunks(self) -> AsyncIterator[bytes]:
        while True:
            if self.body:
                chunk = self.body.popleft()  # not joined: a copy of 512 KiB costs ~130 µs here
                self.buffered -= len(chunk)
                if self.paused and self.buffered < _LOW_WATER and not self.closed:
                    assert self.transport is not None
                    self.paused = False
                    self.transport.resume_reading()
                    self._arm()
                yield chunk
            elif self.error is not None:
                raise self.error
            elif self.complete:
                return
            else:
                self.waiter = asyncio.get_running_loop().create_future()
                await self.waiter

    def reusable(self) -> bool:
        return (
            self.complete
            and self.keep_alive
            and not self.body
            and not self.closed
            and self.transport is not None
            and not self.transport.is_closing()
        )

    def _fail(self, error: Exception) -> None:
        self.error = error
        self.closed = True
        self._disarm()
        if self.head is not None and not self.head.done():
            self.head.set_exception(error)
        self._wake()
        self._abort()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def _arm(self) -> None:
        """(Re)start the read timeout: the upstream must send something within it.

        Called on every read (80-150 per 21 MB series): it only moves the deadline, and the one
        timer, when it fires before it, waits for the new one. A timer cancelled and made again
        per read cost 2.7 us against 0.3 on uvloop."""
        if self.paused or self.complete:
            self._disarm()
            return
        loop = asyncio.get_running_loop()
        self.deadline = loop.time() + self.read_timeout
        if self.timer is None:
            self.timer = loop.call_at(self.deadline, self._check_deadline)

    def _disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _check_deadline(self) -> None:
        loop = asyncio.get_running_loop()
        if loop.time() < self.deadline:  # the upstream sent something since it was set
            self.timer = loop.call_at(self.deadline, self._check_deadline)
            return
        self.timer = None
        self._fail(httpx.ReadTimeout("the upstream did not answer in time"))

    def abort(self) -> None:
        """Close the connection at once, whatever its exchange is at: it is never reused."""
        self.closed = True
        self._disarm()
        self._abort()

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class WireResponse:
    """An answer of :class:`WirePool`: ``status``, ``headers`` as received, then ``chunks()``;
    ``aclose()`` gives the connection back when the body was read to its end."""

    __slots__ = ("status", "headers", "_connection", "_pool", "_closed")

    def __init__(self, connection: _Connection, pool: WirePool) -> None:
        self.status = connection.status
        self.headers: Sequence[tuple[bytes, bytes]] = connection.headers
        self._connection = connection
        self._pool = pool
        self._closed = False

    def chunks(self) -> AsyncIterator[bytes]:
        return self._connection.chunks()

    def received(self) -> bool:
        """Whether the whole body is in and handed over: the chunk just taken was the last."""
        connection = self._connection
        return connection.complete and not connection.body and connection.error is None

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self._pool.release(self._connection)


class WirePool:
    """Kept-alive HTTP/1.1 connections to the upstream at ``url``, for requests without a body.

    ``max_connections`` may be in use at once (a request waits ``pool_timeout`` for one);
    ``max_keepalive`` idle ones are kept for ``keepalive_expiry`` seconds.
    """

    def __init__(
        self,
        url: str,
        *,
        max_connections: int,
        max_keepalive: int,
        keepalive_expiry: float,
        connect_timeout: float,
        read_timeout: float,
        pool_timeout: float,
    ) -> None:
        parts = urlsplit(url)
        self._tls = parts.scheme == "https"
        self._host = parts.hostname or "localhost"
        self._port = parts.port or (443 if self._tls else 80)
        self._netloc = parts.netloc.rpartition("@")[2].encode("idna")
        self._prefix = parts.path.rstrip("/")  # the DICOMweb root, before every target
        self._max_keepalive = max_keepalive
        self._expiry = keepalive_expiry
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._pool_timeout = pool_timeout
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: list[_Connection] = []
        self._ssl: ssl.SSLContext | None = ssl.create_default_context() if self._tls else None

    async def request(
        self, method: str, target: str, headers: Sequence[tuple[bytes, bytes]]
    ) -> WireResponse:
        """Send ``method target`` (path and query below the upstream URL, sent as they are)
        with ``headers``; the answer, its head read. Raises httpx's errors; a pooled
        connection found closed raises ``RemoteProtocolError`` before anything was sent
        upstream (safe to retry)."""
        try:
            async with asyncio.timeout(self._pool_timeout):
                await self._slots.acquire()
        except TimeoutError:
            raise httpx.PoolTimeout("no free connection to the upstream") from None
        connection: _Connection | None = None
        try:
            connection = self._pooled() or await self._connect()
            path = (self._prefix + target).encode("latin-1")
            request_line = b"%s %s HTTP/1.1\r\n" % (method.encode(), path)
            lines = [request_line, b"Host: %s\r\n" % self._netloc]
            has_accept = False
            for name, value in headers:
                lines.append(b"%s: %s\r\n" % (name, value))
                has_accept = has_accept or name == b"accept"
            if not has_accept:
                lines.append(b"accept: */*\r\n")
            lines.append(b"\r\n")
            await connection.start(b"".join(lines))
        except BaseException:
            self._slots.release()
            if connection is not None:
                # Given up before the head (the client hung up): not left to the read timeout.
                connection.abort()
            raise
        return WireResponse(connection, self)

    def release(self, connection: _Connection) -> None:
        self._slots.release()
        if connection.reusable() and len(self._idle) < self._max_keepalive:
            connection.idle_since = time.monotonic()
            connection.head = None
            self._idle.append(connection)
        elif connection.transport is not None:
            connection.closed = True
            connection.transport.abort()  # a half-read answer must never start the next one

    def _pooled(self) -> _Connection | None:
        now = time.monotonic()
        while self._idle:
            connection = self._idle.pop()
            if not connection.closed and now - connection.idle_since < self._expiry:
                return connection
            if connection.transport is not None:
                connection.transport.abort()
        return None

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, protocol = await loop.create_connection(
                    lambda: _Connection(self._read_timeout),
                    self._host,
                    self._port,
                    ssl=self._ssl,
                    server_hostname=self._host if self._ssl is not None else None,
                )
        except TimeoutError:
            raise httpx.ConnectTimeout("connecting to the upstream timed out") from None
        except OSError as exc:
            raise httpx.ConnectError(str(exc)) from exc
        return protocol

    def close(self) -> None:
        """Close the idle connections (those in use close with their answers)."""
        for connection in self._idle:
            if connection.transport is not None:
                connection.transport.abort()
        self._idle.clear()
