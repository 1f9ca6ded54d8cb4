"""Streaming ``multipart/related`` (RFC 2387, PS3.18 §8.7.3.5): parse and re-emit parts.

Parsing finds each delimiter with ``bytes.find``: a part costs a few calls whatever its
size, and its data are slices of the input. Each part goes through a :class:`PartRewriter` of
its own, which may change its body, stream it, or drop the part.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from .._errors import MalformedBody

__all__ = [
    "BodyRewriter",
    "BufferedPart",
    "Chunk",
    "MultipartRewriter",
    "PartEvents",
    "PartHeaders",
    "PartRewriter",
    "PassPart",
    "WholeBody",
    "header_pair",
    "partial_match",
    "split_parts",
]

PartHeaders = list[tuple[bytes, bytes]]


class BodyRewriter(Protocol):
    """Rewrites a body given in chunks: what ``feed`` returns is ready to send."""

    async def feed(self, chunk: bytes) -> bytes: ...

    async def close(self) -> bytes:
        """End of input: the rest of the output; raises if the input was incomplete."""
        ...


#: A part's bytes: slices of the upstream's chunks are passed on without a copy.
Chunk = bytes | memoryview


class PartRewriter(Protocol):
    """The rewriter of one part. ``dropped`` turns true, before any output, when the part must
    not be shown; ``keeps_length`` says the body keeps its size (its Content-Length stays);
    ``siblings``, read once the part is closed, are the bodies of further parts to show after
    it, with its headers (a search row listed once per copied examination)."""

    dropped: bool
    keeps_length: bool
    siblings: Sequence[bytes]

    async def feed(self, chunk: Chunk) -> Chunk: ...

    async def close(self) -> Chunk: ...


class PassPart:
    """A part whose body passes as it is (frames, bulk data)."""

    dropped = False
    keeps_length = True
    siblings: Sequence[bytes] = ()

    async def feed(self, chunk: Chunk) -> Chunk:
        return chunk

    async def close(self) -> bytes:
        return b""


class BufferedPart:
    """A part collected whole (at most ``max_bytes``) and given to ``transform`` at its end;
    ``transform`` answers the new body, or None to drop the part; or a list of bodies, the
    first in the part's place and the others as siblings (an empty list drops the part)."""

    keeps_length = False

    def __init__(
        self,
        transform: Callable[[bytes], Awaitable[bytes | list[bytes] | None]],
        *,
        max_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self.dropped = False
        self.siblings: Sequence[bytes] = ()
        self._transform = transform
        self._max = max_bytes
        self._chunks: list[Chunk] = []
        self._size = 0

    async def feed(self, chunk: Chunk) -> bytes:
        self._size += len(chunk)
        if self._size > self._max:
            raise MalformedBody(f"a multipart part larger than {self._max} bytes")
        self._chunks.append(chunk)
        return b""

    async def close(self) -> bytes:
        body = await self._transform(b"".join(self._chunks))
        self._chunks = []
        if isinstance(body, list):
            body, self.siblings = (body[0], body[1:]) if body else (None, ())
        if body is None:
            self.dropped = True
            return b""
        return body


class WholeBody:
    """A part rewriter applied to a whole single-part body (which holds no siblings)."""

    def __init__(self, part: PartRewriter) -> None:
        self._part = part

    async def feed(self, chunk: bytes) -> bytes:
        return bytes(await self._part.feed(chunk))

    async def close(self) -> bytes:
        return bytes(await self._part.close())


class PartEvents:
    """A multipart body parsed as it arrives into events, in order: ``("begin", b"")``,
    ``("header", b"name:value")`` per header, ``("headers", b"")``, ``("data", chunk)`` (slices
    of the input, no copy), ``("end", b"")`` per part, and ``("final", b"")`` at the closing
    delimiter.

    The scan is ``bytes.find`` for the delimiter, so a part costs a few calls whatever its
    size; the preamble and the epilogue are skipped (RFC 2046 §5.1.1).
    """

    __slots__ = ("_delimiter", "_state", "_held")

    def __init__(self, boundary: bytes) -> None:
        self._delimiter = b"\r\n--" + boundary
        self._state = _START
        # Input not decided yet: a part's head, or bytes that may start a delimiter.
        self._held = b""

    def feed(self, chunk: bytes) -> list[tuple[str, Chunk]]:
        """Parse ``chunk``; the events it completed."""
        events: list[tuple[str, Chunk]] = []
        data = self._held + chunk if self._held else chunk
        self._held = b""
        view = memoryview(data)
        at = 0
        while at < len(data):
            state = self._state
            if state == _START:  # the first delimiter may open the body, without its CRLF
                opening = self._delimiter[2:]
                if data.startswith(opening, at):
                    self._state = _DELIMITER
                    at += len(opening)
                elif len(data) - at < len(opening) and opening.startswith(data[at:]):
                    self._held = data[at:]
                    break
                else:
                    self._state = _PREAMBLE
            elif state == _BODY or state == _PREAMBLE:
                found = data.find(self._delimiter, at)
                if found < 0:
                    keep = partial_match(data, at, self._delimiter)
                    if state == _BODY and len(data) - keep > at:
                        events.append(("data", view[at : len(data) - keep]))
                    self._held = data[len(data) - keep :]
                    break
                if state == _BODY:
                    if found > at:
                        events.append(("data", view[at:found]))
                    events.append(("end", b""))
                self._state = _DELIMITER
                at = found + len(self._delimiter)
            elif state == _DELIMITER:
                if data.startswith(b"--", at):
                    events.append(("final", b""))
                    self._state = _EPILOGUE
                    break
                line_end = data.find(b"\r\n", at)
                if line_end < 0:
                    rest = data[at:]  # "-" or transport padding: wait for the rest
                    if rest != b"-" and (len(rest) > _MAX_PADDING or rest.strip(b" \t\r")):
                        raise MalformedBody("a malformed multipart body")
                    self._held = rest
                    break
                if data[at:line_end].strip(b" \t"):  # transport padding only, then CRLF
                    raise MalformedBody("a malformed multipart body")
                events.append(("begin", b""))
                self._state = _HEAD
                at = line_end + 2
            elif state == _HEAD:
                if data.startswith(b"\r\n", at):
                    head_end, body_start = at, at + 2  # a part without headers
                else:
                    head_end = data.find(b"\r\n\r\n", at)
                    body_start = head_end + 4
                if head_end < 0:
                    if len(data) - at > _MAX_HEAD:
                        raise MalformedBody("a multipart part's headers are too long")
                    self._held = data[at:]
                    break
                lines = data[at:head_end].split(b"\r\n") if head_end > at else []
                if len(lines) > _MAX_HEADERS or any(b":" not in line for line in lines):
                    raise MalformedBody("a malformed multipart body")
                events += [("header", line) for line in lines]
                events.append(("headers", b""))
                self._state = _BODY
                at = body_start
            else:  # the epilogue, ignored
                break
        return events


_START, _PREAMBLE, _DELIMITER, _HEAD, _BODY, _EPILOGUE = range(6)
_MAX_HEAD = 64 * 1024
_MAX_HEADERS = 64
_MAX_PADDING = 256


def partial_match(data: bytes, start: int, pattern: bytes) -> int:
    """How many bytes at the end of ``data[start:]`` may begin ``pattern`` (fewer than all of
    it): those a stream must hold until the next chunk decides."""
    first = max(start, len(data) - len(pattern) + 1)
    lead = pattern[:1]
    at = data.find(lead, first)
    while at >= 0:
        if pattern.startswith(data[at:]):
            return len(data) - at
        at = data.find(lead, at + 1)
    return 0


def _is_whole(data: Chunk, chunk: bytes) -> bool:
    """Whether ``data`` (a ``data`` event) is the whole of ``chunk``, not a part or a copy."""
    return isinstance(data, memoryview) and data.obj is chunk and len(data) == len(chunk)


def header_pair(data: Chunk) -> tuple[bytes, bytes]:
    """A ``header`` event's name and value (the value without its leading blanks)."""
    name, _, value = bytes(data).partition(b":")
    return name, value.lstrip()


class MultipartRewriter:
    """Rewrite each part of a multipart body, keeping the framing valid.

    ``new_part(headers)`` gives each part its rewriter. A part's headers go out with its first
    output: without Content-Length if its size may change (or with the new one when the whole
    body is known by then), each header value passed through ``rewrite_header`` (None drops
    the header). A dropped part leaves no trace. The closing delimiter must be seen.
    """

    def __init__(
        self,
        boundary: bytes,
        new_part: Callable[[PartHeaders], PartRewriter],
        *,
        rewrite_header: Callable[[bytes, bytes], Awaitable[bytes | None]] | None = None,
    ) -> None:
        self._boundary = boundary
        self._new_part = new_part
        self._rewrite_header = rewrite_header
        self._events = PartEvents(boundary)
        self._headers: PartHeaders = []
        self._part: PartRewriter | None = None
        self._pending_headers = False
        self._ended = False

    async def feed(self, chunk: bytes) -> bytes:
        """Parse ``chunk``; return the output it made ready."""
        events = self._events.feed(chunk)
        if (
            len(events) == 1
            and type(self._part) is PassPart
            and not self._pending_headers
            and _is_whole(events[0][1], chunk)
        ):
            # Inside a frame's body, a chunk that is all body passes as it is: no copy.
            return chunk
        out: list[Chunk] = []
        for kind, data in events:
            if kind == "begin":
                self._headers = []
            elif kind == "header":
                self._headers.append(header_pair(data))
            elif kind == "headers":
                self._part = self._new_part(self._headers)
                self._pending_headers = True
            elif kind == "data" and self._part is not None:
                await self._emit(out, await self._part.feed(data), whole=False)
            elif kind == "end" and self._part is not None:
                part = self._part
                await self._emit(out, await part.close(), whole=True)
                if not part.dropped:
                    out.append(b"\r\n")
                for sibling in part.siblings:
                    out += (await self._part_head(part, len(sibling)), sibling, b"\r\n")
                self._part = None
            elif kind == "final":
                out.append(b"--" + self._boundary + b"--\r\n")
                self._ended = True
        if len(out) == 1 and _is_whole(out[0], chunk):
            return chunk  # a part rewriter streaming its body gave the chunk back: no copy
        return b"".join(out)

    async def _emit(self, out: list[Chunk], body: Chunk, *, whole: bool) -> None:
        part = self._part
        assert part is not None
        if part.dropped or (not body and not whole):
            return
        if self._pending_headers:
            self._pending_headers = False
            out.append(await self._part_head(part, len(body) if whole else None))
        out.append(body)

    async def _part_head(self, part: PartRewriter, size: int | None) -> bytes:
        lines = [b"--" + self._boundary]
        for name, value in self._headers:
            if name.lower() == b"content-length":
                if part.keeps_length:
                    lines.append(name + b": " + value)
                elif size is not None:
                    lines.append(name + b": " + str(size).encode())
                continue
            if self._rewrite_header is not None:
                rewritten = await self._rewrite_header(name, value)
                if rewritten is None:
                    continue
                value = rewritten
            lines.append(name + b": " + value)
        return b"\r\n".join(lines) + b"\r\n\r\n"

    async def close(self) -> bytes:
        """End of input: the closing delimiter must have been seen."""
        out = await self.feed(b"")
        if not self._ended:
            raise MalformedBody("a multipart body that ends before its last part")
        return out


async def split_parts(boundary: bytes, body: bytes) -> list[bytes]:
    """The bodies of the parts of a whole multipart body."""
    parts: list[bytes] = []

    async def keep(part: bytes) -> None:
        parts.append(part)

    rewriter = MultipartRewriter(boundary, lambda _: BufferedPart(keep))
    await rewriter.feed(body)
    await rewriter.close()
    return parts
