"""The Part 10 rewriter: UIDs translated at every depth, everything else byte for byte."""

from __future__ import annotations

import hashlib
import re
import struct
import tracemalloc
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file

from shanoir_dicomweb_proxy import UpstreamError
from shanoir_dicomweb_proxy._dicom import (
    MultipartRewriter,
    Part10Rewriter,
    Translation,
    UidCollector,
)

# -- a small Part 10 encoder -------------------------------------------------------------------


@dataclass(frozen=True)
class Syntax:
    uid: str
    explicit: bool
    little: bool


EXPLICIT_LE = Syntax("1.2.840.10008.1.2.1", True, True)
IMPLICIT_LE = Syntax("1.2.840.10008.1.2", False, True)
EXPLICIT_BE = Syntax("1.2.840.10008.1.2.2", True, False)
JPEG_BASELINE = Syntax("1.2.840.10008.1.2.4.50", True, True)  # encapsulated pixel data
DEFLATED = Syntax("1.2.840.10008.1.2.1.99", True, True)  # explicit VR LE, then deflated

UNDEFINED = 0xFFFFFFFF
LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}


@dataclass(frozen=True)
class El:
    tag: int
    vr: str
    value: bytes


@dataclass(frozen=True)
class Item:
    elements: tuple[Node, ...]
    defined: bool = True


@dataclass(frozen=True)
class Sq:
    tag: int
    items: tuple[Item, ...]
    defined: bool = True
    as_un: bool = False  # explicit VR UN of undefined length: implicit VR LE inside


@dataclass(frozen=True)
class Frags:
    """An encapsulated value: undefined length, fragments, sequence delimiter."""

    tag: int
    fragments: tuple[bytes, ...]


Node = El | Sq | Frags


def ui(uid: str) -> bytes:
    raw = uid.encode()
    return raw + b"\0" if len(raw) % 2 else raw


def _tag(tag: int, syntax: Syntax) -> bytes:
    return struct.pack("<HH" if syntax.little else ">HH", tag >> 16, tag & 0xFFFF)


def _u32(value: int, syntax: Syntax) -> bytes:
    return struct.pack("<L" if syntax.little else ">L", value)


def _header(tag: int, vr: str, length: int, syntax: Syntax) -> bytes:
    if not syntax.explicit:
        return _tag(tag, syntax) + _u32(length, syntax)
    if vr in LONG_VRS:
        return _tag(tag, syntax) + vr.encode() + b"\0\0" + _u32(length, syntax)
    return _tag(tag, syntax) + vr.encode() + struct.pack("<H" if syntax.little else ">H", length)


def _delimiter(tag: int, syntax: Syntax) -> bytes:
    return _tag(tag, syntax) + b"\0\0\0\0"


def encode(nodes: Sequence[Node], syntax: Syntax) -> bytes:
    out = []
    for node in nodes:
        if isinstance(node, El):
            out.append(_header(node.tag, node.vr, len(node.value), syntax) + node.value)
        elif isinstance(node, Frags):
            body = b"".join(
                _tag(0xFFFEE000, syntax) + _u32(len(f), syntax) + f for f in node.fragments
            )
            out.append(_header(node.tag, "OB", UNDEFINED, syntax) + body)
            out.append(_delimiter(0xFFFEE0DD, syntax))
        else:
            inner = IMPLICIT_LE if node.as_un else syntax
            body = b"".join(_encode_item(item, inner) for item in node.items)
            vr = "UN" if node.as_un else "SQ"
            if node.defined:
                out.append(_header(node.tag, vr, len(body), syntax) + body)
            else:
                out.append(_header(node.tag, vr, UNDEFINED, syntax) + body)
                out.append(_delimiter(0xFFFEE0DD, inner))
    return b"".join(out)


def _encode_item(item: Item, syntax: Syntax) -> bytes:
    body = encode(item.elements, syntax)
    if item.defined:
        return _tag(0xFFFEE000, syntax) + _u32(len(body), syntax) + body
    return (
        _tag(0xFFFEE000, syntax) + _u32(UNDEFINED, syntax) + body + _delimiter(0xFFFEE00D, syntax)
    )


def part10(nodes: list[Node], syntax: Syntax, *, group_length: bool = True) -> bytes:
    meta: list[Node] = [
        El(0x00020001, "OB", b"\0\1"),
        El(0x00020002, "UI", ui("1.2.840.10008.5.1.4.1.1.4")),
        El(0x00020003, "UI", ui("1.2.826.0.1.3680043.2.1125.9")),
        El(0x00020010, "UI", ui(syntax.uid)),
    ]
    body = encode(meta, EXPLICIT_LE)
    if group_length:
        body = encode([El(0x00020000, "UL", struct.pack("<L", len(body)))], EXPLICIT_LE) + body
    dataset = encode(sorted(nodes, key=_key), syntax)
    if syntax == DEFLATED:
        dataset = deflate(dataset)
    return b"\0" * 128 + b"DICM" + body + dataset


def deflate(data: bytes) -> bytes:
    """A raw deflate stream, padded to an even length (PS3.5 §A.5)."""
    compressor = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = compressor.compress(data) + compressor.flush()
    return out + b"\0" if len(out) % 2 else out


def _key(node: Node) -> int:
    return node.tag


# -- UIDs and translations ----------------------------------------------------------------------

