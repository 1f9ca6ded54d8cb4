"""Identifier translation end to end: a real Orthanc, a synced store, and clients that must
only ever see public UIDs (issue 4's "done when").

The archive is the session's samples plus a SEG whose nested references point at another
series, pydicom's SR test file, and an instance stored deflated.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom.data import get_testdata_file
from pydicom.uid import DeflatedExplicitVRLittleEndian

from shanoir_dicomweb_proxy._store import SqliteStore
from shanoir_dicomweb_proxy.testing import OrthancServer, ProxyServer, SampleSet

from .support.archive import DEFLATED_INSTANCE, SEG_SERIES, SERIES_ROOT, STUDY_ROOT
from .support.dicomweb import DICOM, OCTET, XML, parts
from .support.settings import ProxyFactory

MAPPING = {"backend": "sqlite", "study_root": STUDY_ROOT, "series_root": SERIES_ROOT}
PUBLIC = re.compile(rf"^(?:{re.escape(STUDY_ROOT)}|{re.escape(SERIES_ROOT)})\.[1-9][0-9]*$")


@pytest.fixture(scope="module")
def mapped(archive: OrthancServer, store_path: Path, proxy_factory: ProxyFactory) -> ProxyServer:
    return proxy_factory(archive.dicomweb_url, mapping=MAPPING, store={"path": str(store_path)})


@pytest.fixture(scope="module")
def client(mapped: ProxyServer) -> DICOMwebClient:
    return DICOMwebClient(mapped.dicomweb_url)


def _public(uid: str) -> bool:
    return PUBLIC.match(uid) is not None


def _walk(value: Any) -> Iterator[tuple[str, Any]]:
    """(tag, element) at every depth of DICOM JSON."""
    if isinstance(value, list):
        for item in value:
            yield from _walk(item)
    elif isinstance(value, dict):
        for tag, element in value.items():
            if isinstance(element, dict):
                yield tag, element
                if element.get("vr") == "SQ":
                    yield from _walk(element.get("Value", []))


def _study_uids(rows: list[dict[str, Any]]) -> list[str]:
    return [row["0020000D"]["Value"][0] for row in rows]


# --- searches ----------------------------------------------------------------------------


def test_studies_are_listed_with_public_uids(client: DICOMwebClient, real_uids: set[str]) -> None:
    rows = client.search_for_studies()
    uids = _study_uids(rows)
    assert len(uids) == 14  # 12 small studies (one with the SEG), the SR file, the deflated one
    assert all(_public(uid) for uid in uids), uids
    for row in rows:
        url = row["00081190"]["Value"][0]
        assert url.endswith("/studies/" + row["0020000D"]["Value"][0])


def test_search_by_public_uid_keyword_and_tag(client: DICOMwebClient) -> None:
    first, second = _study_uids(client.search_for_studies(limit=2))
    for key in ("StudyInstanceUID", "0020000D", "0020000d"):
        found = client.search_for_studies(search_filters={key: first})
        assert _study_uids(found) == [first]
    both = client.search_for_studies(search_filters={"StudyInstanceUID": f"{first},{second}"})
    assert sorted(_study_uids(both)) == sorted([first, second])


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("real", id="a real UID passed as public"),
        pytest.param(f"{STUDY_ROOT}.999999", id="unknown public UID"),
        pytest.param(f"{STUDY_ROOT}.007", id="leading zero"),
        pytest.param(f"{SERIES_ROOT}.1", id="a series UID as a study"),
        pytest.param("1.2.*", id="wildcard"),
    ],
)
def test_search_for_what_does_not_exist_is_empty(
    mapped: ProxyServer, samples: SampleSet, value: str
) -> None:
    if value == "real":
        value = samples.small_studies[0].uid
    response = httpx.get(mapped.dicomweb_url + "/studies", params={"StudyInstanceUID": value})
    assert response.status_code == 200
    assert response.json() == []


def test_series_search_by_public_series_uid(client: DICOMwebClient) -> None:
    study = _study_uids(client.search_for_studies(limit=1))[0]
    series = client.search_for_series(study)
    assert series and all(_public(r["0020000E"]["Value"][0]) for r in series)
    one = series[0]["0020000E"]["Value"][0]
    for key in ("SeriesInstanceUID", "0020000E"):
        found = client.search_for_series(search_filters={key: one})
        assert [r["0020000E"]["Value"][0] for r in found] == [one]
        assert found[0]["0020000D"]["Value"][0] == study


def test_every_level_of_search_shows_only_public_uids(
    client: DICOMwebClient, real_uids: set[str]
) -> None:
    for rows in (client.search_for_series(), client.search_for_instances()):
        assert rows
        for tag, element in _walk(rows):
            if tag in ("0020000D", "0020000E"):
                assert all(_public(v) for v in element["Value"]), (tag, element)


# --- paths ---------------------------------------------------------------------------------


def test_real_uids_in_paths_are_not_found(mapped: ProxyServer, samples: SampleSet) -> None:
    study = samples.small_studies[0]
    base = mapped.dicomweb_url
    for path in (
        f"/studies/{study.uid}/metadata",
        f"/studies/{study.uid}/series",
        f"/studies/{STUDY_ROOT}.99999/metadata",
        f"/studies/{STUDY_ROOT}.1/series/{study.series[0].uid}/metadata",
    ):
        response = httpx.get(base + path)
        assert response.status_code == 404, path
        assert study.uid not in response.text
        assert response.headers["content-type"] == "application/problem+json"


def test_series_of_another_study_is_not_found(client: DICOMwebClient, mapped: ProxyServer) -> None:
    first, second = _study_uids(client.search_for_studies(limit=2))
    other_series = client.search_for_series(second)[0]["0020000E"]["Value"][0]
    response = httpx.get(f"{mapped.dicomweb_url}/studies/{first}/series/{other_series}/metadata")
    assert response.status_code == 404


# --- nested references and representations -------------------------------------------------


def _seg_study(client: DICOMwebClient) -> str:
    rows = client.search_for_series(search_filters={"Modality": "SEG"})
    assert len(rows) == 1
    return str(rows[0]["0020000D"]["Value"][0])


def test_metadata_nested_references_are_public(client: DICOMwebClient, real_uids: set[str]) -> None:
    study = _seg_study(client)
    metadata = client.retrieve_study_metadata(study)
    seg = next(m for m in metadata if m["00080060"]["Value"] == ["SEG"])
    series_uids = {m["0020000E"]["Value"][0] for m in metadata}
    referenced = seg["00081115"]["Value"][0]["0020000E"]["Value"][0]
    assert referenced in series_uids and _public(referenced)
    evidence = seg["0040A375"]["Value"][0]
    assert evidence["0020000D"]["Value"] == [study]
    assert evidence["00081115"]["Value"][0]["0020000E"]["Value"] == [referenced]
    assert seg["00081110"]["Value"][0]["00081155"]["Value"] == [study]
    for _, element in _walk(metadata):
        uri = element.get("BulkDataURI")
        if uri:
            assert f"/studies/{study}/series/" in uri


def test_kos_and_sr_references_are_public(client: DICOMwebClient, samples: SampleSet) -> None:
    for sample in (samples.kos, samples.sr):
        rows = client.search_for_instances(search_filters={"SOPInstanceUID": sample.sop_uid})
        assert len(rows) == 1
        study, series = rows[0]["0020000D"]["Value"][0], rows[0]["0020000E"]["Value"][0]
        metadata = client.retrieve_instance_metadata(study, series, sample.sop_uid)
        evidence = metadata["0040A375"]["Value"]
        assert evidence and all(item["0020000D"]["Value"] == [study] for item in evidence)
        for item in evidence:
            for ref in item["00081115"]["Value"]:
                assert _public(ref["0020000E"]["Value"][0])


def test_xml_search_and_metadata_are_public(
    client: DICOMwebClient, mapped: ProxyServer, real_uids: set[str]
) -> None:
    study = _seg_study(client)
    base = mapped.dicomweb_url
    search = httpx.get(f"{base}/studies", headers={"Accept": "application/dicom+xml"})
    metadata = httpx.get(f"{base}/studies/{study}/metadata", headers={"Accept": XML})
    for response in (search, metadata):
        assert response.status_code == 200
        bodies = [body for _, body in parts(response)]
        assert bodies and all(b.startswith(b"<?xml") for b in bodies)
        text = b"".join(bodies).decode()
        assert not [uid for uid in real_uids if uid in text]
        assert study in text
    assert len(parts(search)) == 14


def test_retrieve_part10_with_public_uids(client: DICOMwebClient, samples: SampleSet) -> None:
    study = _seg_study(client)
    instances = client.retrieve_study(study)
    kos_study = samples.small_studies[0]
    assert len(instances) == sum(len(s.instances) for s in kos_study.series) + 1
    for ds in instances:
        assert ds.StudyInstanceUID == study
        assert _public(ds.SeriesInstanceUID)
    seg = next(ds for ds in instances if ds.Modality == "SEG")
    referenced = seg.ReferencedSeriesSequence[0].SeriesInstanceUID
    assert referenced in {ds.SeriesInstanceUID for ds in instances}
    assert seg.CurrentRequestedProcedureEvidenceSequence[0].StudyInstanceUID == study
    assert seg.ReferencedStudySequence[0].ReferencedSOPInstanceUID == study
    mr = next(ds for ds in instances if ds.SOPInstanceUID == kos_study.series[0].instances[0])
    original = pydicom.dcmread(next(p for p in samples.files if p.stem == mr.SOPInstanceUID))
    assert mr.PixelData == original.PixelData


def test_implicit_vr_instances_are_translated(client: DICOMwebClient, samples: SampleSet) -> None:
    study = samples.small_studies[1]
    implicit = study.series[1]
    rows = client.search_for_instances(search_filters={"SOPInstanceUID": implicit.instances[0]})
    public_study, public_series = rows[0]["0020000D"]["Value"][0], rows[0]["0020000E"]["Value"][0]
    ds = client.retrieve_instance(
        public_study,
        public_series,
        implicit.instances[0],
        media_types=(("application/dicom", "*"),),
    )
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2"
    assert (ds.StudyInstanceUID, ds.SeriesInstanceUID) == (public_study, public_series)


def test_deflated_instance_is_retrieved_with_public_uids(
    client: DICOMwebClient, mapped: ProxyServer, real_uids: set[str]
) -> None:
    (row,) = client.search_for_instances(search_filters={"SOPInstanceUID": DEFLATED_INSTANCE})
    study, series = row["0020000D"]["Value"][0], row["0020000E"]["Value"][0]
    original = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for path in (
        f"/studies/{study}",
        f"/studies/{study}/series/{series}/instances/{DEFLATED_INSTANCE}",
    ):
        response = httpx.get(
            mapped.dicomweb_url + path, headers={"Accept": f"{DICOM}; transfer-syntax=*"}
        )
        assert response.status_code == 200, response.text
        ((_, body),) = parts(response)
        ds = pydicom.dcmread(BytesIO(body))
        assert ds.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
        assert (ds.StudyInstanceUID, ds.SeriesInstanceUID) == (study, series)
        assert ds.PixelData == original.PixelData
        meta_end = 144 + int.from_bytes(body[140:144], "little")
        dataset = zlib.decompressobj(-zlib.MAX_WBITS).decompress(body[meta_end:])
        assert study.encode() in dataset and series.encode() in dataset
        assert not [uid for uid in real_uids if uid.encode() in dataset or uid.encode() in body]


def test_real_uids_under_other_attributes_are_public(
    client: DICOMwebClient, mapped: ProxyServer, samples: SampleSet, real_uids: set[str]
) -> None:
    """The SEG's Frame of Reference UID is its study's real UID, and the MR series it refers to
    is also a Dimension Organization UID and a Source Image Sequence's Referenced SOP Instance
    UID: every representation shows the public UIDs there, and no byte names a real one."""
    study = _seg_study(client)
    source = samples.small_studies[0].series[0]
    (row,) = client.search_for_instances(search_filters={"SOPInstanceUID": source.instances[0]})
    series = row["0020000E"]["Value"][0]
    seg_row = client.search_for_series(search_filters={"Modality": "SEG"})[0]
    seg_series = seg_row["0020000E"]["Value"][0]
    pattern = re.compile("|".join(re.escape(u) for u in sorted(real_uids, key=len, reverse=True)))
    base = mapped.dicomweb_url
    json_, xml = {"Accept": "application/dicom+json"}, {"Accept": XML}
    answers: dict[str, httpx.Response] = {}
    with httpx.Client(base_url=base, timeout=60) as http:
        for path, headers in (
            (f"/studies/{study}/metadata", json_),
            (f"/studies/{study}/series/{seg_series}/metadata", xml),
            ("/instances?includefield=all&Modality=SEG", json_),
            (f"/studies/{study}/instances?includefield=all", json_),
            ("/series?includefield=all&Modality=SEG", json_),
            (f"/studies?includefield=all&StudyInstanceUID={study}", json_),
            (f"/studies/{study}", {"Accept": DICOM}),
            (f"/studies/{study}/series/{seg_series}", {"Accept": f"{DICOM}; transfer-syntax=*"}),
        ):
            response = http.get(path, headers=headers)
            assert response.status_code == 200, (path, response.text)
            hit = pattern.search(response.content.decode("latin-1"))
            assert hit is None, (path, hit and hit.group(0))
            answers[path] = response
    (seg,) = [
        m for m in answers[f"/studies/{study}/metadata"].json() if m["00080060"]["Value"] == ["SEG"]
    ]
    assert seg["00200052"]["Value"] == [study]
    assert seg["00209221"]["Value"][0]["00209164"]["Value"] == [series]
    derivation = seg["52009230"]["Value"][0]["00089124"]["Value"][0]
    assert derivation["00082112"]["Value"][1]["00081155"]["Value"] == [series]
    [(_, body)] = parts(answers[f"/studies/{study}/series/{seg_series}/metadata"])
    assert f'<Value number="1">{series}</Value>'.encode() in body
    for ds in client.retrieve_study(study):
        if ds.Modality == "SEG":
            assert ds.FrameOfReferenceUID == study
            assert ds.DimensionOrganizationSequence[0].DimensionOrganizationUID == series
            source_images = ds.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0]
            assert source_images.SourceImageSequence[1].ReferencedSOPInstanceUID == series
            break
    else:
        raise AssertionError("no SEG retrieved")


# --- the leak test -------------------------------------------------------------------------


def _routes(client: DICOMwebClient, mapped: ProxyServer) -> Iterator[tuple[str, dict[str, str]]]:
    """(path with query, headers) for every route the proxy serves, for every study."""
    json_, xml = {"Accept": "application/dicom+json"}, {"Accept": XML}
    yield "/studies", json_
    yield "/studies", {"Accept": "application/dicom+xml"}
    yield "/series", json_
    yield "/instances?limit=1000", json_
    for study_row in client.search_for_studies():
        study = study_row["0020000D"]["Value"][0]
        s = f"/studies/{study}"
        yield s + "/series", json_
        yield s + "/instances", json_
        yield s + "/metadata", json_
        yield s + "/metadata", xml
        yield s, {"Accept": DICOM}
        for series_row in client.search_for_series(study):
            series = series_row["0020000E"]["Value"][0]
            e = f"{s}/series/{series}"
            yield e + "/instances", json_
            yield e + "/metadata", json_
            yield e + "/metadata", xml
            yield e, {"Accept": DICOM}
            yield e + "/rendered", {"Accept": "image/jpeg"}
            for instance_row in client.search_for_instances(study, series):
                sop = instance_row["00080018"]["Value"][0]
                i = f"{e}/instances/{sop}"
                yield i, {"Accept": DICOM}
                yield i + "/metadata", json_
                yield i + "/metadata", xml
                if "00280008" in instance_row or "00280010" in instance_row:
                    yield i + "/frames/1", {"Accept": OCTET}
                    yield i + "/rendered", {"Accept": "image/png"}
                yield i + "/bulk/7fe00010", {"Accept": "application/octet-stream"}


def test_no_real_uid_in_any_byte_of_any_response(
    client: DICOMwebClient, mapped: ProxyServer, real_uids: set[str]
) -> None:
    pattern = re.compile("|".join(re.escape(u) for u in sorted(real_uids, key=len, reverse=True)))
    pattern_bytes = re.compile(pattern.pattern.encode())
    statuses: dict[int, int] = {}
    with httpx.Client(base_url=mapped.dicomweb_url, timeout=60) as http:
        for path, headers in _routes(client, mapped):
            response = http.get(path, headers=headers)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            head = "\n".join(f"{k}: {v}" for k, v in response.headers.items())
            assert not pattern.search(head), (path, head)
            hit = pattern_bytes.search(response.content)
            assert hit is None, (path, headers, hit and hit.group(0))
    assert statuses.get(200, 0) > 300, statuses  # the scan really read answers


# --- series the map does not know --------------------------------------------------------


@pytest.fixture(scope="module")
def partial_store(tmp_path_factory: pytest.TempPathFactory, store_path: Path) -> Path:
    """The synced store without the SEG's series."""
    path = tmp_path_factory.mktemp("partial") / "store.sqlite3"
    with SqliteStore(store_path) as full, SqliteStore(path) as partial:
        for entry in full.entries():
            series = [a.series_uid for a in entry.acquisitions if a.series_uid != SEG_SERIES]
            partial.register(entry.study_uid, series)
    return path


