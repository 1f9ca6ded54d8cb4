"""DICOM JSON and XML translation as streams, in process: any chunking gives the same answer."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import replace
from typing import Any

import anyio
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shanoir_dicomweb_proxy import UpstreamError
from shanoir_dicomweb_proxy._dicom import (
    SERIES_INSTANCE_UID,
    STUDY_INSTANCE_UID,
    BufferedPart,
    JsonRewriter,
    MultipartRewriter,
    Translation,
    UidCollector,
    XmlDataset,
    split_parts,
    to_xml,
    translate_xml,
)

REAL_STUDY, REAL_SERIES, OTHER_STUDY = "1.2.3.4", "1.2.3.4.5", "9.8.7"
UPSTREAM, PUBLIC = "http://pacs:8042/dicom-web", "https://gw.example.org/dicomweb"
TRANSLATION = Translation(
    studies={REAL_STUDY: "1.4.9.42"},
    series={REAL_SERIES: "1.4.8.7"},
    upstream_base=UPSTREAM,
    public_base=PUBLIC,
)


def _row(study: str, series: str, text: str = "x", nested: bool = False) -> dict[str, Any]:
    link = f"{UPSTREAM}/studies/{study}/series/{series}"
    row: dict[str, Any] = {
        "00080018": {"vr": "UI", "Value": ["1.2.3.4.5.6"]},
        "0008103E": {"vr": "LO", "Value": [text]},
        "00081190": {"vr": "UR", "Value": [link]},
        "0020000D": {"vr": "UI", "Value": [study]},
        "0020000E": {"vr": "UI", "Value": [series]},
        "7FE00010": {"vr": "OW", "BulkDataURI": link + "/instances/1.2/bulk/7fe00010"},
    }
    if nested:
        ref = {"0020000E": {"vr": "UI", "Value": [series]}}
        other = {
            "0020000D": {"vr": "UI", "Value": [OTHER_STUDY]},
            "00081115": {"vr": "SQ", "Value": [{"0020000E": {"vr": "UI", "Value": ["9.8.7.6"]}}]},
        }
        row["00081115"] = {"vr": "SQ", "Value": [ref]}
        row["0040A375"] = {"vr": "SQ", "Value": [other]}
    return row


async def _resolve(collector: UidCollector) -> Translation:
    return TRANSLATION


async def _rewrite(chunks: list[bytes], *, study_known: bool = False) -> bytes:
    rewriter = JsonRewriter(_resolve, study_known=study_known)
    out = b"".join([await rewriter.feed(chunk) for chunk in chunks])
    return out + await rewriter.close()


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


_TEXT = st.text(alphabet='{}[],:"\\ \n\tab\u00e9', max_size=12)


@settings(max_examples=150, deadline=None)
@given(
    rows=st.lists(
        st.tuples(st.booleans(), _TEXT, st.booleans()).map(
            lambda t: _row(REAL_STUDY if t[0] else OTHER_STUDY, REAL_SERIES, t[1], t[2])
        ),
        max_size=6,
    ),
    indent=st.booleans(),
    cuts=st.lists(st.integers(min_value=0, max_value=8000), max_size=12),
)
def test_any_chunking_gives_the_same_translation(
    rows: list[dict[str, Any]], indent: bool, cuts: list[int]
) -> None:
    data = orjson.dumps(rows, option=orjson.OPT_INDENT_2 if indent else 0)
    whole = anyio.run(_rewrite, [data])
    assert anyio.run(_rewrite, _chunks(data, cuts)) == whole
    kept = orjson.loads(whole)
    # Rows of the unknown study are gone; the others are public, links included.
    assert len(kept) == sum(r["0020000D"]["Value"] == [REAL_STUDY] for r in rows)
    text = whole.decode()
    assert REAL_STUDY + '"' not in text and "/" + REAL_STUDY not in text
    assert OTHER_STUDY not in text and UPSTREAM not in text
    for row in kept:
        assert row["0020000D"]["Value"] == ["1.4.9.42"]
        assert row["00081190"]["Value"] == [f"{PUBLIC}/studies/1.4.9.42/series/1.4.8.7"]
        assert row["7FE00010"]["BulkDataURI"].startswith(f"{PUBLIC}/studies/1.4.9.42/series/")
        if "0040A375" in row:
            # A reference to an unknown study is emptied, and the series inside it too.
            other = row["0040A375"]["Value"][0]
            assert "Value" not in other["0020000D"]
            assert "Value" not in other["00081115"]["Value"][0]["0020000E"]
            assert row["00081115"]["Value"][0]["0020000E"]["Value"] == ["1.4.8.7"]


async def test_rows_without_a_study_belong_to_the_route() -> None:
    row = {"0020000E": {"vr": "UI", "Value": [REAL_SERIES]}}
    data = orjson.dumps([row])
    assert orjson.loads(await _rewrite([data], study_known=True)) == [
        {"0020000E": {"vr": "UI", "Value": ["1.4.8.7"]}}
    ]
    unknown = {"0020000E": {"vr": "UI", "Value": ["5.5.5"]}}
    assert await _rewrite([orjson.dumps([unknown])], study_known=False) == b"[]"
    # expose_unmapped: an unknown series of a known study stays as it is.
    assert orjson.loads(await _rewrite([orjson.dumps([unknown])], study_known=True)) == [unknown]


async def test_single_object_and_empty_bodies() -> None:
    stow = {"00081190": {"vr": "UR", "Value": [f"{UPSTREAM}/studies/{REAL_STUDY}"]}}
    out = orjson.loads(await _rewrite([orjson.dumps(stow)]))
    assert out == {"00081190": {"vr": "UR", "Value": [f"{PUBLIC}/studies/1.4.9.42"]}}
    assert await _rewrite([b""]) == b""
    assert await _rewrite([b" [ ", b"] "]) == b"[]"


@pytest.mark.parametrize(
    "body",
    [
        b'[{"0020000D": {"vr": "UI"',
        b"[1, 2]",
        b'[{"a": 1}',
        b"[{]",
        b'{"a": ',
        b'[{"a": 1}, 2, {"b": 2}]',
    ],
)
async def test_malformed_or_truncated_is_an_error(body: bytes) -> None:
    with pytest.raises(UpstreamError):
        await _rewrite([body])


async def test_complete_objects_are_parsed_in_one_go(monkeypatch: pytest.MonkeyPatch) -> None:
    """One parse for all the complete objects of a chunk, not two per object (the cost of a
    metadata answer): a chunk cut inside an object costs one more try for the cut one."""
    rows = [_row(REAL_STUDY, REAL_SERIES, f"{{text}} {n}", nested=n % 3 == 0) for n in range(20)]
    data = orjson.dumps(rows, option=orjson.OPT_INDENT_2)
    whole = await _rewrite([data])
    parses: list[int] = []
    loads = orjson.loads

    def counted(value: bytes | bytearray | memoryview | str) -> Any:
        parses.append(len(value))
        return loads(value)

    monkeypatch.setattr(orjson, "loads", counted)
    assert await _rewrite([data]) == whole
    assert len(parses) == 1
    parses.clear()
    cut = data.index(b"{text} 10")
    assert await _rewrite([data[:cut], data[cut:]]) == whole
    assert len(parses) <= 3
    assert len(orjson.loads(whole)) == 20


async def test_large_object_in_small_chunks() -> None:
    row = _row(REAL_STUDY, REAL_SERIES, "y" * 3_000_000)
    data = orjson.dumps([row, row])
    out = await _rewrite(_chunks(data, list(range(0, len(data), 4096))))
    assert [r["0020000D"]["Value"] for r in orjson.loads(out)] == [["1.4.9.42"]] * 2


XML = f"""<?xml version="1.0" encoding="utf-8"?>
<NativeDicomModel xmlns="http://dicom.nema.org/PS3.19/models/NativeDICOM">
  <DicomAttribute tag="0020000D" vr="UI" keyword="StudyInstanceUID">
    <Value number="1">{{study}}</Value>
  </DicomAttribute>
  <DicomAttribute tag="00081115" vr="SQ" keyword="ReferencedSeriesSequence">
    <Item number="1">
      <DicomAttribute tag="0020000E" vr="UI">
        <Value number="1">{REAL_SERIES}</Value>
      </DicomAttribute>
    </Item>
  </DicomAttribute>
  <DicomAttribute tag="7FE00010" vr="OW">
    <BulkData URI="{UPSTREAM}/studies/{{study}}/series/{REAL_SERIES}/instances/1/bulk/7fe00010"/>
  </DicomAttribute>