REAL_STUDIES = ("1.2.826.0.1.3680043.8.498.101", "1.2.840.113619.2.55.3.28311734")
REAL_SERIES = ("1.2.826.0.1.3680043.8.498.2021", "1.3.6.1.4.1.9328.50.1.29")
# Public UIDs of other lengths, odd and even, so that padding and every length change.
PUBLIC_STUDIES = dict(
    zip(REAL_STUDIES, ("2.25.7", "2.25.3141592653589793238462643383"), strict=True)
)
PUBLIC_SERIES = dict(zip(REAL_SERIES, ("2.25.1234567890123", "2.25.42"), strict=True))
FORWARD = Translation(studies=PUBLIC_STUDIES, series=PUBLIC_SERIES)
INVERSE = Translation(
    studies={v: k for k, v in PUBLIC_STUDIES.items()},
    series={v: k for k, v in PUBLIC_SERIES.items()},
)
SOP_INSTANCE = "1.2.826.0.1.3680043.2.1125.9"


def _testdata(name: str) -> bytes:
    return Path(str(get_testdata_file(name))).read_bytes()


class Resolver:
    """A ``resolve`` that answers a fixed translation and records what it was asked."""

    def __init__(self, translation: Translation) -> None:
        self.translation = translation
        self.calls: list[UidCollector] = []

    async def __call__(self, collector: UidCollector) -> Translation:
        self.calls.append(collector)
        return self.translation


def _pieces(data: bytes, sizes: list[int]) -> Iterator[bytes]:
    position, turn = 0, 0
    while position < len(data):
        size = sizes[turn % len(sizes)]
        yield data[position : position + size]
        position += size
        turn += 1


async def rewrite(
    data: bytes,
    translation: Translation = FORWARD,
    sizes: list[int] | None = None,
    *,
    study_known: bool = False,
    **options: int,
) -> tuple[bytes, Part10Rewriter]:
    rewriter = Part10Rewriter(Resolver(translation), study_known=study_known, **options)
    out = [await rewriter.feed(piece) for piece in _pieces(data, sizes or [len(data) or 1])]
    out.append(await rewriter.close())
    return b"".join(out), rewriter


def _walk(dataset: Any, parent: int = 0) -> Iterator[tuple[int, int, Any]]:
    """(enclosing sequence tag, tag, value) of every element at every depth."""
    for element in dataset:
        if element.VR == "SQ":
            for item in element.value:
                yield from _walk(item, element.tag)
        else:
            yield parent, element.tag, element.value


def _uids(data: bytes) -> tuple[set[str], set[str]]:
    """Study and series UIDs of a Part 10 file at every depth (study references included)."""
    studies: set[str] = set()
    series: set[str] = set()
    for parent, tag, value in _walk(pydicom.dcmread(BytesIO(data))):
        if tag == 0x0020000D or (parent == 0x00081110 and tag == 0x00081155):
            studies.add(str(value))
        elif tag == 0x0020000E:
            series.add(str(value))
    return studies, series


# -- 1. property: random datasets, there and back ----------------------------------------------


def _even(raw: bytes) -> bytes:
    raw = raw.replace(b".", b"_")  # no UID can appear by chance
    return raw + b"\0" if len(raw) % 2 else raw


STUDY = st.sampled_from(REAL_STUDIES).map(lambda u: El(0x0020000D, "UI", ui(u)))
SERIES = st.sampled_from(REAL_SERIES).map(lambda u: El(0x0020000E, "UI", ui(u)))
TEXT = st.text("ABCDEFGH XYZ", max_size=20).map(lambda s: s.encode())


def _sequence(tag: int, items: st.SearchStrategy[Item]) -> st.SearchStrategy[Sq]:
    return st.builds(
        lambda found, defined, as_un: Sq(tag, tuple(found), defined, as_un and not defined),
        st.lists(items, max_size=3),
        st.booleans(),
        st.booleans(),
    )


def _item(required: dict[int, Any], optional: dict[int, Any]) -> st.SearchStrategy[Item]:
    return st.builds(
        lambda found, defined: Item(tuple(sorted(found.values(), key=_key)), defined),
        st.fixed_dictionaries(required, optional=optional),
        st.booleans(),
    )


def _items(depth: int) -> st.SearchStrategy[Item]:
    optional: dict[int, Any] = {
        0x00080100: st.just(El(0x00080100, "SH", b"T-1234")),
        0x0020000D: STUDY,
        0x0020000E: SERIES,
    }
    if depth < 3:
        optional |= _sequences(depth + 1)
    return _item({}, optional)


def _sequences(depth: int) -> dict[int, st.SearchStrategy[Sq]]:
    reference = _item(
        {
            0x00081150: st.just(El(0x00081150, "UI", ui("1.2.840.10008.3.1.2.3.1"))),
            0x00081155: st.sampled_from(REAL_STUDIES).map(lambda u: El(0x00081155, "UI", ui(u))),
        },
        {},
    )
    image = _item({0x00081155: st.just(El(0x00081155, "UI", ui(SOP_INSTANCE)))}, {})
    return {
        0x00081110: _sequence(0x00081110, reference),
        0x00081140: _sequence(0x00081140, image),
        0x00400275: _sequence(0x00400275, _items(depth)),
        0x0040A730: _sequence(0x0040A730, _items(depth)),
    }


