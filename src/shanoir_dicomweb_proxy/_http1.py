"""hypercorn's HTTP/1.1 connections parsed with httptools (llhttp, in C) instead of h11.

hypercorn 0.18 parses and frames HTTP/1.1 with h11, in pure Python: its state machine and
event objects were half of hypercorn's own CPU per request (0.2 ms against a trivial app, 0.1
without; bench/README.md), and h11 copies every request and response body once more (its
receive buffer, its ``b"".join`` of each chunk's framing and data). :class:`FastH11Protocol`
takes the place of hypercorn's ``H11Protocol`` and keeps everything above it (``HTTPStream``,
the app's task, keep-alive, h2 and h2c): it turns what llhttp parses into hypercorn's own
stream events, and frames the answers itself.

It handles the requests the proxy serves: HTTP/1.1 with one ``Host``. Anything else is handed,
bytes and all, to hypercorn's own h11 path for the rest of the connection, so that its answers
stay exactly hypercorn's: HTTP/1.0, an ``Upgrade`` (h2c, WebSocket) or ``CONNECT``, the HTTP/2
preface, a transfer coding other than chunked, and every request llhttp cannot parse (a
malformed one, a method it does not know, headers longer than ``h11_max_incomplete_size``). A
pipelined request of that kind, which began in the middle of a read after another request,
cannot be handed over: it gets a 400 and the connection closes, as h11 does for malformed
requests.
"""

from __future__ import annotations

import re
from collections import deque
from http import HTTPStatus
from typing import Any

import h11
import httptools
from hypercorn.events import Closed, Event, RawData, Updated
from hypercorn.protocol.events import (
    Body,
    EndBody,
    InformationalResponse,
    Request,
    Response,
    StreamClosed,
)
from hypercorn.protocol.events import Event as StreamEvent
from hypercorn.protocol.h11 import STREAM_ID, H11Protocol
from hypercorn.protocol.http_stream import HTTPStream

__all__ = ["FastH11Protocol"]

# RFC 9110 §5.1, §5.5: what h11 accepts in an answer's field names and values.
_TOKEN = re.compile(rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+")
_VALUE = re.compile(rb"(?:[\x21-\x7e\x80-\xff](?:[ \t\x21-\x7e\x80-\xff]*[\x21-\x7e\x80-\xff])?)?")

# Chunks at least this large go out apart from their framing (no copy); smaller ones are joined.
_JOIN_BELOW = 16 * 1024

_REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}


class _HandOver(Exception):
    """Raised in a parser callback: this request is for hypercorn's h11 path."""