</NativeDicomModel>"""


async def test_xml_dataset() -> None:
    [out] = await translate_xml(XML.format(study=REAL_STUDY).encode(), _resolve, study_known=False)
    text = out.decode()
    assert REAL_STUDY not in text and REAL_SERIES not in text and UPSTREAM not in text
    assert '<Value number="1">1.4.9.42</Value>' in text
    assert '<Value number="1">1.4.8.7</Value>' in text
    assert f'URI="{PUBLIC}/studies/1.4.9.42/series/1.4.8.7/instances/1/bulk/7fe00010"' in text
    assert text.count("ns0:") == 0
    unknown = XML.format(study=OTHER_STUDY).encode()
    assert await translate_xml(unknown, _resolve, study_known=False) == []
    with pytest.raises(UpstreamError):
        await translate_xml(b"<NativeDicomModel>", _resolve, study_known=False)


async def test_a_study_with_another_name_shows_it_in_patient_fields() -> None:
    """PatientName (a PN object in JSON, PersonName components in XML) and PatientID take the
    name the translation gives the study; a study without one keeps the PACS's."""
    renamed = Translation(
        studies={REAL_STUDY: "1.4.9.42", OTHER_STUDY: "1.4.9.43"},
        series={},
        patients={REAL_STUDY: "Subject^Eleven"},
    )

    async def resolve(collector: UidCollector) -> Translation:
        return renamed

    rows = [
        {
            "00100010": {"vr": "PN", "Value": [{"Alphabetic": "DOE^JANE"}]},
            "00100020": {"vr": "LO", "Value": ["PAT-1"]},
            "0020000D": {"vr": "UI", "Value": [study]},
        }
        for study in (REAL_STUDY, OTHER_STUDY)
    ]
    rewriter = JsonRewriter(resolve, study_known=False)
    body = await rewriter.feed(orjson.dumps(rows)) + await rewriter.close()
    mine, other = orjson.loads(body)
    assert mine["00100010"]["Value"] == [{"Alphabetic": "Subject^Eleven"}]
    assert mine["00100020"]["Value"] == ["Subject^Eleven"]
    assert other["00100010"]["Value"] == [{"Alphabetic": "DOE^JANE"}]
    assert other["00100020"]["Value"] == ["PAT-1"]
    xml = (
        '<NativeDicomModel xmlns="http://dicom.nema.org/PS3.19/models/NativeDICOM">'
        '<DicomAttribute tag="00100010" vr="PN"><PersonName number="1"><Alphabetic>'
        "<FamilyName>DOE</FamilyName><GivenName>JANE</GivenName></Alphabetic></PersonName>"
        "</DicomAttribute>"
        '<DicomAttribute tag="00100020" vr="LO"><Value number="1">PAT-1</Value></DicomAttribute>'
        f'<DicomAttribute tag="0020000D" vr="UI"><Value number="1">{REAL_STUDY}</Value>'
        "</DicomAttribute></NativeDicomModel>"
    ).encode()
    [out] = await translate_xml(xml, resolve, study_known=False)
    assert b"DOE" not in out and b"JANE" not in out and b"PAT-1" not in out
    assert b"<FamilyName>Subject</FamilyName><GivenName>Eleven</GivenName>" in out
    assert b'<Value number="1">Subject^Eleven</Value>' in out