@st.composite
def instances(draw: st.DrawFn) -> tuple[list[Node], Syntax, bool]:
    syntax = draw(st.sampled_from([EXPLICIT_LE, IMPLICIT_LE, EXPLICIT_BE]))
    pixels = draw(st.sampled_from(["none", "native", "encapsulated"]))
    if pixels == "encapsulated":
        syntax = JPEG_BASELINE  # explicit VR little endian
    binary = st.binary(max_size=3000).map(_even)
    optional: dict[int, Any] = {
        0x00080060: st.just(El(0x00080060, "CS", b"MR")),
        0x00080070: TEXT.map(lambda t: El(0x00080070, "LO", _even(t))),
        0x00091001: binary.map(lambda b: El(0x00091001, "OB", b)),  # private: opaque
        # A private sequence: in implicit VR, known as one by its undefined length only.
        0x00091010: _sequence(0x00091010, _items(2)).map(
            lambda sq: Sq(sq.tag, sq.items, False, sq.as_un)
        ),
        0x00100010: st.just(El(0x00100010, "PN", b"Doe^John")),
        0x00200013: st.just(El(0x00200013, "IS", b"12")),
        0x00280010: st.just(El(0x00280010, "US", b"\0\2")),
        0x00420011: binary.map(lambda b: El(0x00420011, "OB", b)),
        0xFFFAFFFA: _sequence(0xFFFAFFFA, _items(2)),  # after the pixel data
        0xFFFCFFFC: binary.map(lambda b: El(0xFFFCFFFC, "OB", b)),
        **_sequences(1),
    }
    found = draw(
        st.fixed_dictionaries(
            {
                0x00080016: st.just(El(0x00080016, "UI", ui("1.2.840.10008.5.1.4.1.1.4"))),
                0x00080018: st.just(El(0x00080018, "UI", ui(SOP_INSTANCE))),
                0x0020000D: STUDY,
                0x0020000E: SERIES,
            },
            optional=optional,
        )
    )
    nodes: list[Node] = list(found.values())
    if not (syntax.explicit and syntax.little):  # UN sequences only where pydicom reads them
        nodes = [_no_un(node) for node in nodes]
    if pixels == "native":
        nodes.append(El(0x7FE00010, "OW", draw(binary)))
    elif pixels == "encapsulated":
        fragments = draw(st.lists(binary, min_size=1, max_size=4))
        nodes.append(Frags(0x7FE00010, (b"", *fragments)))
    return nodes, syntax, draw(st.booleans())


def _no_un(node: Node) -> Node:
    if not isinstance(node, Sq):
        return node
    items = tuple(
        Item(tuple(_no_un(n) for n in item.elements), item.defined) for item in node.items
    )
    return Sq(node.tag, items, node.defined)


def _assert_public(data: bytes) -> None:
    dataset = pydicom.dcmread(BytesIO(data))
    seen = 0
    for parent, tag, value in _walk(dataset):
        if tag == 0x0020000D or (parent == 0x00081110 and tag == 0x00081155):
            assert value in PUBLIC_STUDIES.values()
            seen += 1
        elif tag == 0x0020000E:
            assert value in PUBLIC_SERIES.values()
            seen += 1
        elif tag == 0x00081155:
            assert value == SOP_INSTANCE  # an image reference is not a study
    assert seen >= 2


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    instance=instances(),
    sizes=st.lists(st.integers(min_value=1, max_value=2000), min_size=1, max_size=8),
    large_value=st.sampled_from([1, 64, 1024, 65536]),
)
async def test_there_and_back(
    instance: tuple[list[Node], Syntax, bool], sizes: list[int], large_value: int
) -> None:
    nodes, syntax, group_length = instance
    data = part10(nodes, syntax, group_length=group_length)
    out, rewriter = await rewrite(data, FORWARD, sizes, large_value=large_value)
    assert not rewriter.dropped
    assert out != data
    _assert_public(out)
    back, _ = await rewrite(out, INVERSE, sizes[::-1], large_value=large_value)
    assert back == data


# -- 2. pydicom's own files ---------------------------------------------------------------------


def _public(index: int) -> str:
    return f"2.25.{index}{'9' * (index % 7)}"


@pytest.mark.parametrize(
    "name",
    [
        "CT_small.dcm",
        "MR_small.dcm",
        "test-SR.dcm",  # nested content sequences
        "liver_1frame.dcm",  # a SEG: referenced series at depth
        "MR_small_implicit.dcm",
        "rtplan.dcm",  # implicit VR, referenced study in sequences
        "MR_small_bigendian.dcm",
        "JPEG2000.dcm",  # encapsulated pixel data
        "image_dfl.dcm",  # Deflated Explicit VR Little Endian
        "SC_rgb_rle.dcm",
        "UN_sequence.dcm",  # a private UN sequence of undefined length holding the study
        "reportsi.dcm",
        "waveform_ecg.dcm",
    ],
)
@pytest.mark.parametrize("large_value", [16, 64 * 1024])
async def test_pydicom_files(name: str, large_value: int) -> None:
    data = _testdata(name)
    studies, series = _uids(data)
    assert studies and series
    translation = Translation(
        studies={uid: _public(i) for i, uid in enumerate(sorted(studies))},
        series={uid: _public(100 + i) for i, uid in enumerate(sorted(series))},
    )
    outputs = set()
    for size in (1, 7, 4096, len(data)):
        out, rewriter = await rewrite(data, translation, [size], large_value=large_value)
        assert not rewriter.dropped
        outputs.add(out)
    assert len(outputs) == 1  # however the input is cut
    out = outputs.pop()
    public_studies, public_series = _uids(out)
    assert public_studies == set(translation.studies.values())
    assert public_series == set(translation.series.values())
    for uid in studies | series:  # a whole UID: some SOP instance UIDs extend a series UID
        assert re.search(rb"(?<![0-9.])" + re.escape(uid.encode()) + rb"(?![0-9.])", out) is None
    before, after = pydicom.dcmread(BytesIO(data)), pydicom.dcmread(BytesIO(out))
    if "PixelData" in before:
        assert after.PixelData == before.PixelData
    assert len(after) == len(before)
    assert after.file_meta == before.file_meta
    assert after.get("SOPInstanceUID") == before.get("SOPInstanceUID")


