"""Link rewriting as a stream: any chunking gives the same bytes as rewriting the whole."""

from __future__ import annotations

from collections.abc import Callable

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from shanoir_dicomweb_proxy import UpstreamError
from shanoir_dicomweb_proxy._dicom import BufferedPart, MultipartRewriter, PassPart
from shanoir_dicomweb_proxy._rewrite import LinkRewriter

OLD = b"http://pacs:8042/dicom-web/"
NEW = b"https://gateway.example.org/dicomweb/"


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


@given(
    pieces=st.lists(st.sampled_from([OLD, OLD[:9], OLD[5:], b"x", b"h", b'"', b"\n"]), max_size=40),
    cuts=st.lists(st.integers(min_value=0, max_value=600), max_size=12),
)
def test_stream_equals_whole(pieces: list[bytes], cuts: list[int]) -> None:
    data = b"".join(pieces)
    rewriter = LinkRewriter(OLD, NEW)
    out = b"".join(rewriter.rewrite(chunk) for chunk in _chunks(data, cuts)) + rewriter.flush()
    assert out == data.replace(OLD, NEW)


def test_holds_back_at_most_a_partial_link() -> None:
    rewriter = LinkRewriter(OLD, NEW)
    assert rewriter.rewrite(b"abc" + OLD[:10]) == b"abc"
    assert rewriter.rewrite(OLD[10:] + b"x") == NEW + b"x"
    assert rewriter.flush() == b""


def _multipart(bodies: list[bytes], boundary: bytes = b"b0undary") -> bytes:
    out = b""
    for body in bodies:
        out += b"--" + boundary + b"\r\nContent-Type: application/dicom+xml\r\n"
        out += b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body + b"\r\n"
    return out + b"--" + boundary + b"--\r\n"


def _rewriter(transform: Callable[[bytes], bytes], max_bytes: int = 1 << 20) -> MultipartRewriter:
    async def run(body: bytes) -> bytes:
        return transform(body)

    return MultipartRewriter(b"b0undary", lambda _: BufferedPart(run, max_bytes=max_bytes))


async def _feed(rewriter: MultipartRewriter, chunks: list[bytes], *, close: bool = True) -> bytes:
    out = b"".join([await rewriter.feed(c) for c in chunks])
    return out + (await rewriter.close() if close else b"")


@given(
    bodies=st.lists(
        st.binary(max_size=200).map(lambda b: b.replace(b"b0undary", b"")), min_size=1, max_size=5
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=1500), max_size=10),
)
def test_multipart_parts_keep_their_lengths(bodies: list[bytes], cuts: list[int]) -> None:
    data = _multipart([OLD + b + OLD for b in bodies])
    rewriter = _rewriter(lambda b: b.replace(OLD, NEW))
    out = anyio.run(_feed, rewriter, _chunks(data, cuts))
    assert out == _multipart([NEW + b + NEW for b in bodies])


async def test_multipart_truncated_is_an_error() -> None:
    data = _multipart([b"<xml/>", b"<xml/>"])
    rewriter = _rewriter(lambda b: b)
    with pytest.raises(UpstreamError):
        await _feed(rewriter, [data[:-15]])


async def test_multipart_part_size_is_capped() -> None:
    with pytest.raises(UpstreamError):
        await _feed(_rewriter(lambda b: b, max_bytes=10), [_multipart([b"x" * 11])], close=False)


async def test_multipart_dropped_part_leaves_no_trace() -> None:
    async def drop_second(body: bytes) -> bytes | None:
        return None if body == b"two" else body

    rewriter = MultipartRewriter(b"b0undary", lambda _: BufferedPart(drop_second))
    out = await _feed(rewriter, [_multipart([b"one", b"two", b"three"])])
    assert out == _multipart([b"one", b"three"])


def _frames(bodies: list[bytes], base: bytes) -> bytes:
    """A frames answer as Orthanc writes it: each part names its own URL."""
    out = b""
    for number, body in enumerate(bodies, 1):
        out += b"--b0undary\r\nContent-Location: " + base + b"frames/%d\r\n" % number
        out += b"Content-Type: application/octet-stream\r\n"
        out += b"Content-Length: %d\r\n\r\n" % len(body) + body + b"\r\n"
    return out + b"--b0undary--\r\n"


def _relinker() -> MultipartRewriter:
    async def relink(name: bytes, value: bytes) -> bytes:
        return NEW + value[len(OLD) :] if value.startswith(OLD) else value

    return MultipartRewriter(b"b0undary", lambda _: PassPart(), rewrite_header=relink)


@given(
    bodies=st.lists(
        st.binary(max_size=300).map(lambda b: b.replace(b"b0undary", b"")), min_size=1, max_size=3
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=1200), max_size=10),
)
def test_frames_are_relinked_in_any_chunks(bodies: list[bytes], cuts: list[int]) -> None:
    data = _frames(bodies, OLD)
    out = anyio.run(_feed, _relinker(), _chunks(data, cuts))
    assert out == _frames(bodies, NEW)


async def test_a_chunk_inside_a_frame_passes_as_it_is() -> None:
    frame = bytes(range(256)) * 1200
    data = _frames([frame], OLD)
    body_at = data.index(b"\r\n\r\n") + 4
    chunks = _chunks(data, [body_at + 1000, body_at + 200_000])
    rewriter = _relinker()
    outs = [await rewriter.feed(chunk) for chunk in chunks]
    assert outs[1] is chunks[1]  # all body: not copied
    assert b"".join(outs) + await rewriter.close() == _frames([frame], NEW)