async def test_a_study_row_of_copies_is_one_xml_part_per_examination() -> None:
    """A study-level XML search row of a real study that two examinations hold becomes two
    parts, each with its own public UID and name and the part's headers; a series-level row
    of that study stays one part."""
    copied = Translation(
        studies={REAL_STUDY: "1.4.9.42"},
        series={REAL_SERIES: "1.4.8.7"},
        copies={REAL_STUDY: (("1.4.9.43", "Copy^Subject"),)},
    )

    async def resolve(collector: UidCollector) -> Translation:
        return copied

    study_row = (
        '<NativeDicomModel xmlns="http://dicom.nema.org/PS3.19/models/NativeDICOM">'
        '<DicomAttribute tag="00100010" vr="PN"><PersonName number="1"><Alphabetic>'
        "<FamilyName>DOE</FamilyName></Alphabetic></PersonName></DicomAttribute>"
        f'<DicomAttribute tag="0020000D" vr="UI"><Value number="1">{REAL_STUDY}</Value>'
        "</DicomAttribute></NativeDicomModel>"
    )
    series_row = study_row.replace(
        "</NativeDicomModel>",
        f'<DicomAttribute tag="0020000E" vr="UI"><Value number="1">{REAL_SERIES}</Value>'
        "</DicomAttribute></NativeDicomModel>",
    )

    async def translate(body: bytes) -> list[bytes]:
        return await translate_xml(body, resolve, study_known=False)

    body = b"".join(
        b"--up\r\nContent-Type: application/dicom+xml\r\n\r\n" + row.encode() + b"\r\n"
        for row in (study_row, series_row)
    )
    rewriter = MultipartRewriter(b"up", lambda _: BufferedPart(translate))
    out = await rewriter.feed(body + b"--up--") + await rewriter.close()
    parts = await split_parts(b"up", out)
    assert len(parts) == 3
    assert out.count(b"Content-Type: application/dicom+xml\r\n\r\n") == 3
    first, copy, series = (XmlDataset(ET.fromstring(p)) for p in parts)
    assert first.get(STUDY_INSTANCE_UID) == ["1.4.9.42"]
    assert b"DOE" in parts[0]
    assert copy.get(STUDY_INSTANCE_UID) == ["1.4.9.43"]
    assert b"<FamilyName>Copy</FamilyName><GivenName>Subject</GivenName>" in parts[1]
    assert b"DOE" not in parts[1]
    assert series.get(STUDY_INSTANCE_UID) == ["1.4.9.42"]
    assert series.get(SERIES_INSTANCE_UID) == ["1.4.8.7"]
    assert REAL_STUDY.encode() not in out