async def test_file_without_uids_passes_unchanged() -> None:
    # Implicit VR, and a File Meta group without (0002,0000).
    data = _testdata("no_meta_group_length.dcm")
    resolver = Resolver(FORWARD)
    rewriter = Part10Rewriter(resolver, study_known=True)
    out = b"".join([await rewriter.feed(data[i : i + 5]) for i in range(0, len(data), 5)])
    assert out + await rewriter.close() == data
    assert resolver.calls == []


async def test_one_lookup_per_batch_with_uids() -> None:
    # The first batch (up to (0020,000E)) holds the study and series, and the other UI values
    # before them; the Frame of Reference UID comes in a later batch; the pixel data in none.
    data = _testdata("CT_small.dcm")
    suffix = ".20040119072730.12322"
    study, series = "1.3.6.1.4.1.5962.1.2.1" + suffix, "1.3.6.1.4.1.5962.1.3.1.1" + suffix
    resolver = Resolver(Translation(studies={study: "2.25.1"}, series={}))
    rewriter = Part10Rewriter(resolver, study_known=False, large_value=1024)
    out = [await rewriter.feed(data[i : i + 512]) for i in range(0, len(data), 512)]
    out.append(await rewriter.close())
    assert not rewriter.dropped
    assert [(c.studies, c.series) for c in resolver.calls] == [({study}, {series}), (set(), set())]
    # An instance's own SOP Instance UID is never a study or series UID: not asked.
    assert "1.3.6.1.4.1.5962.1.1.1.1.1" + suffix not in resolver.calls[0].others
    assert resolver.calls[1].others == {"1.3.6.1.4.1.5962.1.4.1.1" + suffix}  # Frame of Ref.
    assert not any(uid.startswith("1.2.840.10008.") for c in resolver.calls for uid in c.others)
    assert pydicom.dcmread(BytesIO(b"".join(out))).StudyInstanceUID == "2.25.1"


async def test_one_lookup_per_instance_when_its_header_is_in_hand() -> None:
    # Given whole, the elements after (0020,000E) go with the first batch: the Frame of
    # Reference UID is looked up with the study and series, and the output is the same.
    data = _testdata("CT_small.dcm")
    suffix = ".20040119072730.12322"
    study, series = "1.3.6.1.4.1.5962.1.2.1" + suffix, "1.3.6.1.4.1.5962.1.3.1.1" + suffix
    translation = Translation(studies={study: "2.25.1"}, series={})
    resolver = Resolver(translation)
    rewriter = Part10Rewriter(resolver, study_known=False)
    out = await rewriter.feed(data) + await rewriter.close()
    assert [(c.studies, c.series) for c in resolver.calls] == [({study}, {series})]
    assert "1.3.6.1.4.1.5962.1.4.1.1" + suffix in resolver.calls[0].others  # Frame of Ref.
    in_pieces, _ = await rewrite(data, translation, [512])
    assert out == in_pieces


@pytest.mark.parametrize("known", [True, False])
async def test_input_ending_inside_a_sequence_after_the_series(known: bool) -> None:
    # The first batch cannot go on over part of a sequence: it ends at (0020,000E), decided at
    # once, and the sequence (a series UID inside) goes in the next batch.
    nested = Sq(0x0040A730, (Item((El(0x0020000E, "UI", ui(REAL_SERIES[1])),)),))
    study = REAL_STUDIES[0] if known else "1.2.3.4.5.6.7"
    data = _simple(nested, study=study)
    cut = data.index(ui(REAL_SERIES[1])) + 4
    rewriter = Part10Rewriter(Resolver(FORWARD), study_known=False)
    out = await rewriter.feed(data[:cut])
    assert rewriter.dropped is not known
    out += await rewriter.feed(data[cut:]) + await rewriter.close()
    if known:
        public = Sq(0x0040A730, (Item((El(0x0020000E, "UI", ui(PUBLIC_SERIES[REAL_SERIES[1]])),)),))
        study, series = PUBLIC_STUDIES[REAL_STUDIES[0]], PUBLIC_SERIES[REAL_SERIES[0]]
        assert out == _simple(public, study=study, series=series)
    else:
        assert out == b""


@pytest.mark.parametrize("known", [True, False])
async def test_a_malformed_element_after_the_series_comes_after_the_decision(known: bool) -> None:
    # An unknown VR right after (0020,000E), given in one piece: an instance that is not shown
    # is dropped as before (the rest ignored); one that is shown is refused.
    data = _simple(El(0x00200020, "ZZ", b"AB"), study=REAL_STUDIES[0] if known else "1.2.3.4.5.6.7")
    rewriter = Part10Rewriter(Resolver(FORWARD), study_known=False)
    if known:
        with pytest.raises(UpstreamError, match="unknown VR"):
            await rewriter.feed(data)
    else:
        assert await rewriter.feed(data) + await rewriter.close() == b""
        assert rewriter.dropped


# -- 3. unknown studies and series --------------------------------------------------------------


