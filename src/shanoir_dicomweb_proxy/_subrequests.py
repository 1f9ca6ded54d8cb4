"""Searches the proxy runs itself, through the rest of the stack, on behalf of a request.

Access pages through the upstream to filter a search, the rewrite layer checks that a path's
series and instance belong to its study, STOW looks up what the PACS stored: each builds a
:class:`~shanoir_dicomweb_proxy._request.DicomWebRequest` and runs it through the layers below
it, with the client's headers but its own ``Accept``.
"""

from __future__ import annotations

from typing import Any

import orjson

from ._errors import UpstreamError
from ._headers import wants_dicom_xml
from ._problems import send_json
from ._request import DicomWebRequest
from ._scope import set_dicomweb_request
from ._types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["empty_search", "run_search", "search_json"]


async def run_search(
    app: ASGIApp, scope: Scope, receive: Receive, request: DicomWebRequest, *, accept: bytes
) -> tuple[bytes, bytes]:
    """Run the search ``request`` through ``app`` (the rest of the stack) on behalf of the
    request of ``scope``, asking for ``accept``: the answer's content type and body, both
    empty for 204."""
    headers = [(k, v) for k, v in scope["headers"] if k != b"accept"]
    inner = {**scope, "headers": [*headers, (b"accept", accept)]}
    set_dicomweb_request(inner, request)
    status = 0
    content_type = b""
    chunks: list[bytes] = []

    async def collect(message: Message) -> None:
        nonlocal status, content_type
        if message["type"] == "http.response.start":
            status = message["status"]
            content_type = dict(message.get("headers", [])).get(b"content-type", b"")
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(inner, receive, collect)
    if status == 204:
        return b"", b""
    if status != 200:
        raise UpstreamError(f"the upstream answered a search with status {status}")
    return content_type, b"".join(chunks)


async def search_json(
    app: ASGIApp, scope: Scope, receive: Receive, request: DicomWebRequest
) -> list[dict[str, Any]]:
    """:func:`run_search` for DICOM JSON: the rows."""
    _, body = await run_search(app, scope, receive, request, accept=b"application/dicom+json")
    try:
        rows = orjson.loads(body or b"[]")
    except orjson.JSONDecodeError:
        rows = None
    if not isinstance(rows, list):
        raise UpstreamError("the upstream answered a search with something else than a list")
    return [r for r in rows if isinstance(r, dict)]


async def empty_search(scope: Scope, send: Send) -> None:
    """The answer to a search that cannot match: 204 for XML, else 200 with ``[]``."""
    if wants_dicom_xml(scope):
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})
        return
    await send_json(send, 200, [], headers=[(b"content-type", b"application/dicom+json")])
