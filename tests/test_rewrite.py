"""Link rewriting as a stream: any chunking gives the same bytes as rewriting the whole."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shanoir_dicomweb_proxy import UpstreamError
from shanoir_dicomweb_proxy._multipart import MultipartTransformer
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
    out = b"".join(rewriter.feed(chunk) for chunk in _chunks(data, cuts)) + rewriter.close()
    assert out == data.replace(OLD, NEW)


def test_holds_back_at_most_a_partial_link() -> None:
    rewriter = LinkRewriter(OLD, NEW)
    assert rewriter.feed(b"abc" + OLD[:10]) == b"abc"
    assert rewriter.feed(OLD[10:] + b"x") == NEW + b"x"
    assert rewriter.close() == b""


def _multipart(bodies: list[bytes], boundary: bytes = b"b0undary") -> bytes:
    out = b""
    for body in bodies:
        out += b"--" + boundary + b"\r\nContent-Type: application/dicom+xml\r\n"
        out += b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body + b"\r\n"
    return out + b"--" + boundary + b"--\r\n"


@given(
    bodies=st.lists(
        st.binary(max_size=200).map(lambda b: b.replace(b"b0undary", b"")), min_size=1, max_size=5
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=1500), max_size=10),
)
def test_multipart_parts_keep_their_lengths(bodies: list[bytes], cuts: list[int]) -> None:
    data = _multipart([OLD + b + OLD for b in bodies])
    transformer = MultipartTransformer(b"b0undary", lambda b: b.replace(OLD, NEW))
    out = b"".join(transformer.feed(c) for c in _chunks(data, cuts)) + transformer.close()
    assert out == _multipart([NEW + b + NEW for b in bodies])


def test_multipart_truncated_is_an_error() -> None:
    data = _multipart([b"<xml/>", b"<xml/>"])
    transformer = MultipartTransformer(b"b0undary", lambda b: b)
    transformer.feed(data[:-15])
    with pytest.raises(UpstreamError):
        transformer.close()


def test_multipart_part_size_is_capped() -> None:
    transformer = MultipartTransformer(b"b0undary", lambda b: b, max_part_bytes=10)
    with pytest.raises(UpstreamError):
        transformer.feed(_multipart([b"x" * 11]))