def _simple(*extra: Node, study: str = REAL_STUDIES[0], series: str = REAL_SERIES[0]) -> bytes:
    nodes: list[Node] = [
        El(0x00080018, "UI", ui(SOP_INSTANCE)),
        El(0x0020000D, "UI", ui(study)),
        El(0x0020000E, "UI", ui(series)),
        El(0x00200013, "IS", b"12"),
        El(0x7FE00010, "OW", bytes(range(256)) * 4),
        *extra,
    ]
    return part10(nodes, EXPLICIT_LE)


@pytest.mark.parametrize("size", [1, 100, 100_000])
async def test_unknown_study_drops_the_instance(size: int) -> None:
    data = _simple(study="1.2.3.4.5.6.7")
    rewriter = Part10Rewriter(Resolver(FORWARD), study_known=True, large_value=16)
    outputs = [await rewriter.feed(piece) for piece in _pieces(data, [size])]
    assert rewriter.dropped
    assert b"".join(outputs) == b""
    assert await rewriter.close() == b""


async def test_dropped_instance_swallows_a_truncated_rest() -> None:
    data = _simple(study="1.2.3.4.5.6.7")
    rewriter = Part10Rewriter(Resolver(FORWARD), study_known=True)
    assert await rewriter.feed(data[:-10]) == b""
    assert rewriter.dropped
    assert await rewriter.close() == b""


async def test_unknown_series() -> None:
    data = _simple(series="1.2.3.4.5.6.7")
    out, rewriter = await rewrite(data)  # exposed as it is, in a known study
    assert not rewriter.dropped
    assert _uids(out) == ({PUBLIC_STUDIES[REAL_STUDIES[0]]}, {"1.2.3.4.5.6.7"})
    hidden = Translation(studies=PUBLIC_STUDIES, series=PUBLIC_SERIES, expose_unmapped=False)
    out, rewriter = await rewrite(data, hidden)
    assert rewriter.dropped
    assert out == b""


async def test_unknown_nested_study_is_emptied() -> None:
    unknown = "1.2.3.4.5.6.7"
    reference = Item(
        (El(0x00081150, "UI", ui("1.2.840.10008.3.1.2.3.1")), El(0x00081155, "UI", ui(unknown)))
    )
    request = Item((El(0x00080100, "SH", b"T-1234"), El(0x0020000D, "UI", ui(unknown))), False)
    data = _simple(
        Sq(0x00081110, (reference,)),
        Sq(0x00400275, (request,), defined=True),
        Sq(0xFFFAFFFA, (request,), defined=False),
    )
    out, _ = await rewrite(data, sizes=[3])
    assert unknown.encode() not in out
    before, after = pydicom.dcmread(BytesIO(data)), pydicom.dcmread(BytesIO(out))
    assert after.ReferencedStudySequence[0].ReferencedSOPInstanceUID == ""
    assert after.RequestAttributesSequence[0].StudyInstanceUID == ""
    assert after[0xFFFAFFFA].value[0].StudyInstanceUID == ""
    assert after.RequestAttributesSequence[0].CodeValue == "T-1234"
    assert after.StudyInstanceUID == PUBLIC_STUDIES[REAL_STUDIES[0]]
    assert after.PixelData == before.PixelData
    for keyword in ("SOPInstanceUID", "InstanceNumber"):
        assert after[keyword] == before[keyword]


# -- other rules of the format ------------------------------------------------------------------


async def test_retrieve_url_and_group_length() -> None:
    url = f"http://pacs:8042/dicom-web/studies/{REAL_STUDIES[1]}"
    group = [
        El(0x0020000D, "UI", ui(REAL_STUDIES[1])),
        El(0x0020000E, "UI", ui(REAL_SERIES[0])),
        El(0x00200013, "IS", b"12"),
    ]
    length = El(0x00200000, "UL", struct.pack("<L", len(encode(group, EXPLICIT_LE))))
    data = part10([El(0x00081190, "UR", url.encode()), length, *group], EXPLICIT_LE)
    translation = Translation(
        studies=PUBLIC_STUDIES,
        series=PUBLIC_SERIES,
        upstream_base="http://pacs:8042/dicom-web",
        public_base="https://gw.example.org/dicomweb",
    )
    out, _ = await rewrite(data, translation)
    public = f"https://gw.example.org/dicomweb/studies/{PUBLIC_STUDIES[REAL_STUDIES[1]]}"
    assert public.encode() + b" " in out  # UR is padded with a space
    dataset = pydicom.dcmread(BytesIO(out))
    assert dataset.RetrieveURL == public
    new_group = [
        El(0x0020000D, "UI", ui(PUBLIC_STUDIES[REAL_STUDIES[1]])),
        El(0x0020000E, "UI", ui(PUBLIC_SERIES[REAL_SERIES[0]])),
        El(0x00200013, "IS", b"12"),
    ]
    assert dataset[0x00200000].value == len(encode(new_group, EXPLICIT_LE))