# --- a real UID under another attribute ------------------------------------------------------

HIDDEN, UNMAPPED, SOP_CLASS = "7.7.7", "5.5.5", "1.2.840.10008.5.1.4.1.1.4"
OTHERS = replace(TRANSLATION, hidden=frozenset({HIDDEN}), unmapped=frozenset({UNMAPPED}))


def _ui(*values: str) -> dict[str, Any]:
    return {"vr": "UI", "Value": list(values)}


def _sq(*items: dict[str, Any]) -> dict[str, Any]:
    return {"vr": "SQ", "Value": list(items)}


def _other_attributes() -> dict[str, Any]:
    """A dataset whose real study and series UIDs also appear under other UI attributes, at
    the top level and at depths 1 and 2, with a hidden study and an unmapped series."""
    return {
        "00080016": _ui(SOP_CLASS),
        "00080018": _ui("1.2.3.4.5.6"),
        "00081140": _sq({"00081150": _ui(SOP_CLASS), "00081155": _ui(REAL_SERIES)}),
        "0020000D": _ui(REAL_STUDY),
        "0020000E": _ui(REAL_SERIES),
        "00200052": _ui(REAL_STUDY),  # Frame of Reference UID equal to the study's
        "00200200": _ui(REAL_SERIES),  # Synchronization Frame of Reference UID
        "00209161": _ui(HIDDEN),  # Concatenation UID: a study not shown here
        "0040A375": _sq(
            {
                "00081115": _sq({"00209164": _ui(REAL_STUDY)}),
                "00081155": _ui(UNMAPPED),
                "0040A124": _ui("1.2.3.4.5.6", HIDDEN),
            }
        ),
    }


def _expected_values(translation: Translation) -> dict[tuple[str, ...], list[str] | None]:
    """Path of tags → the values the translated dataset shows (None: emptied)."""
    unmapped = [UNMAPPED] if translation.expose_unmapped else None
    return {
        ("00080016",): [SOP_CLASS],
        ("00080018",): ["1.2.3.4.5.6"],
        ("00081140", "00081155"): ["1.4.8.7"],
        ("00081140", "00081150"): [SOP_CLASS],
        ("0020000D",): ["1.4.9.42"],
        ("00200052",): ["1.4.9.42"],
        ("00200200",): ["1.4.8.7"],
        ("00209161",): None,
        ("0040A375", "00081115", "00209164"): ["1.4.9.42"],
        ("0040A375", "00081155"): unmapped,
        ("0040A375", "0040A124"): None,  # one value hidden: the element is emptied
    }


def _json_values(data: dict[str, Any], path: tuple[str, ...]) -> list[str] | None:
    for tag in path[:-1]:
        data = data[tag]["Value"][0]
    values = data[path[-1]].get("Value")
    return None if values is None else list(values)


