"""Calling the ASGI stack in-process, for tests that need no real server."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import httpx

from shanoir_dicomweb_proxy import DicomWebProxy, Settings, Upstream

CORE = {
    "auth": {"enabled": False},
    "mapping": {"backend": "identity"},
    "access": {"backend": "allow_all"},
}


@dataclass
class Answer:
    status: int
    headers: dict[bytes, bytes]
    body: bytes


def build(handler: Any, **sections: Any) -> DicomWebProxy:
    """The whole stack in front of an ``httpx.MockTransport(handler)`` upstream."""
    data: dict[str, Any] = {**CORE, **sections}
    data["upstream"] = {"url": "http://pacs.invalid/dicom-web", **sections.get("upstream", {})}
    settings = Settings.from_dict(data)
    upstream = Upstream(settings.upstream, transport=httpx.MockTransport(handler))
    return DicomWebProxy(settings, upstream=upstream)


async def call(
    app: Any,
    method: str,
    raw_path: bytes,
    query: bytes = b"",
    headers: list[tuple[bytes, bytes]] | None = None,
    body: bytes = b"",
) -> Answer:
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        await asyncio.Event().wait()  # a client that stays: no disconnect
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": unquote(raw_path.decode("latin-1"), errors="replace"),
        "raw_path": raw_path,
        "root_path": "",
        "query_string": query,
        "headers": [(b"host", b"proxy.test:8080"), *(headers or [])],
        "server": ("127.0.0.1", 8080),
        "client": ("127.0.0.1", 5000),
    }
    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    return Answer(
        status=start["status"],
        headers=dict(start.get("headers", [])),
        body=b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"),
    )