async def test_elements_after_streamed_pixel_data() -> None:
    later = Item((El(0x0020000D, "UI", ui(REAL_STUDIES[1])),), defined=True)
    nodes: list[Node] = [
        El(0x0020000D, "UI", ui(REAL_STUDIES[0])),
        El(0x0020000E, "UI", ui(REAL_SERIES[0])),
        Frags(0x7FE00010, (b"", b"\1" * 5000, b"\2" * 70000)),
        Sq(0xFFFAFFFA, (later,)),
        El(0xFFFCFFFC, "OB", b"\0" * 100),
    ]
    data = part10(nodes, JPEG_BASELINE)
    out, _ = await rewrite(data, sizes=[4096, 1, 65536], large_value=1024)
    expected = part10(
        [
            El(0x0020000D, "UI", ui(PUBLIC_STUDIES[REAL_STUDIES[0]])),
            El(0x0020000E, "UI", ui(PUBLIC_SERIES[REAL_SERIES[0]])),
            nodes[2],
            Sq(0xFFFAFFFA, (Item((El(0x0020000D, "UI", ui(PUBLIC_STUDIES[REAL_STUDIES[1]])),)),)),
            nodes[4],
        ],
        JPEG_BASELINE,
    )
    assert out == expected


async def test_sequence_beyond_max_buffer() -> None:
    big = Item((El(0x00080100, "SH", b"T-1234"), El(0x00091001, "OB", bytes(40_000))))
    data = _simple(Sq(0x0040A730, (big, big)))
    with pytest.raises(UpstreamError, match="larger than"):
        await rewrite(data, sizes=[8192], max_buffer=64 * 1024, large_value=1024)
    header = part10([El(0x00091001, "OB", bytes(100_000)), El(0x0020000D, "UI", b"1")], EXPLICIT_LE)
    rewriter = Part10Rewriter(Resolver(FORWARD), study_known=False, max_buffer=64 * 1024)
    with pytest.raises(UpstreamError, match="larger than"):
        await rewriter.feed(header[:1000])  # known too big from the element's header


HIDDEN_STUDY, UNMAPPED_SERIES, SOP_CLASS = (
    "1.2.826.0.1.77",
    "1.2.826.0.1.55",
    "1.2.840.10008.5.1.4.1.1.4",
)


@pytest.mark.parametrize("syntax", [EXPLICIT_LE, IMPLICIT_LE, EXPLICIT_BE, DEFLATED])
@pytest.mark.parametrize("expose", [True, False])
async def test_real_uids_under_other_attributes(syntax: Syntax, expose: bool) -> None:
    study, series = REAL_STUDIES[0], REAL_SERIES[0]
    public_study, public_series = PUBLIC_STUDIES[study], PUBLIC_SERIES[series]
    reference = Item((El(0x00081150, "UI", ui(SOP_CLASS)), El(0x00081155, "UI", ui(series))))
    deep = Item((El(0x00209164, "UI", ui(study)),))
    evidence = Item(
        (
            El(0x00081155, "UI", ui(UNMAPPED_SERIES)),
            Sq(0x00081115, (deep,), defined=False),
            El(0x0040A124, "UI", ui(SOP_INSTANCE + "\\" + HIDDEN_STUDY)),
        )
    )
    nodes: list[Node] = [
        El(0x00080016, "UI", ui(SOP_CLASS)),
        El(0x00080018, "UI", ui(SOP_INSTANCE)),
        Sq(0x00081140, (reference,)),
        El(0x0020000D, "UI", ui(study)),
        El(0x0020000E, "UI", ui(series)),
        El(0x00200052, "UI", ui(study)),  # Frame of Reference UID equal to the study's
        El(0x00200200, "UI", ui(series)),  # Synchronization Frame of Reference UID
        El(0x00209161, "UI", ui(HIDDEN_STUDY)),  # Concatenation UID: a study not shown here
        Sq(0x0040A375, (evidence,)),
        El(0x7FE00010, "OW", bytes(range(256)) * 16),
    ]
    translation = replace(
        FORWARD,
        hidden=frozenset({HIDDEN_STUDY}),
        unmapped=frozenset({UNMAPPED_SERIES}),
        expose_unmapped=expose,
    )
    data = part10(nodes, syntax)
    resolver = Resolver(translation)
    outputs = set()
    for sizes in ([1], [13, 700], [len(data)]):
        out, _ = await rewrite(data, translation, sizes, large_value=256)
        outputs.add(out)
    assert len(outputs) == 1
    rewriter = Part10Rewriter(resolver, study_known=False)
    assert await rewriter.feed(data) + await rewriter.close() in outputs
    ds = pydicom.dcmread(BytesIO(outputs.pop()))
    assert ds.SOPClassUID == SOP_CLASS and ds.SOPInstanceUID == SOP_INSTANCE
    assert ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID == public_series
    assert ds.ReferencedImageSequence[0].ReferencedSOPClassUID == SOP_CLASS
    assert ds.FrameOfReferenceUID == public_study
    assert ds.SynchronizationFrameOfReferenceUID == public_series
    assert ds.ConcatenationUID == ""
    item = ds.CurrentRequestedProcedureEvidenceSequence[0]
    assert item.ReferencedSeriesSequence[0].DimensionOrganizationUID == public_study
    assert item.ReferencedSOPInstanceUID == (UNMAPPED_SERIES if expose else "")
    assert item.UID == ""
    assert ds.PixelData == bytes(range(256)) * 16
    collected = set().union(*(c.others for c in resolver.calls))
    assert {study, series, SOP_INSTANCE, HIDDEN_STUDY, UNMAPPED_SERIES} <= collected
    assert SOP_CLASS not in collected


# -- 4. what cannot be rewritten ----------------------------------------------------------------


def _inflated(data: bytes) -> bytes:
    """The dataset of a deflated Part 10 file (after its File Meta group), inflated."""
    meta_end = 144 + struct.unpack_from("<L", data, 140)[0]
    return zlib.decompressobj(-zlib.MAX_WBITS).decompress(data[meta_end:])


