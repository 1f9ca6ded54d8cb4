"""The forwarding path's own HTTP/1.1 client (``_upstream/_wire.py``) against small servers on
loopback: framing, keep-alive, timeouts, errors, backpressure."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest

from shanoir_dicomweb_proxy._upstream._wire import WirePool, WireResponse

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Server:
    """An asyncio server on loopback that counts its connections and the requests' heads;
    it runs ``handler`` on each connection, or answers the requests, on whatever connection,
    with ``answers`` in turn."""

    def __init__(self, handler: Handler | None = None, *, answers: tuple[bytes, ...] = ()) -> None:
        self.handler = handler or self._answer
        self.answers = answers
        self.connections = 0
        self.heads: list[bytes] = []
        self.port = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while len(self.heads) < len(self.answers):
            await self.head(reader)
            writer.write(self.answers[len(self.heads) - 1])
            await writer.drain()
        await reader.read()  # then wait for the client to close

    async def head(self, reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        self.heads.append(head)
        return head


def _pool(port: int, **overrides: float) -> WirePool:
    options: dict[str, float] = {
        "max_connections": 4,
        "max_keepalive": 4,
        "keepalive_expiry": 5.0,
        "connect_timeout": 2.0,
        "read_timeout": 2.0,
        "pool_timeout": 2.0,
        **overrides,
    }
    return WirePool(f"http://127.0.0.1:{port}/dicom-web", **options)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def serving(
    handler: Handler | None = None, *, answers: tuple[bytes, ...] = (), **pool: float
) -> AsyncIterator[tuple[Server, WirePool]]:
    """A :class:`Server` listening, and a pool of connections to it (``pool``: its options)."""
    server = Server(handler, answers=answers)
    listening = await asyncio.start_server(server.serve, "127.0.0.1", 0)
    server.port = listening.sockets[0].getsockname()[1]
    connections = _pool(server.port, **pool)
    try:
        yield server, connections
    finally:
        connections.close()
        listening.close()


def _once(answer: bytes) -> Handler:
    """A handler that answers one request with ``answer``, then closes the connection."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()

    return handle


async def _body(response: WireResponse) -> bytes:
    data = b"".join([chunk async for chunk in response.chunks()])
    await response.aclose()
    return data


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: text/plain\r\n\r\nhello"


async def test_request_line_host_and_headers() -> None:
    async with serving(answers=(OK,)) as (server, pool):
        response = await pool.request("GET", "/studies?limit=1", [(b"x-request-id", b"abc")])
        assert response.status == 200
        assert (b"Content-Type", b"text/plain") in response.headers
        assert await _body(response) == b"hello"
    head = server.heads[0]
    assert head.startswith(b"GET /dicom-web/studies?limit=1 HTTP/1.1\r\n")
    assert f"Host: 127.0.0.1:{server.port}\r\n".encode() in head
    assert b"x-request-id: abc\r\n" in head and b"accept: */*\r\n" in head


async def test_a_connection_read_to_its_end_is_reused() -> None:
    async with serving(answers=(OK, OK, OK)) as (server, pool):
        for _ in range(3):
            assert await _body(await pool.request("GET", "/a", [])) == b"hello"
    assert server.connections == 1


async def test_a_half_read_answer_closes_its_connection() -> None:
    big = b"HTTP/1.1 200 OK\r\nContent-Length: 3000000\r\n\r\n" + b"x" * 3_000_000
    async with serving(answers=(big, OK)) as (server, pool):
        response = await pool.request("GET", "/a", [])
        chunks = response.chunks()
        assert await anext(chunks)
        await response.aclose()
        assert await _body(await pool.request("GET", "/a", [])) == b"hello"
    assert server.connections == 2


async def test_chunked_and_eof_framed_bodies() -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    )
    async with serving(answers=(chunked,)) as (_, pool):
        assert await _body(await pool.request("GET", "/a", [])) == b"abcde"
    eof = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + b"y" * 100_000
    async with serving(_once(eof)) as (_, pool):
        assert await _body(await pool.request("GET", "/a", [])) == b"y" * 100_000


