"""The multipart parser (``PartEvents``): any cut of the input gives the same parts."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shanoir_dicomweb_proxy._dicom import PartEvents, header_pair
from shanoir_dicomweb_proxy._errors import MalformedBody

BOUNDARY = b"b0-und.ary"

Part = tuple[list[tuple[bytes, bytes]], bytes]


def _body(parts: list[Part], *, preamble: bytes = b"", epilogue: bytes = b"") -> bytes:
    out = preamble + (b"\r\n" if preamble else b"")
    for headers, data in parts:
        out += b"--" + BOUNDARY + b"\r\n"
        out += b"".join(name + b": " + value + b"\r\n" for name, value in headers)
        out += b"\r\n" + data + b"\r\n"
    return out + b"--" + BOUNDARY + b"--" + epilogue


def _parse(chunks: list[bytes]) -> tuple[list[Part], bool]:
    """The parts the events describe, and whether the closing delimiter was seen."""
    events = PartEvents(BOUNDARY)
    parts: list[Part] = []
    final = False
    for chunk in chunks:
        for kind, data in events.feed(chunk):
            assert not final, "nothing after the closing delimiter"
            if kind == "begin":
                parts.append(([], b""))
            elif kind == "header":
                parts[-1][0].append(header_pair(data))
            elif kind == "data":
                parts[-1] = (parts[-1][0], parts[-1][1] + bytes(data))
            elif kind == "final":
                final = True
    return parts, final


def _cut(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


_data = st.binary(max_size=300).map(lambda b: b.replace(b"\r\n--" + BOUNDARY, b""))
_headers = st.lists(
    st.tuples(
        st.sampled_from([b"Content-Type", b"Content-Location", b"Content-Length", b"X-A"]),
        st.binary(min_size=1, max_size=20).filter(lambda v: b"\r" not in v and b"\n" not in v),
    ).map(lambda p: (p[0], p[1].strip() or b"v")),  # header_pair strips the value
    max_size=3,
)


@given(
    parts=st.lists(st.tuples(_headers, _data), min_size=1, max_size=4),
    preamble=st.sampled_from([b"", b"a preamble", b"\r\n"]),
    epilogue=st.sampled_from([b"", b"\r\n", b"\r\nan epilogue --" + BOUNDARY]),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=12),
)
def test_any_cut_gives_the_same_parts(
    parts: list[Part], preamble: bytes, epilogue: bytes, cuts: list[int]
) -> None:
    data = _body(parts, preamble=preamble, epilogue=epilogue)
    assert _parse(_cut(data, cuts)) == (parts, True)


def test_byte_by_byte_with_delimiter_lookalikes() -> None:
    tricky = b"\r\n--b0-und\r\r\n-\r\n--" + BOUNDARY[:-1] + b"\r"
    parts: list[Part] = [([(b"Content-Type", b"application/octet-stream")], tricky), ([], b"")]
    data = _body(parts)
    assert _parse([data[i : i + 1] for i in range(len(data))]) == (parts, True)


def test_data_are_slices_of_the_input() -> None:
    chunk = _body([([], b"x" * 100_000)])
    events = PartEvents(BOUNDARY).feed(chunk)
    data = [d for kind, d in events if kind == "data"]
    assert len(data) == 1 and isinstance(data[0], memoryview) and data[0].obj is chunk


def test_transport_padding_after_the_boundary() -> None:
    data = b"--" + BOUNDARY + b" \t\r\nA: 1\r\n\r\nbody\r\n--" + BOUNDARY + b"--"
    assert _parse([data]) == ([([(b"A", b"1")], b"body")], True)


def test_truncated_body_has_no_final() -> None:
    data = _body([([], b"one"), ([], b"two")])
    parts, final = _parse([data[:-5]])
    assert not final and parts[0] == ([], b"one")


@pytest.mark.parametrize(
    "data",
    [
        b"--" + BOUNDARY + b"garbage\r\n\r\nx\r\n--" + BOUNDARY + b"--",
        b"--" + BOUNDARY + b"\r\nno colon here\r\n\r\nx\r\n--" + BOUNDARY + b"--",
        b"--" + BOUNDARY + b"\r\n" + b"A: 1\r\n" * 65 + b"\r\nx\r\n--" + BOUNDARY + b"--",
        b"--" + BOUNDARY + b"\r\nA: " + b"v" * (64 * 1024) + b"\r\n",
    ],
    ids=["text-after-boundary", "header-without-colon", "too-many-headers", "head-too-long"],
)
def test_malformed_is_refused(data: bytes) -> None:
    with pytest.raises(MalformedBody):
        _parse([data])
