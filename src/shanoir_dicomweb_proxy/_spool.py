"""Request bodies held whole before anything goes upstream (memory first, then disk).

A body is spooled when the PACS must get it with a Content-Length: a chunked upload (Orthanc
stores the complete parts of a chunked body that ends early, which would half-store a batch the
client was told failed), and every upload whose parts the proxy rewrites (a streamed one too,
in case its UIDs outgrow the room its request kept: ``_rewrite._stow``). A worker thread writes
while the body goes on arriving.
"""

from __future__ import annotations

import asyncio
import contextlib
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
    async with _Writer(spool) as writer:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk: bytes = message.get("body", b"")
            received += len(chunk)
            if limit is not None and received > limit:
                raise PayloadTooLarge(f"the request body exceeds {limit} bytes")
            more = message.get("more_body", False)
            if rewriter is not None:
                chunk = await rewriter.feed(chunk)
                if not more:
                    chunk += await rewriter.close()
            await writer.write(chunk)
            if not more:
                return await writer.rewind()


class _Writer:
    """Writes to a spool from a worker thread, :data:`SPOOL_CHUNK` bytes at a time, while the
    body goes on arriving: the reader waits only when a batch is ready before the last one is
    written, and the bytes are not copied on the way."""

    def __init__(self, spool: IO[bytes]) -> None:
        self._spool = spool
        self._batch: list[bytes] = []
        self._batched = 0
        self._size = 0
        self._writing: asyncio.Future[None] | None = None

    async def __aenter__(self) -> _Writer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        # The spool is closed after this: no thread may still be writing into it. (rewind()
        # has waited already unless the body failed, and then that failure is the one told.)
        with anyio.CancelScope(shield=True), contextlib.suppress(SpoolUnavailable):
            await self._written()

    async def write(self, chunk: bytes) -> None:
        if not chunk:
            return
        self._batch.append(chunk)
        self._batched += len(chunk)
        if self._batched >= SPOOL_CHUNK:
            await self._flush()

    async def rewind(self) -> int:
        """Write what is left, rewind the spool: its size."""
        await self._flush()
        await self._written()
        await anyio.to_thread.run_sync(self._spool.seek, 0)
        return self._size

    async def _flush(self) -> None:
        await self._written()
        batch, self._batch = self._batch, []
        self._size += self._batched
        self._batched = 0
        loop = asyncio.get_running_loop()
        self._writing = loop.run_in_executor(None, self._spool.writelines, batch)

    async def _written(self) -> None:
        writing, self._writing = self._writing, None
        if writing is None:
            return
        try:
            await writing
        except OSError as exc:  # the disk of temporary files is full (or failing)
            raise SpoolUnavailable(
                "the upload cannot be held now (no room for temporary files); nothing was stored"
            ) from exc


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