@pytest.mark.parametrize("large_value", [1, 64 * 1024])
async def test_deflated_dataset_is_inflated_rewritten_and_deflated(large_value: int) -> None:
    pixels = bytes(range(256)) * 64
    nodes: list[Node] = [
        El(0x00080018, "UI", ui(SOP_INSTANCE)),
        El(0x0020000D, "UI", ui(REAL_STUDIES[0])),
        El(0x0020000E, "UI", ui(REAL_SERIES[1])),
        Sq(0x00081110, (Item((El(0x00081155, "UI", ui(REAL_STUDIES[1])),)),)),
        El(0x7FE00010, "OW", pixels),
    ]
    data = part10(nodes, DEFLATED)
    outputs = set()
    for sizes in ([1], [7, 300], [4096], [len(data)]):
        out, _ = await rewrite(data, FORWARD, sizes, large_value=large_value)
        outputs.add(out)
    assert len(outputs) == 1  # however the input is cut
    out = outputs.pop()
    plain, _ = await rewrite(part10(nodes, EXPLICIT_LE), FORWARD)
    assert _inflated(out) == plain[len(plain) - len(_inflated(out)) :]  # the same dataset
    assert len(out) % 2 == 0
    ds = pydicom.dcmread(BytesIO(out))
    assert ds.file_meta.TransferSyntaxUID == DEFLATED.uid
    assert (ds.StudyInstanceUID, ds.SeriesInstanceUID) == (
        PUBLIC_STUDIES[REAL_STUDIES[0]],
        PUBLIC_SERIES[REAL_SERIES[1]],
    )
    assert (
        ds.ReferencedStudySequence[0].ReferencedSOPInstanceUID
        == "2.25.3141592653589793238462643383"
    )
    assert ds.PixelData == pixels
    assert REAL_STUDIES[0].encode() not in _inflated(out)


async def test_deflated_unknown_study_drops_the_instance() -> None:
    data = part10(
        [El(0x0020000D, "UI", ui("1.2.3.4")), El(0x0020000E, "UI", ui("1.2.3.5"))], DEFLATED
    )
    out, rewriter = await rewrite(data, FORWARD, [10])
    assert rewriter.dropped and out == b""


async def test_deflated_large_value_streams_in_bounded_memory() -> None:
    # 32 MiB of zeros deflate to ~32 KiB: a ratio of 1000, inflated piece by piece.
    data = part10(
        [
            El(0x0020000D, "UI", ui(REAL_STUDIES[1])),
            El(0x0020000E, "UI", ui(REAL_SERIES[1])),
            El(0x7FE00010, "OW", bytes(32 * 1024 * 1024)),
        ],
        DEFLATED,
    )
    assert len(data) < 100_000
    rewriter = Part10Rewriter(Resolver(FORWARD), study_known=False)
    out: list[bytes] = []
    held = 0
    tracemalloc.start()
    try:
        for piece in _pieces(data, [8192]):
            out.append(bytes(await rewriter.feed(piece)))
            held = max(held, rewriter.buffered)
        out.append(bytes(await rewriter.close()))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held <= 2 * 64 * 1024
    assert peak < 4 * 1024 * 1024
    ds = pydicom.dcmread(BytesIO(b"".join(out)))
    assert ds.StudyInstanceUID == PUBLIC_STUDIES[REAL_STUDIES[1]]
    assert len(ds.PixelData) == 32 * 1024 * 1024 and not any(ds.PixelData[::4096])


async def test_malformed_deflate_stream_is_a_clean_error() -> None:
    data = part10([El(0x0020000D, "UI", ui(REAL_STUDIES[0]))], DEFLATED)
    meta_end = 144 + struct.unpack_from("<L", data, 140)[0]
    corrupt = data[:meta_end] + b"\xff\xff\xff\xff" + data[meta_end + 4 :]
    with pytest.raises(UpstreamError, match="corrupt deflated dataset"):
        await rewrite(corrupt)
    for cut in (meta_end + 1, meta_end + 5, len(data) - 3):
        for size in (1, 1000):
            with pytest.raises(UpstreamError, match="truncated"):
                await rewrite(data[:cut], sizes=[size])
    out, _ = await rewrite(data + b"\0\0trailer")  # what follows the stream is left out
    assert out == (await rewrite(data))[0]
    assert pydicom.dcmread(BytesIO(out)).StudyInstanceUID == PUBLIC_STUDIES[REAL_STUDIES[0]]
    with pytest.raises(UpstreamError, match="without a File Meta group length"):
        await rewrite(
            part10([El(0x0020000D, "UI", ui(REAL_STUDIES[0]))], DEFLATED, group_length=False)
        )


async def test_missing_dicm_prefix() -> None:
    data = _simple()
    with pytest.raises(UpstreamError, match="DICM"):
        await rewrite(data[:128] + b"DICN" + data[132:])
    with pytest.raises(UpstreamError, match="DICM"):
        await rewrite(data[128:], sizes=[10])  # no preamble


