"""A small misbehaving HTTP upstream, for the failures a real PACS will not produce on demand.

Only for fault injection: every normal behaviour is tested against the real Orthanc.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from dataclasses import dataclass, field

SLOW_CHUNKS = 30


@dataclass
class FaultServer:
    """Answers every request according to ``mode``; runs in a thread on a loopback port.

    Modes:
      ``reset``      a 200 with Content-Length 8 MiB, 1 MiB of body, then a TCP reset.
      ``eof``        a multipart 200 framed by EOF (like Orthanc's series retrieve) that
                     closes before its closing delimiter.
      ``silent``     reads the request and never answers.
      ``error500``   a 500 with an HTML body.
      ``trickle``    a 200 whose body never ends: 64 KiB every 50 ms until the peer leaves.
      ``json``       a small JSON 200 (used to count requests).
      ``etag``       a 200 with an ETag, or 304 when If-None-Match names it.
      ``slow``       a 200 of ``SLOW_CHUNKS`` × 64 KiB with a Content-Length, a chunk every
                     100 ms.

    The head of the last request is kept in ``last_request``.
    """

    mode: str = "json"
    port: int = 0
    requests: int = 0
    last_request: bytes = b""
    disconnects: list[float] = field(default_factory=list)
    _sock: socket.socket | None = None

    def start(self) -> FaultServer:
        self._sock = socket.create_server(("127.0.0.1", self.port))
        self.port = self._sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/dicom-web"

    def stop(self) -> None:
        if self._sock is not None:
            # Shutting the socket down wakes the thread blocked in accept(); a bare close
            # leaves it serving one more connection (Linux).
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()

    def _serve(self) -> None:
        assert self._sock is not None
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            self.requests += 1
            self.last_request = data.split(b"\r\n\r\n")[0]
            try:
                getattr(self, "_" + self.mode)(conn)
            except OSError:
                self.disconnects.append(time.monotonic())

    def _reset(self, conn: socket.socket) -> None:
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Length: 8388608\r\n\r\n" + b"x" * (1 << 20)
        )
        time.sleep(0.2)
        # SO_LINGER 0: close() sends RST instead of FIN.
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")

    def _eof(self, conn: socket.socket) -> None:
        conn.sendall(
            b'HTTP/1.1 200 OK\r\nContent-Type: multipart/related; type="application/dicom"; '
            b"boundary=XYZ\r\nConnection: close\r\n\r\n"
            b"--XYZ\r\nContent-Type: application/dicom\r\n\r\n" + b"d" * 300000
        )

    def _silent(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        if conn.recv(1) == b"":  # the proxy gave up on us
            self.disconnects.append(time.monotonic())

    def _error500(self, conn: socket.socket) -> None:
        body = b"<html>Internal Server Error at /secret/path</html>"
        conn.sendall(
            b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/html\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )

    def _trickle(self, conn: socket.socket) -> None:
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b"%x\r\n" % 65536 + b"t" * 65536 + b"\r\n"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            conn.sendall(chunk)
            time.sleep(0.05)

    def _slow(self, conn: socket.socket) -> None:
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Length: %d\r\n\r\n" % (SLOW_CHUNKS * 65536)
        )
        for _ in range(SLOW_CHUNKS):
            time.sleep(0.1)
            conn.sendall(b"s" * 65536)

    def _json(self, conn: socket.socket) -> None:
        body = b"[]"
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/dicom+json\r\n"
            b"Content-Length: 2\r\n\r\n" + body
        )

    def _etag(self, conn: socket.socket) -> None:
        if b'if-none-match: "v1"' in self.last_request.lower():
            conn.sendall(b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\n\r\n')
            return
        conn.sendall(
            b'HTTP/1.1 200 OK\r\nContent-Type: application/dicom+json\r\nETag: "v1"\r\n'
            b"Set-Cookie: session=abc\r\nWWW-Authenticate: Basic realm=x\r\n"
            b"Content-Length: 2\r\n\r\n[]"
        )