def _partial_proxy(
    factory: ProxyFactory, archive: OrthancServer, store: Path, unmapped: str
) -> ProxyServer:
    mapping = {**MAPPING, "unmapped_series": unmapped}
    return factory(archive.dicomweb_url, mapping=mapping, store={"path": str(store)})


def test_unmapped_series_exposed(
    proxy_factory: ProxyFactory, archive: OrthancServer, partial_store: Path
) -> None:
    proxy = _partial_proxy(proxy_factory, archive, partial_store, "expose")
    client = DICOMwebClient(proxy.dicomweb_url)
    study = _seg_study(client)
    series = [r["0020000E"]["Value"][0] for r in client.search_for_series(study)]
    assert SEG_SERIES in series
    assert all(_public(uid) for uid in series if uid != SEG_SERIES)
    (seg,) = client.retrieve_series(study, SEG_SERIES)
    assert (seg.StudyInstanceUID, seg.SeriesInstanceUID) == (study, SEG_SERIES)
    assert _public(seg.ReferencedSeriesSequence[0].SeriesInstanceUID)
    # A real UID of a mapped series is no way in, even with "expose".
    with SqliteStore(partial_store) as store:
        real = next(a.series_uid for e in store.entries() for a in e.acquisitions)
    response = httpx.get(f"{proxy.dicomweb_url}/studies/{study}/series/{real}/metadata")
    assert response.status_code == 404
    # Nor is the unmapped series under another study's path: the upstream is asked where it is.
    other = next(
        uid for row in client.search_for_studies() if (uid := row["0020000D"]["Value"][0]) != study
    )
    for suffix in ("/metadata", "", "/instances", "/rendered"):
        response = httpx.get(f"{proxy.dicomweb_url}/studies/{other}/series/{SEG_SERIES}{suffix}")
        assert response.status_code == 404, suffix
        assert response.json()["detail"] == "no such series"


def test_unmapped_series_hidden(
    proxy_factory: ProxyFactory, archive: OrthancServer, partial_store: Path
) -> None:
    proxy = _partial_proxy(proxy_factory, archive, partial_store, "hide")
    client = DICOMwebClient(proxy.dicomweb_url)
    rows = client.search_for_studies(search_filters={"ModalitiesInStudy": "SEG"})
    study = rows[0]["0020000D"]["Value"][0]
    series = [r["0020000E"]["Value"][0] for r in client.search_for_series(study)]
    assert SEG_SERIES not in series and all(_public(uid) for uid in series)
    assert not client.search_for_series(search_filters={"Modality": "SEG"})
    metadata = client.retrieve_study_metadata(study)
    assert metadata and all(m["00080060"]["Value"] != ["SEG"] for m in metadata)
    instances = client.retrieve_study(study)
    assert len(instances) == len(metadata)
    assert all(ds.Modality != "SEG" for ds in instances)
    response = httpx.get(f"{proxy.dicomweb_url}/studies/{study}/series/{SEG_SERIES}/metadata")
    assert response.status_code == 404
