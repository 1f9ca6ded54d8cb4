"""In-process connections of the servers ``serve`` runs, on transports that record what
reaches the socket: hypercorn's asyncio server as ``serve`` sets it up, fed raw bytes."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from hypercorn.app_wrappers import ASGIWrapper
from hypercorn.asyncio.tcp_server import TCPServer
from hypercorn.asyncio.worker_context import WorkerContext

from shanoir_dicomweb_proxy import Settings
from shanoir_dicomweb_proxy._engines import fix_hypercorn, hypercorn_config
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


GET = b"GET /frames/1 HTTP/1.1\r\nHost: proxy\r\n\r\n"
FRAME_ANSWER_END = b"\r\n\r\n2000\r\n" + b"x" * 8192 + b"\r\n0\r\n\r\n"


class FakeSocket:
    family = socket.AF_INET

    def getpeername(self) -> tuple[str, int]:
        return ("127.0.0.1", 50000)

    def getsockname(self) -> tuple[str, int]:
        return ("127.0.0.1", 8080)


class HypercornConnection(RecordingTransport):
    """One client connection of hypercorn's asyncio server (``TCPServer``, as ``serve`` sets it
    up), on a transport that records its system calls."""

    def __init__(
        self, app: Any, keep_alive_timeout: float = 75.0, context: WorkerContext | None = None
    ) -> None:
        super().__init__()
        fix_hypercorn()
        settings = Settings.from_dict(
            {
                "upstream": {"url": "http://pacs.invalid"},
                "auth": {"enabled": False},
                "mapping": {"backend": "identity"},
            }
        )
        config: Any = hypercorn_config(settings, 1)
        config.keep_alive_timeout = keep_alive_timeout
        self.context = context or WorkerContext(None)
        loop = asyncio.get_running_loop()
        self.reader = asyncio.StreamReader()
        self.protocol = asyncio.StreamReaderProtocol(self.reader)
        self.protocol.connection_made(self)
        writer = asyncio.StreamWriter(self, self.protocol, self.reader, loop)
        wrapper = ASGIWrapper(app)
        self.server = TCPServer(wrapper, loop, config, self.context, {}, self.reader, writer)
        self.task = loop.create_task(self.server.run())

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"socket": FakeSocket()}.get(name, default)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self.protocol

    def get_write_buffer_size(self) -> int:
        return 0

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    async def request(self, data: bytes = GET) -> bytes:
        """Send a request; the bytes hypercorn wrote for it."""
        before = len(self.calls)
        self.reader.feed_data(data)
        for _ in range(50):
            await asyncio.sleep(0)
            if b"".join(self.calls[before:]).endswith(b"\r\n0\r\n\r\n"):
                break
        return b"".join(self.calls[before:])

    async def settle(self, turns: int = 30) -> bytes:
        """Let the server run until it wrote nothing for ``turns`` turns of the loop, or its
        connection ended; everything it wrote."""
        quiet, seen = 0, len(self.calls)
        while quiet < turns and not self.task.done():
            await asyncio.sleep(0)
            if len(self.calls) == seen:
                quiet += 1
            else:
                seen, quiet = len(self.calls), 0
        return b"".join(self.calls)

    async def hang_up(self) -> None:
        self.reader.feed_eof()
        await asyncio.wait_for(self.task, 5)
