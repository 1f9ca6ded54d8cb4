"""hypercorn's HTTP/1.1 on httptools (``_http1.FastH11Protocol``): the bytes it writes are
those of hypercorn's own h11 path, request for request, but for the reason phrase.

Each case is fed, as raw bytes, to a connection of hypercorn's asyncio server as ``serve`` sets
it up, once with the proxy's protocol and once with hypercorn's ``H11Protocol``; the answers
must be the same once the ``Date`` is masked and the status line's reason dropped (h11 sends
none). The requests it hands to h11 (HTTP/1.0, upgrades, malformed ones) are among them.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import Callable

import hypercorn.protocol
import pytest
from hypercorn.protocol.h11 import H11Protocol

from shanoir_dicomweb_proxy._engines import fix_hypercorn
from shanoir_dicomweb_proxy._http1 import FastH11Protocol
from shanoir_dicomweb_proxy._types import Receive, Scope, Send

from .support.connections import HypercornConnection, frame_app

App = Callable[[Scope, Receive, Send], object]


async def echo_app(scope: Scope, receive: Receive, send: Send) -> None:
    """Reads the whole body; answers what it got, with a Content-Length."""
    body = b""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        body += message.get("body", b"")
        if not message.get("more_body", False):
            break
    digest = hashlib.sha256(body).hexdigest()[:16].encode()
    host = [v for n, v in scope["headers"] if n == b"host"]
    answer = b"%s %s %s %d %s %r" % (
        scope["method"].encode(),
        scope["raw_path"],
        scope["query_string"],
        len(body),
        digest,
        host,
    )
    headers = [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(answer))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": answer})


def answering(status: int, headers: list[tuple[bytes, bytes]], *bodies: bytes) -> App:
    """An app that answers at once, without reading the request's body."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": status, "headers": headers})
        for index, body in enumerate(bodies):
            more = index < len(bodies) - 1
            await send({"type": "http.response.body", "body": body, "more_body": more})
        if not bodies:
            await send({"type": "http.response.body", "body": b""})

    return app


async def slow_frame_app(scope: Scope, receive: Receive, send: Send) -> None:
    for _ in range(5):  # a pipelined request must wait for this answer
        await asyncio.sleep(0)
    await frame_app(scope, receive, send)


GET = b"GET /frames/1?x=%2F HTTP/1.1\r\nHost: proxy\r\n\r\n"
POST = b"POST /studies HTTP/1.1\r\nHost: proxy\r\nContent-Length: 11\r\n\r\nhello world"
CHUNKED = (
    b"POST /studies HTTP/1.1\r\nHost: proxy\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n"
)
H2C = (
    b"GET / HTTP/1.1\r\nHost: proxy\r\nConnection: Upgrade, HTTP2-Settings\r\n"
    b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
)

SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # an empty HTTP/2 SETTINGS frame

