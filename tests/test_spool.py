"""Request bodies spooled whole (``_spool.spool_body``): bytes kept in order while a worker
thread writes them, the client's limit and hang-up, and a failing disk."""

from __future__ import annotations

import io
import threading
import time

import anyio
import pytest

from shanoir_dicomweb_proxy._errors import PayloadTooLarge, SpoolUnavailable
from shanoir_dicomweb_proxy._spool import SPOOL_CHUNK, spool_body
from shanoir_dicomweb_proxy._types import Message, Receive


def _receive(chunks: list[bytes], *, then: str = "end") -> Receive:
    messages: list[Message] = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1 or then != "end"}
        for i, c in enumerate(chunks)
    ]
    if then == "disconnect":
        messages.append({"type": "http.disconnect"})

    async def receive() -> Message:
        return messages.pop(0)

    return receive


def _chunks() -> list[bytes]:
    # Sizes around the batch the writer hands its thread, so batches split mid-body.
    sizes = [1, SPOOL_CHUNK - 1, 7, SPOOL_CHUNK, 3 * SPOOL_CHUNK + 5, 0, 12345]
    return [bytes([i % 251]) * n for i, n in enumerate(sizes)]


def test_the_body_is_spooled_whole_in_order_and_rewound() -> None:
    chunks = _chunks()
    spool = io.BytesIO()
    size = anyio.run(spool_body, _receive(chunks), spool, None)
    assert size == sum(map(len, chunks))
    assert spool.tell() == 0
    assert spool.read() == b"".join(chunks)


def test_a_rewriter_sees_every_chunk_and_its_close_is_spooled() -> None:
    class Upper:
        async def feed(self, chunk: bytes) -> bytes:
            return chunk.upper()

        async def close(self) -> bytes:
            return b"!"

    spool = io.BytesIO()
    size = anyio.run(spool_body, _receive([b"ab", b"cd"]), spool, None, Upper())
    assert (size, spool.read()) == (5, b"ABCD!")


def test_a_client_that_leaves_gives_none() -> None:
    receive = _receive([b"x" * 10], then="disconnect")
    assert anyio.run(spool_body, receive, io.BytesIO(), None) is None


def test_more_than_the_limit_is_payload_too_large() -> None:
    with pytest.raises(PayloadTooLarge):
        anyio.run(spool_body, _receive([b"x" * 10, b"y" * 10]), io.BytesIO(), 15)


class _SlowDisk(io.BytesIO):
    """Takes its time to write; ``busy`` while a write is under way."""

    def __init__(self, *, fail: bool = False) -> None:
        super().__init__()
        self.fail = fail
        self.busy = threading.Event()

    def writelines(self, lines: object) -> None:
        self.busy.set()
        time.sleep(0.2)
        self.busy.clear()
        if self.fail:
            raise OSError(28, "No space left on device")
        super().writelines(lines)  # type: ignore[arg-type]


def test_a_full_disk_is_spool_unavailable() -> None:
    with pytest.raises(SpoolUnavailable):
        anyio.run(spool_body, _receive(_chunks()), _SlowDisk(fail=True), None)


def test_no_write_is_left_running_when_the_body_fails() -> None:
    """The caller closes the spool once spool_body returns: a batch still being written
    then would write into a closed file."""
    disk = _SlowDisk()
    chunks = [b"x" * SPOOL_CHUNK, b"y" * 10]  # the first batch goes to the thread at once

    async def spool_then_look() -> None:
        with pytest.raises(PayloadTooLarge):
            await spool_body(_receive(chunks), disk, SPOOL_CHUNK + 5)
        assert not disk.busy.is_set()  # before the event loop's end waits for its threads
        assert disk.getvalue() == chunks[0]

    anyio.run(spool_then_look)
