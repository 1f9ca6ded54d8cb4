"""hypercorn as ``serve`` runs it reads an upload in pieces of up to 256 KiB, not its own
64 KiB: each piece costs an h11 event, an ASGI message and a turn of every layer."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx

from shanoir_dicomweb_proxy.testing import free_port

from .support.sockets import settle

_SERVER = """
import asyncio, sys
from hypercorn.asyncio import serve
from shanoir_dicomweb_proxy._engines import fix_hypercorn, hypercorn_config
from shanoir_dicomweb_proxy import Settings

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    largest, more = 0, True
    while more:
        message = await receive()
        largest = max(largest, len(message.get("body", b"")))
        more = message.get("more_body", False)
    body = str(largest).encode()
    headers = [(b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})

fix_hypercorn()
asyncio.run(serve(app, hypercorn_config(Settings.from_toml(sys.argv[1]), 1)))
"""


def _answers(url: str) -> bool:
    try:
        return httpx.post(url, content=b"x").status_code == 200
    except httpx.TransportError:
        return False


def test_an_upload_is_read_in_pieces_larger_than_64_kib(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "proxy.toml"
    config.write_text(
        f'[server]\nbind = "127.0.0.1:{port}"\n[upstream]\nurl = "http://x"\n'
        '[auth]\nenabled = false\n[mapping]\nbackend = "identity"\n'
    )
    script = tmp_path / "reads.py"
    script.write_text(_SERVER)
    url = f"http://127.0.0.1:{port}/"
    with subprocess.Popen([sys.executable, str(script), str(config)]) as server:
        try:
            settle(lambda: _answers(url), bool, 20.0)
            # 32 MiB at once: the socket holds far more than 64 KiB between two reads.
            largest = max(
                int(httpx.post(url, content=b"x" * (32 << 20), timeout=60).text) for _ in range(3)
            )
        finally:
            server.terminate()
    assert 64 * 1024 < largest <= 256 * 1024