CASES: dict[str, tuple[App, list[bytes]]] = {
    "chunked answer": (frame_app, [GET]),
    "content-length answer": (echo_app, [GET]),
    "three requests, one connection": (echo_app, [GET, POST, CHUNKED]),
    "HEAD": (frame_app, [b"HEAD /frames/1 HTTP/1.1\r\nHost: proxy\r\n\r\n"]),
    "204": (answering(204, []), [GET]),
    "304 with a length": (answering(304, [(b"content-length", b"12")]), [GET]),
    "client says close": (frame_app, [b"GET / HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n"]),
    "app says close": (answering(200, [(b"connection", b"close")], b"bye"), [GET]),
    "pipelined": (slow_frame_app, [GET + GET + GET]),
    "body with a length": (echo_app, [POST]),
    "body in two reads": (echo_app, [POST[:60], POST[60:]]),
    "head in two reads": (echo_app, [POST[:20], POST[20:]]),
    "chunked body and trailer": (echo_app, [CHUNKED]),
    "100-continue": (
        echo_app,
        [
            b"PUT /x HTTP/1.1\r\nHost: p\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n",
            b"abc",
        ],
    ),
    "app answers before the body": (answering(413, [], b"too big"), [POST[:62]]),
    "answer longer than its length": (
        answering(200, [(b"content-length", b"2")], b"abc"),
        [GET],
    ),
    "answer shorter than its length": (
        answering(200, [(b"content-length", b"9")], b"abc"),
        [GET],
    ),
    "header value with CRLF": (answering(200, [(b"x-a", b"1\r\nx-injected: 2")], b"x"), [GET]),
    "bad chunk size": (
        echo_app,
        [b"POST / HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhi\r\n"],
    ),
    # Requests h11 and llhttp must read alike (or llhttp hand to h11):
    "bare LF": (echo_app, [b"GET / HTTP/1.1\nHost: a\n\n"]),
    "obs-fold": (echo_app, [b"GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n  2\r\n\r\n"]),
    "NUL in a value": (echo_app, [b"GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\x002\r\n\r\n"]),
    "space in the target": (echo_app, [b"GET /a b HTTP/1.1\r\nHost: a\r\n\r\n"]),
    "absolute target": (echo_app, [b"GET http://a/x?y HTTP/1.1\r\nHost: a\r\n\r\n"]),
    "OPTIONS *": (echo_app, [b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n"]),
    "empty Host": (echo_app, [b"GET / HTTP/1.1\r\nHost:\r\n\r\n"]),
    "blanks around values": (echo_app, [b"GET / HTTP/1.1\r\nHost: a  \r\nX-A: b \t\r\n\r\n"]),
    "two equal lengths": (
        echo_app,
        [b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc"],
    ),
    "negative length": (echo_app, [b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n"]),
    "chunk extension": (
        echo_app,
        [
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3;x=y\r\nabc\r\n0\r\n\r\n"
        ],
    ),
    "gzip, chunked": (
        echo_app,
        [b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n"],
    ),
    "chunked twice": (
        echo_app,
        [
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        ],
    ),
    # Handed to h11:
    "HTTP/1.0": (frame_app, [b"GET /frames/1 HTTP/1.0\r\n\r\n"]),
    "HTTP/1.0 keep-alive": (echo_app, [b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"]),
    "no Host": (echo_app, [b"GET / HTTP/1.1\r\n\r\n"]),
    "two Hosts": (echo_app, [b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"]),
    "malformed header": (echo_app, [b"GET / HTTP/1.1\r\nHost: a\r\nBad Header\r\n\r\n"]),
    "space before colon": (echo_app, [b"GET / HTTP/1.1\r\nHost : a\r\n\r\n"]),
    "method llhttp does not know": (echo_app, [b"BREW /pot HTTP/1.1\r\nHost: a\r\n\r\n"]),
    "length and chunked": (
        echo_app,
        [b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"],
    ),
    "headers too long": (echo_app, [b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"b" * 20000]),
    "h2c upgrade": (echo_app, [H2C]),
    "HTTP/2 preface": (echo_app, [b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + SETTINGS]),
    "HTTP/1.0 after a request": (echo_app, [GET, b"GET / HTTP/1.0\r\n\r\n"]),
    "malformed after a request": (echo_app, [GET, b"GET / HTTP/1.1\r\nHost: a\r\nBad\r\n\r\n"]),
    "malformed pipelined": (echo_app, [GET + b"GET / HTTP/1.1\r\nHost: a\r\nBad\r\n\r\n"]),
}


def _masked(data: bytes) -> bytes:
    """``data`` with each answer's reason phrase dropped, its Date masked, its header names in
    lower case and its header lines in order (RFC 9110 §5.3: the order of different fields
    carries no meaning)."""

    def head(match: re.Match[bytes]) -> bytes:
        lines = match.group(2).split(b"\r\n")
        fields = sorted(re.sub(rb"^[^:]+", lambda m: m.group(0).lower(), f) for f in lines if f)
        fields = [b"date: -" if f.startswith(b"date:") else f for f in fields]
        return b"HTTP/1.1 " + match.group(1) + b"\r\n" + b"".join(f + b"\r\n" for f in fields)

    return re.sub(rb"HTTP/1\.1 (\d{3})[^\r\n]*\r\n((?:[^\r\n]+\r\n)*)", head, data)


async def _exchange(app: App, reads: list[bytes]) -> tuple[bytes, bool]:
    """What the server wrote for ``reads``, each sent once the last was answered, and whether
    the connection stayed open."""
    connection = HypercornConnection(app)
    for data in reads:
        connection.reader.feed_data(data)
        await connection.settle()
    for _ in range(200):  # closing takes a few more turns of the loop, with nothing written
        await asyncio.sleep(0)
    stayed_open = not connection.closed
    connection.reader.feed_eof()
    await connection.settle()
    if not connection.task.done():
        connection.task.cancel()
    await asyncio.gather(connection.task, return_exceptions=True)
    return b"".join(connection.calls), stayed_open


@pytest.fixture(autouse=True)
def _ours() -> None:
    fix_hypercorn()
    assert hypercorn.protocol.H11Protocol is FastH11Protocol  # type: ignore[attr-defined]


@pytest.mark.parametrize("case", CASES)
async def test_answers_are_those_of_h11(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    app, reads = CASES[case]
    ours, ours_open = await _exchange(app, reads)
    with monkeypatch.context() as patch:
        patch.setattr(hypercorn.protocol, "H11Protocol", H11Protocol)
        theirs, theirs_open = await _exchange(app, reads)
    assert theirs, "h11 wrote nothing: the case tests nothing"
    assert _masked(ours) == _masked(theirs)
    assert ours_open == theirs_open


async def test_answers_have_their_reason_phrase() -> None:
    written, _ = await _exchange(frame_app, [GET])
    assert written.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Transfer-Encoding: chunked\r\n" in written


async def test_a_request_body_arrives_whole_and_in_order() -> None:
    body = bytes(range(256)) * 4096  # 1 MiB, over several reads and body messages
    head = b"POST /studies HTTP/1.1\r\nHost: p\r\nContent-Length: %d\r\n\r\n" % len(body)
    reads = [head + body[:1000]] + [body[i : i + 65536] for i in range(1000, len(body), 65536)]
    written, stayed_open = await _exchange(echo_app, reads)
    digest = hashlib.sha256(body).hexdigest()[:16].encode()
    assert b"POST /studies  %d %s" % (len(body), digest) in written
    assert stayed_open


async def test_a_pipelined_request_waits_for_the_answer_before_it() -> None:
    written, stayed_open = await _exchange(slow_frame_app, [GET + GET])
    first, second = written.split(b"HTTP/1.1 200 OK\r\n")[1:]
    assert first.endswith(b"\r\n0\r\n\r\n") and second.endswith(b"\r\n0\r\n\r\n")
    assert stayed_open


async def test_a_header_with_crlf_never_reaches_the_wire() -> None:
    written, _ = await _exchange(answering(200, [(b"x-a", b"1\r\nx-injected: 2")], b"x"), [GET])
    assert b"x-injected" not in written.lower()
