"""The innermost layer: the ASGI app that forwards the parsed request to the PACS, streaming."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from collections.abc import AsyncIterator
from typing import IO

import anyio
import orjson

from .._dicom import UID_IN_TEXT
from .._errors import ProxyError, UpstreamError, UpstreamRejected
from .._headers import (
    content_length,
    header,
    parse_media_type,
    request_headers_for_upstream,
    response_headers_for_client,
)
from .._request import DicomWebRequest, Resource
from .._scope import get_dicomweb_request, get_record
from .._spool import SPOOL_IN_MEMORY, read_spool, spool_body
from .._types import Receive, Scope, Send
from ._adapt import Reframe, adapt
from ._client import Upstream, UpstreamAnswer

__all__ = ["UpstreamProxy"]


def _upstream_message(body: bytes) -> str:
    """Orthanc's short error ``Message`` (its errors are JSON without a Content-Type)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return ""
    message = data.get("Message") if isinstance(data, dict) else None
    if not isinstance(message, str):
        return ""
    # Never echo identifiers the upstream put in its message.
    return UID_IN_TEXT.sub("<uid>", message)[:200]


class UpstreamProxy:
    """The innermost ASGI app: forwards the parsed DICOMweb request to the PACS, streaming.

    Request and response bodies flow through with backpressure: a chunk is read from one
    side only when the other side took the previous one. A client that hangs up cancels the
    upstream request; an upstream that fails mid-body aborts the client's response.
    """

    def __init__(self, upstream: Upstream, *, max_upload_bytes: int | None = None) -> None:
        self.upstream = upstream
        self.max_upload_bytes = max_upload_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self._handle(scope, receive, send)
        except BaseExceptionGroup as group:
            raise _first_error(group) from None

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = get_dicomweb_request(scope)
        if request.method != "POST":
            await self._forward_watching(scope, request, receive, send)
            return
        length = content_length(scope)
        if length is not None:  # routing has held it against [server] max_upload_bytes
            await self._forward_watching(scope, request, receive, send, length=length)
            return
        # A chunked upload is spooled first (to disk past 1 MiB, never past the limit) so
        # that the PACS gets a Content-Length: Orthanc stores the complete parts of a
        # chunked body that ends early, which would half-store a batch that the client was
        # told failed. With a Content-Length a truncated body is refused whole.
        with tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY) as spool:
            length = await spool_body(receive, spool, self.max_upload_bytes)
            if length is not None:
                await self._forward_watching(
                    scope, request, receive, send, length=length, spool=spool
                )

    async def _forward_watching(
        self,
        scope: Scope,
        request: DicomWebRequest,
        receive: Receive,
        send: Send,
        *,
        length: int | None = None,
        spool: IO[bytes] | None = None,
    ) -> None:
        """Forward while watching the client: a disconnect cancels the upstream request."""
        if length is None:
            await self._forward_unless_gone(scope, request, receive, send)
            return
        async with anyio.create_task_group() as tg:
            content: AsyncIterator[bytes]
            if spool is not None:
                content = read_spool(spool)
                tg.start_soon(_watch_disconnect, receive, tg.cancel_scope)
            else:
                sender, body = anyio.create_memory_object_stream[bytes](0)
                content = _iterate(body)
                tg.start_soon(_pump_body, receive, sender, tg.cancel_scope)
            try:
                await self._forward(scope, request, content, length, send)
            finally:
                tg.cancel_scope.cancel()

    async def _forward_unless_gone(
        self, scope: Scope, request: DicomWebRequest, receive: Receive, send: Send
    ) -> None:
        """:meth:`_forward` a request without a body, cancelled if the client hangs up.

        The common case, so one plain task watches instead of a task group: a third of the
        cost of this layer for a small frame.
        """
        task = asyncio.current_task()
        assert task is not None
        gone = False

        async def watch() -> None:
            nonlocal gone
            with contextlib.suppress(Exception):  # the server's failure is not the client's
                while (await receive())["type"] != "http.disconnect":
                    pass
                gone = True
                task.cancel()

        watcher = asyncio.get_running_loop().create_task(watch())
        try:
            await self._forward(scope, request, None, None, send)
        except asyncio.CancelledError:
            if gone and task.uncancel() == 0:
                return  # the client hung up: nobody to answer
            raise
        finally:
            watcher.cancel()

    async def _forward(
        self,
        scope: Scope,
        request: DicomWebRequest,
        content: AsyncIterator[bytes] | None,
        length: int | None,
        send: Send,
    ) -> None:
        record = get_record(scope)
        request_id = record.request_id if record is not None else None
        headers = request_headers_for_upstream(scope["headers"], request_id=request_id)
        adaptation = adapt(request, header(scope, b"accept"), header(scope, b"range"))
        request = adaptation.request
        if adaptation.accept is not None:
            headers = [(n, v) for n, v in headers if n != b"accept"]
            headers.append((b"accept", adaptation.accept))
        if adaptation.byte_range is not None:
            headers = [(n, v) for n, v in headers if n != b"range"]
        if adaptation.reframes:
            send = Reframe(send, adaptation)
        # Bytes are rewritten on the way back; a compressed body could not be.
        headers.append((b"accept-encoding", b"identity"))
        if length is not None:
            # Some PACS refuse chunked STOW; all of them refuse a body shorter than announced.
            headers.append((b"content-length", str(length).encode()))
        target = request.path()
        query = request.query_string()
        if query:
            target += "?" + query
        # Orthanc answers HEAD with 404: ask for GET and send only the head back.
        method = "GET" if request.method == "HEAD" else request.method
        started = time.perf_counter() if record is not None else 0.0
        try:
            answer = await self.upstream.forward(method, target, headers=headers, content=content)
            try:
                await self._respond(request, answer, send)
            finally:
                with anyio.CancelScope(shield=True):
                    await answer.aclose()
        finally:
            if record is not None:
                record.upstream_seconds += time.perf_counter() - started

    async def _respond(self, request: DicomWebRequest, answer: UpstreamAnswer, send: Send) -> None:
        status = answer.status
        if status >= 500:
            raise UpstreamError(f"the upstream failed with status {status}")
        if status in (401, 403, 407):
            raise UpstreamError("the upstream refused the proxy's own credentials")
        if status >= 400:
            body = await _read_capped(answer, STOW_ANSWER_MAX)
            refusal = _stow_answer(answer, body) if request.resource is Resource.STORE else None
            if refusal is not None:
                # A refused upload's answer names each instance and why (PS3.18 §10.5.3):
                # the client gets it, in public form once the layers above have seen it.
                headers = [(b"content-type", refusal), (b"content-length", str(len(body)).encode())]
                await send({"type": "http.response.start", "status": status, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
            message = _upstream_message(body[:65536])
            raise UpstreamRejected(message or f"the upstream answered {status}", status=status)
        headers = response_headers_for_client(answer.headers)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        if request.method == "HEAD":
            await send({"type": "http.response.body", "body": b""})
            return
        boundary = _multipart_boundary(answer)
        keep = len(boundary) + 8 if boundary is not None else 0
        tail = b""
        ended = False
        async for chunk in answer.chunks():
            if boundary is not None:
                tail = (tail + chunk[-keep:])[-keep:]
            # The last chunk ends the answer itself: one message fewer through every layer
            # (and, for a small frame, the whole answer in one).
            ended = answer.received()
            if ended:
                _check_closed(boundary, tail)
            await send({"type": "http.response.body", "body": chunk, "more_body": not ended})
        if not ended:
            _check_closed(boundary, tail)
            await send({"type": "http.response.body", "body": b""})


def _check_closed(boundary: bytes | None, tail: bytes) -> None:
    if boundary is not None and b"--" + boundary + b"--" not in tail:
        # Orthanc ends study and series retrieves at EOF, so a connection lost in the
        # middle looks like a clean end: only the closing delimiter tells them apart.
        raise UpstreamError("the upstream's multipart answer ended before its last part")


#: The largest STOW answer of a refused upload passed on (about 300 bytes per instance).
STOW_ANSWER_MAX = 16 * 1024 * 1024

_STOW_SEQUENCES = ("00081198", "00081199", "0008119A")


def _stow_answer(answer: UpstreamAnswer, body: bytes) -> bytes | None:
    """The content type of a refused upload's PS3.18 answer, or None when ``body`` is not one
    (whole). Orthanc sends its DICOM JSON answers without a Content-Type."""
    if not body or len(body) >= STOW_ANSWER_MAX:
        return None
    content_type = answer.header(b"content-type")
    media = parse_media_type(content_type).type if content_type else None
    if media == "application/dicom+xml" and content_type is not None:
        return content_type.encode("latin-1")
    if media not in (None, "application/dicom+json", "application/json"):
        return None
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if isinstance(data, dict) and any(key in data for key in _STOW_SEQUENCES):
        return b"application/dicom+json"
    return None


async def _read_capped(answer: UpstreamAnswer, cap: int) -> bytes:
    data = b""
    try:
        async for chunk in answer.chunks():
            data += chunk
            if len(data) >= cap:
                break
    except ProxyError:
        pass
    return data[:cap]


def _multipart_boundary(answer: UpstreamAnswer) -> bytes | None:
    content_type = answer.header(b"content-type")
    if content_type is None:
        return None
    media = parse_media_type(content_type)
    if not media.type.startswith("multipart/") or "boundary" not in media.params:
        return None
    return media.params["boundary"].encode("latin-1")


def _first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error to report from a task group: a ProxyError if any, else the first."""
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            leaves.append(exc)

    walk(group)
    return next((e for e in leaves if isinstance(e, ProxyError)), leaves[0])


async def _iterate(stream: anyio.abc.ObjectReceiveStream[bytes]) -> AsyncIterator[bytes]:
    async with stream:
        async for chunk in stream:
            yield chunk


async def _pump_body(
    receive: Receive,
    sender: anyio.abc.ObjectSendStream[bytes],
    cancel_scope: anyio.CancelScope,
) -> None:
    """Hand the request body to the upstream request one chunk at a time, then watch for a
    disconnect.

    The stream to the upstream is closed only when the body is complete. On a disconnect it is
    left open and the upstream request is cancelled instead, so the PACS sees fewer bytes than
    the Content-Length it was promised and stores nothing.
    """
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            cancel_scope.cancel()
            return
        chunk: bytes = message.get("body", b"")
        if chunk:
            await sender.send(chunk)
        if not message.get("more_body", False):
            break
    await sender.aclose()
    await _watch_disconnect(receive, cancel_scope)


async def _watch_disconnect(receive: Receive, cancel_scope: anyio.CancelScope) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    cancel_scope.cancel()
