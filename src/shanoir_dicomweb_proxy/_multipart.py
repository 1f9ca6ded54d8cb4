"""Streaming ``multipart/related`` (RFC 2387, PS3.18 §8.7.3.5): parse and re-emit parts.

Parsing uses python-multipart's boundary scanner, which is generic enough for
``multipart/related`` although it was written for forms.
"""

from __future__ import annotations

from collections.abc import Callable

from python_multipart.multipart import MultipartParser

from ._errors import UpstreamError

__all__ = ["MultipartTransformer"]


class MultipartTransformer:
    """Rewrite each part of a multipart body with ``transform``, keeping the framing valid.

    Each part is collected (at most ``max_part_bytes``), transformed, and written out again
    with the same boundary and headers, its ``Content-Length`` (Orthanc sends one per part)
    set to the new size. Made for parts of DICOM JSON or XML, one instance each.
    """

    def __init__(
        self,
        boundary: bytes,
        transform: Callable[[bytes], bytes],
        *,
        max_part_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self._boundary = boundary
        self._transform = transform
        self._max = max_part_bytes
        self._out: list[bytes] = []
        self._headers: list[tuple[bytes, bytes]] = []
        self._field = b""
        self._value = b""
        self._body: list[bytes] = []
        self._size = 0
        self._ended = False
        self._parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._on_part_begin,
                "on_header_field": self._on_header_field,
                "on_header_value": self._on_header_value,
                "on_header_end": self._on_header_end,
                "on_part_data": self._on_part_data,
                "on_part_end": self._on_part_end,
                "on_end": self._on_end,
            },
            max_header_count=64,
        )

    def _on_part_begin(self) -> None:
        self._headers = []
        self._body = []
        self._size = 0

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _on_header_end(self) -> None:
        self._headers.append((self._field, self._value))
        self._field = self._value = b""

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        self._size += end - start
        if self._size > self._max:
            raise UpstreamError(f"a multipart part exceeds {self._max} bytes")
        self._body.append(data[start:end])

    def _on_part_end(self) -> None:
        body = self._transform(b"".join(self._body))
        lines = [b"--" + self._boundary]
        for name, value in self._headers:
            if name.lower() == b"content-length":
                value = str(len(body)).encode()
            lines.append(name + b": " + value)
        self._out.append(b"\r\n".join(lines) + b"\r\n\r\n" + body + b"\r\n")
        self._body = []

    def _on_end(self) -> None:
        self._out.append(b"--" + self._boundary + b"--\r\n")
        self._ended = True

    def feed(self, chunk: bytes) -> bytes:
        """Parse ``chunk``; return the output of every part it completed."""
        try:
            self._parser.write(chunk)
        except UpstreamError:
            raise
        except Exception as exc:  # python-multipart raises its own MultipartParseError
            raise UpstreamError("the upstream sent a malformed multipart body") from exc
        out, self._out = self._out, []
        return b"".join(out)

    def close(self) -> bytes:
        """End of input: the closing delimiter must have been seen."""
        out = self.feed(b"")
        if not self._ended:
            raise UpstreamError("the upstream's multipart answer ended before its last part")
        return out