def _xml_values(view: XmlDataset, path: tuple[str, ...]) -> list[str] | None:
    for tag in path[:-1]:
        view = next(iter(dict(view.sequences())[int(tag, 16)]))  # type: ignore[assignment]
    values = view.get(int(path[-1], 16))
    return values or None


@pytest.mark.parametrize("expose", [True, False])
async def test_real_uids_under_other_attributes_json(expose: bool) -> None:
    translation = replace(OTHERS, expose_unmapped=expose)
    asked: list[UidCollector] = []

    async def resolve(collector: UidCollector) -> Translation:
        asked.append(collector)
        return translation

    rewriter = JsonRewriter(resolve, study_known=False)
    body = await rewriter.feed(orjson.dumps([_other_attributes()])) + await rewriter.close()
    (row,) = orjson.loads(body)
    for path, values in _expected_values(translation).items():
        assert _json_values(row, path) == values, path
    (collector,) = asked
    assert collector.others == {REAL_STUDY, REAL_SERIES, "1.2.3.4.5.6", HIDDEN, UNMAPPED}
    assert (collector.studies, collector.series) == ({REAL_STUDY}, {REAL_SERIES})


@pytest.mark.parametrize("expose", [True, False])
async def test_real_uids_under_other_attributes_xml(expose: bool) -> None:
    translation = replace(OTHERS, expose_unmapped=expose)

    async def resolve(collector: UidCollector) -> Translation:
        assert REAL_STUDY in collector.others and SOP_CLASS not in collector.others
        return translation

    [out] = await translate_xml(to_xml(_other_attributes()), resolve, study_known=False)
    view = XmlDataset(ET.fromstring(out))
    for path, values in _expected_values(translation).items():
        assert _xml_values(view, path) == values, path
    assert f">{REAL_STUDY}<".encode() not in out and f">{HIDDEN}<".encode() not in out


_LINK_SEGMENTS = st.sampled_from(
    [f"/studies/{uid}" for uid in (REAL_STUDY, OTHER_STUDY, "1.4.9.42")]
    + [f"/series/{uid}" for uid in (REAL_SERIES, "9.8.7.6")]
    + ["/instances/1.2.3", "/instances/7.7", "/frames/1,2", "/bulk/7fe00010", "/rendered", "/"]
)


def _link_by_the_rules(url: str, study_known: bool) -> str | None:
    """Every study and series segment public (None if one is unknown), then the base."""
    pieces = re.split(r"/(studies|series)/([0-9.]+)", url)
    out = [pieces[0]]
    for kind, uid, text in zip(pieces[1::3], pieces[2::3], pieces[3::3], strict=True):
        if kind == "studies":
            public = TRANSLATION.studies.get(uid)
        else:
            public = TRANSLATION.series.get(uid) or (uid if study_known else None)
        if public is None:
            return None
        out += [f"/{kind}/{public}", text]
    link = "".join(out)
    return PUBLIC + link[len(UPSTREAM) :] if link.startswith(UPSTREAM) else link


@settings(max_examples=300, deadline=None)
@given(
    links=st.lists(
        st.tuples(
            st.sampled_from([UPSTREAM, "http://elsewhere/dicom-web", ""]),
            st.lists(_LINK_SEGMENTS, max_size=7),
            st.booleans(),
        ),
        min_size=1,
        max_size=8,
    )
)
def test_links_sharing_a_head_translate_as_each_alone(
    links: list[tuple[str, list[str], bool]],
) -> None:
    # One translation (and one collector) for all, as for the instances of one answer: the part
    # before "/instances/" is looked at once, and every link still comes out by the rules.
    translation = replace(TRANSLATION, studies=dict(TRANSLATION.studies))
    collector = UidCollector()
    for base, segments, study_known in links * 2:
        url = base + "".join(segments)
        assert translation.link(url, study_known=study_known) == _link_by_the_rules(
            url, study_known
        )
        collector.add_link(url)
    named = [re.findall(r"/(studies|series)/([0-9.]+)", b + "".join(s)) for b, s, _ in links]
    assert collector.studies == {uid for found in named for kind, uid in found if kind == "studies"}
    assert collector.series == {uid for found in named for kind, uid in found if kind == "series"}