def _in_pieces(head: bytes, *pieces: bytes) -> Handler:
    """A handler that answers each request with ``head`` then ``pieces``, one write each, a
    moment apart (so that the body arrives after the head, in several reads)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await reader.readuntil(b"\r\n\r\n")
            for data in (head, *pieces):
                writer.write(data)
                await writer.drain()
                await asyncio.sleep(0.02)

    return handle


async def test_a_body_after_its_head_arrives_whole_and_the_connection_is_reused() -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 300000\r\n\r\n"
    pieces = (b"a" * 100_000, b"b" * 150_000, b"c" * 50_000)
    async with serving(_in_pieces(head, *pieces)) as (server, pool):
        for _ in range(2):
            response = await pool.request("GET", "/a", [])
            chunks = [chunk async for chunk in response.chunks()]
            await response.aclose()
            assert b"".join(chunks) == b"".join(pieces) and len(chunks) >= 3
    assert server.connections == 1


async def test_bytes_past_the_announced_end_are_dropped_with_their_connection() -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
    overflow = b"hello" + b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nWRONG"
    async with serving(_in_pieces(head, overflow)) as (server, pool):
        assert await _body(await pool.request("GET", "/a", [])) == b"hello"
        assert await _body(await pool.request("GET", "/a", [])) == b"hello"
    assert server.connections == 2


async def test_a_body_shorter_than_announced_fails() -> None:
    short = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"z" * 10
    async with serving(_once(short)) as (_, pool):
        response = await pool.request("GET", "/a", [])
        with pytest.raises(httpx.RemoteProtocolError, match="mid-body"):
            await _body(response)


async def test_timeouts_and_refusal() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    async with serving(silent, read_timeout=0.3) as (server, pool):
        started = asyncio.get_running_loop().time()
        with pytest.raises(httpx.ReadTimeout):
            await pool.request("GET", "/a", [])
        assert 0.25 < asyncio.get_running_loop().time() - started < 2
    with pytest.raises(httpx.ConnectError):  # nothing listens there any more
        await _pool(server.port).request("GET", "/a", [])


def _trickle(pieces: int, pause: float) -> Handler:
    """A handler that sends its answer's body a byte at a time, ``pause`` seconds apart, then
    stays silent without closing."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (pieces + 1))
        for _ in range(pieces):
            await asyncio.sleep(pause)
            writer.write(b"x")
            await writer.drain()
        await reader.read()

    return handle


async def test_the_read_timeout_runs_from_the_last_byte_received() -> None:
    # 0.3 s between bytes keeps a 0.5 s timeout away for 1.5 s; silence past it does not.
    async with serving(_trickle(5, 0.3), read_timeout=0.5) as (_, pool):
        response = await pool.request("GET", "/a", [])
        received, last = b"", 0.0
        loop = asyncio.get_running_loop()
        with pytest.raises(httpx.ReadTimeout):
            async for chunk in response.chunks():
                received += chunk
                last = loop.time()
        assert received == b"xxxxx"
        assert 0.45 < loop.time() - last < 1.0
        await response.aclose()


async def test_a_request_given_up_before_its_head_closes_its_connection_at_once() -> None:
    closed = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await reader.read()  # until the client closes
        closed.set()

    async with serving(silent, read_timeout=5.0) as (_, pool):
        request = asyncio.ensure_future(pool.request("GET", "/a", []))
        await asyncio.sleep(0.2)
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
        await asyncio.wait_for(closed.wait(), 1.0)  # not after the 5 s read timeout


async def test_pool_limit_waits_then_times_out() -> None:
    async with serving(answers=(OK, OK), max_connections=1, pool_timeout=0.2) as (_, pool):
        held = await pool.request("GET", "/a", [])
        with pytest.raises(httpx.PoolTimeout):
            await pool.request("GET", "/a", [])
        assert await _body(held) == b"hello"
        assert await _body(await pool.request("GET", "/a", [])) == b"hello"  # the slot is back


async def test_a_slow_reader_pauses_the_upstream() -> None:
    sent = 0

    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 67108864\r\n\r\n")
        piece = b"p" * 65536
        for _ in range(1024):
            writer.write(piece)
            await writer.drain()  # blocks once the proxy stops reading
            sent += len(piece)

    async with serving(flood) as (_, pool):
        response = await pool.request("GET", "/a", [])
        await asyncio.sleep(0.5)  # nobody reads the body meanwhile
        # Bounded by the pause threshold plus the kernel's socket buffers, far below 64 MiB.
        assert sent < 16 * 1024 * 1024
        chunks = _limited(response.chunks(), 4 * 1024 * 1024)
        assert sum([len(chunk) async for chunk in chunks]) >= 4 * 1024 * 1024
        await response.aclose()


async def _limited(chunks: AsyncIterator[bytes], size: int) -> AsyncIterator[bytes]:
    seen = 0
    async for chunk in chunks:
        yield chunk
        seen += len(chunk)
        if seen >= size:
            return
