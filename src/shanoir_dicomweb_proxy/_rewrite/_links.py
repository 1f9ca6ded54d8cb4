"""Links without identifier translation (``[mapping] backend = "identity"``).

RetrieveURL (0008,1190), BulkDataURI and Content-Location name the upstream's own base URL;
they are rewritten to the proxy's public base, as a stream, chunk by chunk.
"""

from __future__ import annotations

from collections.abc import Iterable

from .._dicom import BodyRewriter, BufferedPart, MultipartRewriter, PassPart, partial_match
from .._headers import LINK_HEADERS, TrustedProxies, parse_media_type, public_base_url
from .._types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["LinkRewriter", "RewriteMiddleware"]

# Bodies that carry links: DICOM JSON and XML, alone or as multipart/related parts.
_LINK_TYPES = frozenset({"application/dicom+json", "application/json", "application/dicom+xml"})


def _may_carry_links(content_type: bytes | None) -> bool:
    # A cheap test first: single-part frames, bulk data and rendered images carry none.
    return content_type is not None and (
        b"json" in content_type or b"xml" in content_type or b"multipart" in content_type
    )


def _link_rewriter(content_type: bytes | None, old: bytes, new: bytes) -> BodyRewriter | None:
    """The rewriter for a body of this type, or None when it carries no links."""
    if content_type is None:
        return None
    media = parse_media_type(content_type.decode("latin-1"))
    if media.type in _LINK_TYPES:
        return LinkRewriter(old, new)
    boundary = media.params.get("boundary")
    if media.type == "multipart/related" and media.related_type in _LINK_TYPES and boundary:
        # Parts carry their own Content-Length: rewrite part by part, not as a byte stream.
        async def replace(body: bytes) -> bytes:
            return body.replace(old, new)

        return MultipartRewriter(boundary.encode("latin-1"), lambda _: BufferedPart(replace))
    if media.type == "multipart/related" and media.related_type != "application/dicom" and boundary:
        # Frames and bulk data: Orthanc names each part's own URL in a Content-Location.
        async def relink(name: bytes, value: bytes) -> bytes:
            if name.lower() == b"content-location" and value.startswith(old):
                return new + value[len(old) :]
            return value

        return MultipartRewriter(
            boundary.encode("latin-1"), lambda _: PassPart(), rewrite_header=relink
        )
    return None


class LinkRewriter:
    """Replace one byte string with another across a stream of chunks.

    Bytes that might start a match are held back until the next chunk decides, so at most
    ``len(old) - 1`` bytes are buffered.
    """

    __slots__ = ("old", "new", "_pending")

    def __init__(self, old: bytes, new: bytes) -> None:
        self.old = old
        self.new = new
        self._pending = b""

    async def feed(self, chunk: bytes) -> bytes:
        return self.rewrite(chunk)

    async def close(self) -> bytes:
        return self.flush()

    def rewrite(self, chunk: bytes) -> bytes:
        """The output for ``chunk``: all but the bytes that may start a match."""
        data = self._pending + chunk if self._pending else chunk
        start = data.rfind(self.old)
        keep = partial_match(data, start + len(self.old) if start >= 0 else 0, self.old)
        if keep:
            self._pending = data[-keep:]
            data = data[:-keep]
        else:
            self._pending = b""
        return data.replace(self.old, self.new) if start >= 0 else data

    def flush(self) -> bytes:
        """The bytes held back, at the end of input."""
        data, self._pending = self._pending, b""
        return data


class RewriteMiddleware:
    """Rewrite links from the upstream's base URL to the public one, in headers and bodies.

    ``upstream_url`` is the base the upstream builds its links from (Orthanc builds them from
    the ``Host`` header the proxy sends, so the configured upstream URL). The public base comes
    from ``public_url`` or from the request (``Forwarded`` from ``forwarded_allow_ips`` only,
    ``Host``), plus ``base_path``.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        upstream_url: str,
        public_url: str = "",
        base_path: str = "",
        forwarded_allow_ips: Iterable[str] = ("127.0.0.1", "::1"),
    ) -> None:
        self.app = app
        self.upstream_url = upstream_url.rstrip("/").encode()
        self.public_url = public_url
        self.base_path = base_path
        self.trusted = TrustedProxies(forwarded_allow_ips)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        responder = _LinkResponder(scope, send, self)
        await self.app(scope, receive, responder.send)

    def public_base(self, scope: Scope) -> bytes:
        return public_base_url(
            scope, public_url=self.public_url, base_path=self.base_path, trusted=self.trusted
        ).encode()


class _LinkResponder:
    __slots__ = ("_scope", "_send", "_middleware", "_rewriter")

    def __init__(self, scope: Scope, send: Send, middleware: RewriteMiddleware) -> None:
        self._scope = scope
        self._send = send
        self._middleware = middleware
        self._rewriter: BodyRewriter | None = None

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            old = self._middleware.upstream_url
            new = b""  # the public base, built once and only if something links upstream
            headers = []
            content_type = None
            for name, value in message.get("headers", []):
                if name == b"content-type":
                    content_type = value
                elif name in LINK_HEADERS and value.startswith(old):
                    new = new or self._middleware.public_base(self._scope)
                    value = new + value[len(old) :]
                headers.append((name, value))
            rewriter = None
            if _may_carry_links(content_type):
                new = new or self._middleware.public_base(self._scope)
                rewriter = _link_rewriter(content_type, old + b"/", new + b"/")
            if rewriter is not None and message["status"] not in (204, 304):
                # Lengths change with the links: the body goes out chunked (HEAD says so too).
                headers = [(n, v) for n, v in headers if n != b"content-length"]
                self._rewriter = rewriter if self._scope["method"] != "HEAD" else None
            message = {**message, "headers": headers}
        elif message["type"] == "http.response.body" and self._rewriter is not None:
            body = await self._rewriter.feed(message.get("body", b""))
            if not message.get("more_body", False):
                body += await self._rewriter.close()
            message = {**message, "body": body}
        await self._send(message)
