"""The servers ``serve`` runs: what the proxy changes in uvicorn's protocol.

uvicorn writes an answer's head, each body message and the end of a chunked body apart; on
loopback each write runs the TCP receive path in the proxy's process. The proxy's protocol
sends the writes of one turn of the event loop together, in one ``writelines``, and must keep
their order, hold no more than a bound, and lose nothing on close.
"""

from __future__ import annotations

import asyncio
from typing import Any

import uvicorn
from uvicorn.server import ServerState

from shanoir_dicomweb_proxy._engines import _COALESCE_BYTES, LingeringProtocol
from shanoir_dicomweb_proxy._types import Receive, Scope, Send


class RecordingTransport(asyncio.Transport):
    """A transport that records what reaches the socket, one entry per system call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[bytes] = []
        self.closed = False
        self.aborted = False

    def write(self, data: Any) -> None:
        self.calls.append(bytes(data))

    def writelines(self, list_of_data: Any) -> None:
        self.calls.append(b"".join(bytes(d) for d in list_of_data))

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 50000), "sockname": ("127.0.0.1", 8080)}.get(
            name, default
        )

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def frame_app(scope: Scope, receive: Receive, send: Send) -> None:
    """A small frame's answer as the proxy sends it: a head, the body, the end."""
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"x" * 8192, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


def _protocol(app: Any) -> tuple[LingeringProtocol, RecordingTransport]:
    config = uvicorn.Config(app, lifespan="off", access_log=False, log_config=None)
    config.load()
    protocol = LingeringProtocol(config, ServerState(), app_state={})
    transport = RecordingTransport()
    protocol.connection_made(transport)
    return protocol, transport


async def test_a_small_answer_leaves_in_one_system_call() -> None:
    protocol, transport = _protocol(frame_app)
    protocol.data_received(b"GET /frames/1 HTTP/1.1\r\nHost: proxy\r\n\r\n")
    for _ in range(5):
        await asyncio.sleep(0)
    assert len(transport.calls) == 1
    answer = transport.calls[0]
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    assert answer.endswith(b"\r\n\r\n2000\r\n" + b"x" * 8192 + b"\r\n0\r\n\r\n")
    protocol.connection_lost(None)


async def test_writes_keep_their_order_and_a_large_one_is_not_held() -> None:
    protocol, transport = _protocol(frame_app)
    coalescing = protocol.transport
    coalescing.write(b"head")
    coalescing.write(b"small")
    assert transport.calls == []  # held until the end of this turn of the loop
    coalescing.write(b"y" * _COALESCE_BYTES)
    assert transport.calls == [b"headsmall" + b"y" * _COALESCE_BYTES]
    coalescing.write(b"tail")
    await asyncio.sleep(0)
    assert transport.calls[1:] == [b"tail"]


async def test_close_sends_what_is_held_and_abort_drops_it() -> None:
    protocol, transport = _protocol(frame_app)
    protocol.transport.write(b"end of an answer")
    protocol.transport.close()
    assert transport.calls == [b"end of an answer"] and transport.closed

    protocol, transport = _protocol(frame_app)
    protocol.transport.write(b"half an answer")
    protocol.transport.abort()
    await asyncio.sleep(0)
    assert transport.calls == [] and transport.aborted
