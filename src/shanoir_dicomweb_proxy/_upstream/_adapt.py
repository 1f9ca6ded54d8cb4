"""What the proxy adds to a PACS that lacks it, on the way to and from the upstream.

Orthanc's DICOMweb plugin (and other PACS in part) leave out what PS3.18 allows and clients ask
for; the proxy asks for what every PACS serves and gives the client what it asked:

- **Thumbnails** (``/thumbnail``) are asked of the rendered resource with a thumbnail
  ``viewport`` (the client's own, else :data:`THUMBNAIL_VIEWPORT`).
- Rendered images and thumbnails asked by a browser (``text/html, ..., image/*, */*``: an
  ``<img>``, a new tab) are asked as the first type the client accepts that a PACS renders,
  ``image/jpeg`` for a wildcard (the standard's default), not with the browser's list, which
  Orthanc refuses (400).
- Frames and bulk data asked as ``multipart/related; type="*/*"`` (dicomweb-client's default)
  are asked as ``application/octet-stream`` in any transfer syntax (``transfer-syntax=*``).
- **Single-part answers**: an instance as ``application/dicom``, a frame or bulk data as
  ``application/octet-stream``. The PACS is asked for the multipart form and its one part is
  sent as the whole body.
- **Byte ranges** of bulk data (``Range: bytes=first-last``, one range) are cut from the
  value: 206 with ``Content-Range``, or 416. In a multipart answer the range applies to the
  value in the part, as dicomweb-client expects. The PACS gets no ``Range``.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, replace
from typing import Final

from .._dicom import PartEvents, header_pair
from .._errors import ProxyError, UpstreamError
from .._headers import MediaType, parse_media_type, split_accept
from .._request import DicomWebRequest, Level, Resource
from .._types import Message, Send

__all__ = ["THUMBNAIL_VIEWPORT", "Adaptation", "RangeNotSatisfiable", "Reframe", "adapt"]

#: The ``viewport`` of a thumbnail asked of the rendered resource (width,height).
THUMBNAIL_VIEWPORT: Final = "128,128"

_ANY_OCTETS: Final = b'multipart/related; type="application/octet-stream"; transfer-syntax=*'
_RANGE = re.compile(r"bytes=([0-9]{1,15})-([0-9]{0,15})")


class RangeNotSatisfiable(ProxyError):
    """A byte range that starts past the end of the value (416)."""

    status = 416
    code = "range_not_satisfiable"


@dataclass(frozen=True, slots=True)
class ByteRange:
    """A ``Range: bytes=first-last`` of one value (``last`` None: to the end)."""

    first: int
    last: int | None


@dataclass(frozen=True, slots=True)
class Adaptation:
    """How one request goes upstream: the request and ``Accept`` to send (None: the client's),
    whether the answer's one part is unwrapped, and the byte range cut from the value."""

    request: DicomWebRequest
    accept: bytes | None = None
    single: bool = False
    byte_range: ByteRange | None = None

    @property
    def reframes(self) -> bool:
        """Whether the answer's framing changes on the way back."""
        return self.single or self.byte_range is not None


def adapt(request: DicomWebRequest, accept: bytes | None, range_: bytes | None) -> Adaptation:
    """How ``request``, with the client's ``Accept`` and ``Range`` headers, goes upstream."""
    if request.resource not in _ADAPTED or any(key == "accept" for key, _ in request.query):
        return Adaptation(request)  # an accept= parameter is the upstream's to judge
    if request.resource is Resource.THUMBNAIL:
        query = request.query
        if not any(key == "viewport" for key, _ in query):
            query = (*query, ("viewport", THUMBNAIL_VIEWPORT))
        request = replace(request, resource=Resource.RENDERED, query=query)
    if request.resource is Resource.RENDERED:
        return Adaptation(request, accept=_rendered_accept(accept))
    if request.method != "GET":
        return Adaptation(request)  # a HEAD gets the upstream's own head
    first = _first_range(accept)
    if request.resource is Resource.RETRIEVE and request.level is Level.INSTANCE:
        if first is not None and first.type == "application/dicom":
            asked = b'multipart/related; type="application/dicom"' + _syntax(first)
            return Adaptation(request, accept=asked, single=True)
        return Adaptation(request)
    if request.resource not in (Resource.FRAMES, Resource.BULKDATA):
        return Adaptation(request)
    byte_range = _byte_range(range_) if request.resource is Resource.BULKDATA else None
    if first is None or first.type == "*/*":
        # Orthanc answers a plain */* (or none); a range is cut from the multipart answer.
        return Adaptation(request, byte_range=byte_range)
    if first.type == "multipart/related" and first.related_type in ("", "*/*"):
        return Adaptation(request, accept=_ANY_OCTETS, byte_range=byte_range)
    one = request.resource is Resource.BULKDATA or len(request.frames) == 1
    if first.type == "application/octet-stream" and one:
        asked = b'multipart/related; type="application/octet-stream"' + _syntax(first)
        return Adaptation(request, accept=asked, single=True, byte_range=byte_range)
    return Adaptation(request, byte_range=byte_range)


#: What a PACS renders (PS3.18 §8.7.4): a browser's other types (text/html, image/webp) are not.
_RENDERED_TYPES: Final = frozenset(
    {
        "image/jpeg",
        "image/png",
        "image/gif",
        "image/jp2",
        "video/mpeg",
        "video/mp4",
        "application/pdf",
    }
)


#: The resources this module may change; searches, metadata and uploads go as they came.
_ADAPTED: Final = frozenset(
    {
        Resource.THUMBNAIL,
        Resource.RENDERED,
        Resource.RETRIEVE,
        Resource.FRAMES,
        Resource.BULKDATA,
    }
)


# Clients send a handful of distinct Accept values: each is parsed once, not per request.
@functools.lru_cache(maxsize=128)
def _rendered_accept(accept: bytes | None) -> bytes | None:
    """The one type to ask a rendered resource in: the client's first (by quality) that a PACS
    renders, ``image/jpeg`` for a wildcard; None (the client's own header) when it names
    nothing of the kind or only that type already."""
    if not accept:
        return None
    ranges = sorted(split_accept(accept.decode("latin-1")), key=_quality, reverse=True)
    for media in ranges:
        if _quality(media) <= 0:
            break
        wanted = media.type
        if wanted in ("*/*", "image/*"):
            wanted = "image/jpeg"
        if wanted in _RENDERED_TYPES:
            return None if len(ranges) == 1 and media.type == wanted else wanted.encode()
    return None


def _quality(media: MediaType) -> float:
    try:
        return float(media.params.get("q", "1"))
    except ValueError:
        return 0.0


@functools.lru_cache(maxsize=128)
def _first_range(accept: bytes | None) -> MediaType | None:
    """The client's preferred media range (the first of the highest quality)."""
    if not accept:
        return None
    return max(split_accept(accept.decode("latin-1")), key=_quality, default=None)


def _syntax(media: MediaType) -> bytes:
    syntax = media.params.get("transfer-syntax")
    return b"; transfer-syntax=" + syntax.encode("latin-1") if syntax else b""


def _byte_range(value: bytes | None) -> ByteRange | None:
    """One ``bytes=first-last`` range; anything else (several ranges, suffix ranges, another
    unit) is ignored, as RFC 9110 §14.2 allows: the whole value is sent."""
    match = _RANGE.fullmatch(value.decode("latin-1").strip()) if value else None
    if match is None:
        return None
    first, last = int(match.group(1)), int(match.group(2)) if match.group(2) else None
    return None if last is not None and last < first else ByteRange(first, last)


class Reframe:
    """Wraps ``send``: gives the client the one part of a multipart answer as the whole body
    (``single``), and/or only ``byte_range`` of the value in it, streaming.

    The head waits for the part's headers (single) or for the first byte of the range, so
    that a range past the end is still a clean 416. Answers other than a 200 multipart pass
    as they are.
    """

    def __init__(self, send: Send, adaptation: Adaptation) -> None:
        self._send = send
        self._single = adaptation.single
        self._range = adaptation.byte_range
        self._start: Message | None = None
        self._events: PartEvents | None = None
        self._boundary = b""
        self._parts = 0
        self._part_headers: list[tuple[bytes, bytes]] = []
        self._offset = 0  # bytes of the value seen so far
        self._length: int | None = None  # the value's length, when its part says
        self._done = False

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            media = _content_type(message)
            boundary = media.params.get("boundary") if media is not None else None
            if message["status"] != 200 or media is None or media.type != "multipart/related":
                await self._send(message)
                return
            if not boundary:
                raise UpstreamError("the upstream's multipart answer has no boundary")
            self._boundary = boundary.encode("latin-1")
            self._events = PartEvents(self._boundary)
            self._start = message
            return
        if message["type"] != "http.response.body" or self._events is None:
            await self._send(message)
            return
        out: list[bytes] = []
        if not self._done:
            for kind, data in self._events.feed(message.get("body", b"")):
                await self._event(kind, data, out)
        more = message.get("more_body", False)
        if not more and not self._done:
            raise UpstreamError("the upstream's multipart answer ended before its last part")
        if out or not more:
            body = b"".join(out)
            await self._send({"type": "http.response.body", "body": body, "more_body": more})

    async def _event(self, kind: str, data: bytes | memoryview, out: list[bytes]) -> None:
        if kind == "begin":
            self._parts += 1
            self._part_headers = []
            if self._parts > 1 and (self._single or self._range is not None):
                raise UpstreamError("the upstream answered one value with several parts")
        elif kind == "header":
            name, value = header_pair(data)
            self._part_headers.append((name.lower(), value))
            if name.lower() == b"content-length" and value.strip().isdigit():
                self._length = int(value)
        elif kind == "headers":
            if self._range is not None and self._range.last is None and self._length is None:
                self._range = None  # "first-" of a value of unknown length: all of it, 200
            if self._range is None or self._range.first == 0 and self._length != 0:
                await self._open(out)
        elif kind == "data":
            await self._data(bytes(data), out)
        elif kind == "end":
            if self._start is not None:  # no byte of the range came
                raise RangeNotSatisfiable(
                    "the range starts past the end of the value",
                    headers={"content-range": f"bytes */{self._offset}"},
                )
            if not self._single:
                out.append(b"\r\n")
        elif kind == "final":
            if not self._single:
                out.append(b"--" + self._boundary + b"--\r\n")
            self._done = True

    async def _data(self, data: bytes, out: list[bytes]) -> None:
        start, self._offset = self._offset, self._offset + len(data)
        if self._range is not None:
            first = self._range.first
            last = self._range.last if self._range.last is not None else self._offset
            data = data[max(first - start, 0) : max(last + 1 - start, 0)]
            if not data:
                return
        if self._start is not None:
            await self._open(out)
        out.append(data)

    async def _open(self, out: list[bytes]) -> None:
        """Send the held head (200 or 206); in a multipart answer, open its one part."""
        start, self._start = self._start, None
        assert start is not None
        headers = [(n, v) for n, v in start["headers"] if n not in _RECOMPUTED]
        content_range = self._content_range()
        part_type = dict(self._part_headers).get(b"content-type", b"application/octet-stream")
        if self._single:
            headers = [(n, v) for n, v in headers if n != b"content-type"]
            headers.append((b"content-type", part_type))
            size = self._size()
            if size is not None:
                headers.append((b"content-length", str(size).encode()))
        else:
            lines = [b"--" + self._boundary]
            lines += [n + b": " + v for n, v in self._part_headers if n != b"content-length"]
            if content_range is not None:
                lines.append(b"content-range: " + content_range)
            out.append(b"\r\n".join(lines) + b"\r\n\r\n")
        status = 200
        if content_range is not None:
            headers.append((b"content-range", content_range))
            status = 206
        await self._send({**start, "status": status, "headers": headers})

    def _last(self) -> int | None:
        """The last byte of the range sent, when known."""
        assert self._range is not None
        last, length = self._range.last, self._length
        if length is not None:
            return length - 1 if last is None else min(last, length - 1)
        return last

    def _size(self) -> int | None:
        """The length of what is sent of the value, when known."""
        if self._range is None:
            return self._length
        last = self._last()
        return None if last is None else last - self._range.first + 1

    def _content_range(self) -> bytes | None:
        if self._range is None:
            return None
        length = "*" if self._length is None else str(self._length)
        return f"bytes {self._range.first}-{self._last()}/{length}".encode()


#: Headers of the upstream's multipart answer that do not hold for the reframed one.
_RECOMPUTED = frozenset({b"content-length", b"content-range", b"accept-ranges"})


def _content_type(message: Message) -> MediaType | None:
    for name, value in message.get("headers", []):
        if name == b"content-type":
            return parse_media_type(value.decode("latin-1"))
    return None