class FastH11Protocol(H11Protocol):
    """hypercorn's ``H11Protocol`` on httptools; see the module's docstring."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._fast = True
        self._parser = httptools.HttpRequestParser(self)
        self._events: deque[tuple[str, Any]] = deque()
        # The request being parsed.
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._in_message = False
        self._head_done = False
        self._head_seen = 0
        # Its bytes from its first one while its head is incomplete (to hand it over), or
        # None when it began in the middle of a read.
        self._raw: list[bytes] | None = None
        self._feed: bytes = b""
        self._feed_at_boundary = True
        self._begun_in_feed = 0
        # The exchange under way.
        self._method = b"GET"
        self._keep_alive = True
        # Requests given to hypercorn, and requests parsed to their end: the one under way is
        # whole when they are equal (its end may be parsed before the app was even started).
        self._exchanges = 0
        self._ends_parsed = 0
        self._started = False  # the answer's head was sent
        self._response_done = False
        self._chunked = False
        self._chunk_open = False  # the last chunk's CRLF is still to send
        self._remaining: int | None = None
        self._no_body = False
        self._closing = False

    @staticmethod
    def fits(protocol: type[Any]) -> bool:
        """Whether hypercorn's ``protocol`` has what this relies on."""
        return all(
            callable(getattr(protocol, name, None))
            for name in ("handle", "stream_send", "_handle_events", "_close_stream")
        )

    # -- httptools' callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._in_message = True
        self._head_done = False
        self._head_seen = 0
        self._url = b""
        self._headers = []
        self._begun_in_feed += 1
        at_start = self._feed_at_boundary and self._begun_in_feed == 1
        self._raw = [self._feed] if at_start else None

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._head_done:  # after the head: a chunked body's trailer fields, ignored
            self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._head_done = True
        parser = self._parser
        if parser.get_http_version() != "1.1" or parser.should_upgrade():
            raise _HandOver
        method = parser.get_method()
        hosts = 0
        keep_alive = True
        expects_continue = False
        headers = []
        raw = self.config.h11_pass_raw_headers
        for name, value in self._headers:
            lowered = name.lower()
            value = value.strip(b" \t")
            if lowered == b"host":
                hosts += 1
            elif lowered == b"connection":
                tokens = [t.strip().lower() for t in value.split(b",")]
                keep_alive = keep_alive and b"close" not in tokens
            elif lowered == b"upgrade":
                raise _HandOver
            elif lowered == b"transfer-encoding" and value.lower() != b"chunked":
                raise _HandOver  # llhttp takes "gzip, chunked"; h11 refuses it (501)
            elif lowered == b"expect":
                expects_continue = value.lower() == b"100-continue"
            headers.append((name if raw else lowered, value))
        if hosts != 1 or method == b"CONNECT":
            raise _HandOver
        self._raw = None
        request = (method, self._url, headers, keep_alive, expects_continue)
        self._events.append(("request", request))

    def on_body(self, body: bytes) -> None:
        self._events.append(("body", body))

    def on_message_complete(self) -> None:
        self._in_message = False
        self._ends_parsed += 1
        self._events.append(("end", None))

    # -- hypercorn's side ----------------------------------------------------------------------

    async def handle(self, event: Event) -> None:
        if not self._fast:
            await super().handle(event)
        elif isinstance(event, RawData):
            await self._receive(event.data)
        elif isinstance(event, Closed):
            self._closing = True
            if self.stream is not None:
                await self._close_stream()

    async def _receive(self, data: bytes) -> None:
        if self._closing:
            return
        if self._raw is not None:
            self._raw.append(data)
        self._feed, self._feed_at_boundary, self._begun_in_feed = data, not self._in_message, 0
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as error:
            if not isinstance(error.__context__, _HandOver):
                raise
            if not await self._hand_over():
                self._events.append(("bad request", 400))
        except httptools.HttpParserError:
            if self._head_done:  # in the body of the request under way
                self._events.append(("bad body", 400))
            elif not await self._hand_over():
                self._events.append(("bad request", 400))
        else:
            if self._in_message and not self._head_done:
                self._head_seen += len(data)
                if self._head_seen > self.config.h11_max_incomplete_size:
                    if not await self._hand_over():
                        self._events.append(("bad request", 431))
        finally:
            self._feed = b""
        await self._deliver()

    async def _hand_over(self) -> bool:
        """Give the request being parsed, from its first byte, to hypercorn's h11 path once
        the exchange under way is over; False when its first byte is unknown."""
        if self._raw is None or self._events:
            return False
        raw, self._raw = b"".join(self._raw), None
        await self._exchange_over()
        if self._closing:
            return True
        self._fast = False
        self.connection.receive_data(raw)
        await self._handle_events()
        return True

    async def _exchange_over(self) -> None:
        """Wait until the exchange under way is over (its stream closed), or the connection."""
        while self.stream is not None and not self._closing:
            await self.can_read.clear()
            await self.can_read.wait()

    async def _deliver(self) -> None:
        events = self._events
        while events and not self._closing:
            kind, value = events[0]
            if kind == "request" or kind == "bad request":
                await self._exchange_over()  # pipelined: after this exchange, as h11 pauses
                if self._closing:
                    break
                events.popleft()
                if kind == "bad request":
                    await self._reject(value, answer=True)
                else:
                    await self._start(*value)
            elif kind == "body":
                events.popleft()
                if self.stream is not None:
                    await self.stream.handle(Body(stream_id=STREAM_ID, data=value))
            elif kind == "end":
                events.popleft()
                if self.stream is not None:
                    await self.stream.handle(EndBody(stream_id=STREAM_ID))
            else:  # a malformed body: answered unless the app's answer has begun
                events.clear()
                await self._reject(value, answer=not self._started)

    async def _start(
        self,
        method: bytes,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        keep_alive: bool,
        expects_continue: bool,
    ) -> None:
        self._method = method
        self._keep_alive = keep_alive
        self._exchanges += 1
        self._started = self._response_done = False
        self._chunked = self._chunk_open = self._no_body = False
        self._remaining = None
        await self.send(Updated(idle=False))
        self.stream = HTTPStream(
            self.app,
            self.config,
            self.context,
            self.task_group,
            self.ssl,
            self.client,
            self.server,
            self.stream_send,
            STREAM_ID,
        )
        await self.stream.handle(
            Request(
                stream_id=STREAM_ID,
                headers=headers,
                http_version="1.1",
                method=method.decode("ascii").upper(),
                raw_path=target,
                state=self.connection_state,
            )
        )
        self.keep_alive_requests += 1
        await self.context.mark_request()
        if expects_continue and not self._started:  # unless the app has answered already
            await self.send(RawData(data=self._head(100, self.config.response_headers("h11"))))

    async def _reject(self, status: int, *, answer: bool) -> None:
        """A request llhttp could not parse: as h11 answers one, then close."""
        if answer:
            headers = [(b"content-length", b"0"), (b"connection", b"close")]
            head = self._head(status, headers + self.config.response_headers("h11"))
            await self.send(RawData(data=head))
        self._closing = True
        await self.send(Closed())

    async def stream_send(self, event: StreamEvent) -> None:
        if not self._fast:
            await super().stream_send(event)
        elif isinstance(event, StreamClosed):
            await self._recycle()
        elif self._closing:  # a malformed request was answered, or the connection is gone
            return
        elif isinstance(event, Response):
            await self._send_head(event)
        elif isinstance(event, Body):
            await self._send_body(event.data)
        elif isinstance(event, EndBody):
            await self._end_body()
        elif not isinstance(event, InformationalResponse):  # 1xx are ignored on HTTP/1, as h11's
            await super().stream_send(event)

    async def _send_head(self, event: Response) -> None:
        headers = [*event.headers, *self.config.response_headers("h11")]
        if event.status_code < 200:
            await self.send(RawData(data=self._head(event.status_code, headers)))
            return
        if self.keep_alive_requests >= self.config.keep_alive_max_requests:
            headers.append((b"connection", b"close"))
        status = event.status_code
        framing: list[bytes] = []
        length: int | None = None
        closes = False
        for name, value in headers:
            lowered = name.lower()
            if lowered == b"transfer-encoding":
                framing.append(value.strip().lower())
            elif lowered == b"content-length":
                length = _content_length(value)
            elif lowered == b"connection":
                closes = closes or b"close" in (t.strip().lower() for t in value.split(b","))
        if framing and framing != [b"chunked"]:
            raise h11.LocalProtocolError("only Transfer-Encoding: chunked is supported")
        # h11's framing (RFC 9112 §6.3): a HEAD answer's headers are those of the GET.
        chunked = status not in (204, 304) and (bool(framing) or length is None)
        if chunked:
            length = None
            headers = [(n, v) for n, v in headers if n.lower() != b"content-length"]
            if not framing:
                headers.append((b"Transfer-Encoding", b"chunked"))
        if not self._keep_alive:  # the client said close: so does the answer, as h11 makes it
            tokens = {
                t.strip().lower()
                for n, v in headers
                if n.lower() == b"connection"
                for t in v.split(b",")
                if t.strip()
            }
            headers = [(n, v) for n, v in headers if n.lower() != b"connection"]
            headers.append(
                (b"Connection", b", ".join(sorted(tokens - {b"keep-alive"} | {b"close"})))
            )
        head = self._head(status, headers)
        self._started = True
        self._keep_alive = self._keep_alive and not closes
        self._no_body = status in (204, 304) or self._method == b"HEAD"
        self._chunked = chunked
        self._remaining = length
        await self.send(RawData(data=head))

    def _head(self, status: int, headers: list[tuple[bytes, bytes]]) -> bytes:
        lines = [b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b""))]
        for name, value in headers:
            if not _TOKEN.fullmatch(name) or not _VALUE.fullmatch(value):
                raise h11.LocalProtocolError("illegal header name or value in an answer")
            lines.append(b"%s: %s\r\n" % (name, value))
        lines.append(b"\r\n")
        return b"".join(lines)

    async def _send_body(self, data: bytes) -> None:
        if not data or self._no_body:
            if data and self._method != b"HEAD":
                raise h11.LocalProtocolError("a body in an answer that has none")
            return
        if self._chunked:
            size = b"%s%x\r\n" % (b"\r\n" if self._chunk_open else b"", len(data))
            self._chunk_open = True
            if len(data) < _JOIN_BELOW:
                await self.send(RawData(data=size + data))
            else:  # the data as it is, without a copy; its CRLF goes with what follows
                await self.send(RawData(data=size))
                await self.send(RawData(data=data))
            return
        assert self._remaining is not None
        if len(data) > self._remaining:
            raise h11.LocalProtocolError("Too much data for declared Content-Length")
        self._remaining -= len(data)
        await self.send(RawData(data=data))

    async def _end_body(self) -> None:
        if self._chunked and not self._no_body:
            await self.send(RawData(data=b"\r\n0\r\n\r\n" if self._chunk_open else b"0\r\n\r\n"))
        elif self._remaining and not self._no_body:
            raise h11.LocalProtocolError("Too little data for declared Content-Length")
        self._response_done = True

    async def _recycle(self) -> None:
        await self._close_stream()
        if (
            not self.context.terminated.is_set()
            and self._ends_parsed >= self._exchanges
            and self._response_done
            and self._keep_alive
            and not self._closing
        ):
            await self.can_read.set()
            await self.send(Updated(idle=True))
        else:
            self._closing = True
            await self.can_read.set()
            await self.send(Closed())


def _content_length(value: bytes) -> int:
    if not value.strip().isdigit():
        raise h11.LocalProtocolError("illegal Content-Length in an answer")
    return int(value)
