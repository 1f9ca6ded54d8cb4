"""The outer edge: where errors become JSON problem responses (RFC 9457)."""

from __future__ import annotations

import logging

import orjson

from ._errors import ProxyError
from ._types import ASGIApp, Headers, Message, Receive, Scope, Send

__all__ = ["ErrorMiddleware", "send_json", "send_problem"]

logger = logging.getLogger("shanoir_dicomweb_proxy")


async def send_json(
    send: Send, status: int, data: object, *, headers: Headers | None = None
) -> None:
    """Answer ``data`` as a small, complete JSON response."""
    body = orjson.dumps(data)
    start = [(b"content-length", str(len(body)).encode()), *(headers or [])]
    await send({"type": "http.response.start", "status": status, "headers": start})
    await send({"type": "http.response.body", "body": body})


async def send_problem(send: Send, error: ProxyError) -> None:
    """Answer ``error`` as ``application/problem+json``."""
    headers = [(b"content-type", b"application/problem+json"), (b"cache-control", b"no-store")]
    headers += [(k.encode(), v.encode()) for k, v in error.headers.items()]
    data = {"status": error.status, "code": error.code, "detail": error.detail}
    await send_json(send, error.status, data, headers=headers)


class ErrorMiddleware:
    """Turn a :class:`ProxyError` raised below into a JSON problem response.

    An error raised after the response has started cannot become a status any more: the
    response is then cut off, so the client sees a broken transfer rather than a body that
    looks complete. Anything that is not a ProxyError is logged and answered 500 without
    detail.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, guarded_send)
        except ProxyError as error:
            if started:
                logger.warning("response aborted: %s", error.detail)
                raise
            await send_problem(send, error)
        except Exception:
            if started:
                raise
            logger.exception("unexpected error")
            await send_problem(send, ProxyError("internal error"))
