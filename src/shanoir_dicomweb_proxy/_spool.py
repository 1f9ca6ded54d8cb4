"""Request bodies held whole before anything goes upstream (memory first, then disk).

A body is spooled when the PACS must get it with a Content-Length: a chunked upload (Orthanc
stores the complete parts of a chunked body that ends early, which would half-store a batch the
client was told failed), and every upload whose parts the proxy rewrites.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import IO, Final

import anyio
import anyio.to_thread

from ._dicom import BodyRewriter
from ._errors import PayloadTooLarge, SpoolUnavailable
from ._types import Message, Receive

__all__ = ["SPOOL_CHUNK", "SPOOL_IN_MEMORY", "read_spool", "spool_body", "spooled_receive"]

#: Bytes a spool holds in memory before it moves to a temporary file.
SPOOL_IN_MEMORY: Final = 1024 * 1024
#: Bytes written to or read from a spool at a time (off the event loop).
SPOOL_CHUNK: Final = 1024 * 1024


async def spool_body(
    receive: Receive, spool: IO[bytes], limit: int | None, rewriter: BodyRewriter | None = None
) -> int | None:
    """Write the whole request body to ``spool`` (through ``rewriter`` when given) and rewind
    it: the size written, or None if the client left. More than ``limit`` bytes received is
    :class:`PayloadTooLarge`."""
    received = 0
    size = 0
    pending = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk: bytes = message.get("body", b"")
        received += len(chunk)
        if limit is not None and received > limit:
            raise PayloadTooLarge(f"the request body exceeds {limit} bytes")
        more = message.get("more_body", False)
        pending += chunk if rewriter is None else await rewriter.feed(chunk)
        if rewriter is not None and not more:
            pending += await rewriter.close()
        if len(pending) >= SPOOL_CHUNK or not more:
            size += len(pending)
            try:
                await anyio.to_thread.run_sync(spool.write, bytes(pending))
            except OSError as exc:  # the disk of temporary files is full (or failing)
                raise SpoolUnavailable(
                    "the upload cannot be held now (no room for temporary files); "
                    "nothing was stored"
                ) from exc
            pending.clear()
        if not more:
            break
    await anyio.to_thread.run_sync(spool.seek, 0)
    return size


async def read_spool(spool: IO[bytes]) -> AsyncIterator[bytes]:
    while chunk := await anyio.to_thread.run_sync(spool.read, SPOOL_CHUNK):
        yield chunk


def spooled_receive(spool: IO[bytes], receive: Receive) -> Receive:
    """A ``receive`` giving the spooled body, then the client's own (its disconnect)."""
    done = False

    async def next_message() -> Message:
        nonlocal done
        if done:
            return await receive()
        chunk = await anyio.to_thread.run_sync(spool.read, SPOOL_CHUNK)
        if len(chunk) < SPOOL_CHUNK:
            done = True
        return {"type": "http.request", "body": chunk, "more_body": not done}

    return next_message