def _truncation_points(data: bytes) -> list[int]:
    pixel = data.index(b"\xe0\x7f\x10\x00")
    return [1, 100, 131, 132, 140, 300, pixel - 1, pixel + 4, pixel + 20, len(data) - 1]


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small_implicit.dcm", "JPEG2000.dcm"])
async def test_truncated_file(name: str) -> None:
    data = _testdata(name)
    translation = Translation(
        studies={u: "2.25.1" for u in _uids(data)[0]}, series={u: "2.25.2" for u in _uids(data)[1]}
    )
    for cut in _truncation_points(data):
        for size in (1, 1000, cut):
            with pytest.raises(UpstreamError, match="truncated"):
                await rewrite(data[:cut], translation, [size], large_value=256)
    # Cut between two top-level elements, the file is complete.
    out, _ = await rewrite(data[: data.index(b"\xe0\x7f\x10\x00")], translation)
    assert pydicom.dcmread(BytesIO(out)).StudyInstanceUID == "2.25.1"


async def test_truncated_inside_a_sequence() -> None:
    inner = Item((El(0x0020000D, "UI", ui(REAL_STUDIES[0])),), defined=False)
    data = _simple(Sq(0xFFFAFFFA, (inner,), defined=False))
    end = len(data)
    for cut in range(end - 24, end):  # into the trailing item and sequence delimiters
        with pytest.raises(UpstreamError, match="truncated"):
            await rewrite(data[:cut], sizes=[7])
    out, _ = await rewrite(data, sizes=[7])
    assert pydicom.dcmread(BytesIO(out))[0xFFFAFFFA].value[0].StudyInstanceUID == "2.25.7"


# -- 5. large values stream -----------------------------------------------------------------------


async def test_large_pixel_data_streams() -> None:
    pixels = bytes(range(256)) * (20 * 1024 * 4)  # 20 MiB
    header: list[Node] = [
        El(0x00080018, "UI", ui(SOP_INSTANCE)),
        El(0x00280010, "US", b"\0\2"),
    ]
    data = part10(
        [
            *header,
            El(0x0020000D, "UI", ui(REAL_STUDIES[1])),
            El(0x0020000E, "UI", ui(REAL_SERIES[1])),
            El(0x7FE00010, "OW", pixels),
        ],
        EXPLICIT_LE,
    )
    expected = part10(
        [
            *header,
            El(0x0020000D, "UI", ui(PUBLIC_STUDIES[REAL_STUDIES[1]])),
            El(0x0020000E, "UI", ui(PUBLIC_SERIES[REAL_SERIES[1]])),
            El(0x7FE00010, "OW", pixels),
        ],
        EXPLICIT_LE,
    )
    chunk = 64 * 1024
    rewriter = Part10Rewriter(Resolver(FORWARD), study_known=False)
    digest = hashlib.sha256()
    held = 0
    tracemalloc.start()
    try:
        for position in range(0, len(data), chunk):
            digest.update(await rewriter.feed(data[position : position + chunk]))
            held = max(held, rewriter.buffered)
        digest.update(await rewriter.close())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert digest.digest() == hashlib.sha256(expected).digest()
    assert held <= 64 * 1024 + chunk
    assert peak < 2 * 1024 * 1024


async def test_pixel_data_chunks_pass_the_multipart_rewriter_as_they_are() -> None:
    # A retrieve answer of two instances in 64 KiB chunks: a chunk that holds nothing but pixel
    # data comes out as the very object that went in (not copied); the rest is rewritten.
    pixels = bytes(range(256)) * 1024

    def instance(study: str, series: str) -> bytes:
        nodes: list[Node] = [
            El(0x00080018, "UI", ui(SOP_INSTANCE)),
            El(0x0020000D, "UI", ui(study)),
            El(0x0020000E, "UI", ui(series)),
            El(0x7FE00010, "OW", pixels),
        ]
        return part10(nodes, EXPLICIT_LE)

    def answer(bodies: list[bytes]) -> bytes:
        head = b"--b0undary\r\nContent-Type: application/dicom\r\n\r\n"
        return b"".join(head + body + b"\r\n" for body in bodies) + b"--b0undary--\r\n"

    real = [instance(REAL_STUDIES[i], REAL_SERIES[i]) for i in (0, 1)]
    public = [
        instance(PUBLIC_STUDIES[REAL_STUDIES[i]], PUBLIC_SERIES[REAL_SERIES[i]]) for i in (0, 1)
    ]
    data = answer(real)
    chunks = [data[at : at + 64 * 1024] for at in range(0, len(data), 64 * 1024)]
    resolver = Resolver(FORWARD)
    rewriter = MultipartRewriter(b"b0undary", lambda _: Part10Rewriter(resolver, study_known=False))
    outs = [await rewriter.feed(chunk) for chunk in chunks]
    assert b"".join(outs) + await rewriter.close() == answer(public)
    passed = [index for index, chunk in enumerate(chunks) if outs[index] is chunk]
    assert passed == [1, 2, 3, 5, 6, 7]  # 0 and 4 hold a part's head, 8 the closing delimiter


async def test_small_elements_after_the_first_flush_go_in_batches() -> None:
    # 256 private elements of 1 KiB after (0020,000E): held at most ~large_value at a time.
    private = [El(0x00291000 + i, "OB", bytes([i % 256]) * 1024) for i in range(256)]
    data = _simple(*private)
    large, chunk = 16 * 1024, 4096
    rewriter = Part10Rewriter(Resolver(FORWARD), study_known=False, large_value=large)
    out, held = [], 0
    for piece in _pieces(data, [chunk]):
        out.append(await rewriter.feed(piece))
        held = max(held, rewriter.buffered)
    out.append(await rewriter.close())
    assert held <= large + chunk + 1024
    study, series = PUBLIC_STUDIES[REAL_STUDIES[0]], PUBLIC_SERIES[REAL_SERIES[0]]
    assert b"".join(out) == _simple(*private, study=study, series=series)
