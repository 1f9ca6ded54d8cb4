"""The translation layer in process, in front of a scripted upstream: what reaches the PACS,
headers, empty searches and a failing map."""

from __future__ import annotations

import gzip
from collections.abc import Collection, Mapping
from typing import Any

import httpx
import orjson
import pytest

from shanoir_dicomweb_proxy import DicomWebProxy, Settings, Upstream
from shanoir_dicomweb_proxy._backends import StaticIdentifierMap
from shanoir_dicomweb_proxy._errors import MappingUnavailable
from shanoir_dicomweb_proxy._identifiers import IdentifierMap, SeriesEntry
from shanoir_dicomweb_proxy._store import ImportRow

from .support.asgi import CORE, call

STUDY, SERIES, OTHER_STUDY = "1.2.840.99.1", "1.2.840.99.1.1", "1.2.840.77.1"
MAPPING = {"backend": "static", "study_root": "1.4.1", "series_root": "1.4.2", "file": "x"}
PUBLIC_STUDY, PUBLIC_SERIES = "1.4.1.42", "1.4.2.7"
ROWS = [ImportRow(42, STUDY, 7, SERIES), ImportRow(43, "1.2.840.99.2")]


def _build(handler: Any, identifiers: IdentifierMap | None = None) -> DicomWebProxy:
    data: dict[str, Any] = {**CORE, "mapping": {**MAPPING}}
    data["upstream"] = {"url": "http://pacs.invalid/dicom-web"}
    settings = Settings.from_dict(data)
    upstream = Upstream(settings.upstream, transport=httpx.MockTransport(handler))
    return DicomWebProxy(
        settings, upstream=upstream, identifiers=identifiers or StaticIdentifierMap(ROWS)
    )


class _Recorder:
    """The upstream: records requests, answers ``status``, ``content`` and ``headers``."""

    def __init__(
        self,
        content: bytes = b"[]",
        headers: dict[str, str] | None = None,
    ) -> None:
        self.requests: list[httpx.Request] = []
        self.content = content
        self.headers = {"content-type": "application/dicom+json", **(headers or {})}

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return httpx.Response(200, stream=httpx.ByteStream(self.content), headers=self.headers)


async def test_upstream_gets_real_uids_in_path_and_query() -> None:
    upstream = _Recorder()
    app = _build(upstream)
    query = f"SeriesInstanceUID={PUBLIC_SERIES}\\1.4.2.999,{SERIES}&Modality=MR".encode()
    answer = await call(app, "GET", f"/dicomweb/studies/{PUBLIC_STUDY}/series".encode(), query)
    assert answer.status == 200
    (sent,) = upstream.requests
    assert sent.url.path == f"/dicom-web/studies/{STUDY}/series"
    # Only the known public value goes on; the unknown and the real one are dropped.
    assert sent.url.query == f"SeriesInstanceUID={SERIES}&Modality=MR".encode()


@pytest.mark.parametrize(
    ("accept", "status", "body"),
    [
        (b"application/dicom+json", 200, b"[]"),
        (b"application/dicom+xml", 204, b""),
    ],
)
async def test_search_that_cannot_match_never_reaches_the_pacs(
    accept: bytes, status: int, body: bytes
) -> None:
    upstream = _Recorder()
    app = _build(upstream)
    answer = await call(
        app,
        "GET",
        b"/dicomweb/studies",
        b"StudyInstanceUID=" + STUDY.encode(),
        [(b"accept", accept)],
    )
    assert (answer.status, answer.body) == (status, body)
    assert upstream.requests == []


async def test_headers_are_translated() -> None:
    location = f"http://pacs.invalid/dicom-web/studies/{STUDY}/series/{SERIES}"
    headers = {
        "content-location": location,
        "warning": f'299 pacs "series {SERIES} of {STUDY}, see {OTHER_STUDY}"',
    }
    app = _build(_Recorder(headers=headers))
    answer = await call(app, "GET", f"/dicomweb/studies/{PUBLIC_STUDY}/series".encode())
    assert answer.headers[b"content-location"] == (
        f"http://proxy.test:8080/dicomweb/studies/{PUBLIC_STUDY}/series/{PUBLIC_SERIES}".encode()
    )
    assert answer.headers[b"warning"] == (
        f'299 pacs "series {PUBLIC_SERIES} of {PUBLIC_STUDY}, see <uid>"'.encode()
    )


async def test_encoded_body_is_refused() -> None:
    upstream = _Recorder(gzip.compress(b"[]"), {"content-encoding": "gzip"})
    answer = await call(_build(upstream), "GET", b"/dicomweb/studies")
    assert answer.status == 502
    assert orjson.loads(answer.body)["status"] == 502


class _Down:
    """A map whose platform is down."""

    async def studies_by_uid(self, uids: Collection[str]) -> Mapping[str, int]:
        raise MappingUnavailable("the platform is down")

    async def studies_by_id(self, exam_ids: Collection[int]) -> Mapping[int, str]:
        raise MappingUnavailable("the platform is down")

    async def series_by_uid(self, uids: Collection[str]) -> Mapping[str, SeriesEntry]:
        raise MappingUnavailable("the platform is down")

    async def series_by_id(self, acquisition_ids: Collection[int]) -> Mapping[int, SeriesEntry]:
        raise MappingUnavailable("the platform is down")


@pytest.mark.parametrize(
    "path", [b"/dicomweb/studies", f"/dicomweb/studies/{PUBLIC_STUDY}/metadata".encode()]
)
async def test_map_down_is_503_never_unmapped(path: bytes) -> None:
    rows = orjson.dumps([{"0020000D": {"vr": "UI", "Value": [STUDY]}}])
    answer = await call(_build(_Recorder(rows), _Down()), "GET", path)
    assert answer.status == 503
    assert answer.headers[b"content-type"] == b"application/problem+json"
    assert STUDY.encode() not in answer.body


class _LaxPacs:
    """A PACS that serves any instance under any study path, and whose index puts instance
    ``2.25.5`` in series ``SERIES`` of ``STUDY`` and ``2.25.6`` in another study."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.url.path == "/dicom-web/instances":
            sop = request.url.params["SOPInstanceUID"]
            study = {"2.25.5": STUDY, "2.25.6": OTHER_STUDY}.get(sop)
            rows = [] if study is None else [_row(study, SERIES, sop)]
            body, media = orjson.dumps(rows), "application/dicom+json"
        else:
            body, media = b"pixels", "image/jpeg"
        return httpx.Response(200, stream=httpx.ByteStream(body), headers={"content-type": media})


def _row(study: str, series: str, sop: str) -> dict[str, Any]:
    return {
        "0020000D": {"vr": "UI", "Value": [study]},
        "0020000E": {"vr": "UI", "Value": [series]},
        "00080018": {"vr": "UI", "Value": [sop]},
    }


async def test_a_foreign_instance_under_a_known_series_is_not_fetched() -> None:
    pacs = _LaxPacs()
    app = _build(pacs)
    base = f"/dicomweb/studies/{PUBLIC_STUDY}/series/{PUBLIC_SERIES}/instances"
    for sop in ("2.25.6", "2.25.404"):  # another study's instance, and none at all
        answer = await call(app, "GET", f"{base}/{sop}/rendered".encode())
        assert answer.status == 404
        assert orjson.loads(answer.body)["detail"] == "no such instance"
    assert all(r.url.path == "/dicom-web/instances" for r in pacs.requests)
    # An instance of the path's series is fetched, and its membership checked only once.
    for _ in range(3):
        answer = await call(app, "GET", f"{base}/2.25.5/rendered".encode())
        assert (answer.status, answer.body) == (200, b"pixels")
    checks = [r for r in pacs.requests if r.url.path == "/dicom-web/instances"]
    assert len(checks) == 3
    assert checks[-1].url.params["SOPInstanceUID"] == "2.25.5"


class _CountingMap(StaticIdentifierMap):
    """The static map, recording what it is asked by UID."""

    def __init__(self, rows: list[ImportRow]) -> None:
        super().__init__(rows)
        self.asked: list[set[str]] = []

    async def studies_by_uid(self, uids: Collection[str]) -> Mapping[str, int]:
        self.asked.append(set(uids))
        return await super().studies_by_uid(uids)

    async def series_by_uid(self, uids: Collection[str]) -> Mapping[str, SeriesEntry]:
        self.asked.append(set(uids))
        return await super().series_by_uid(uids)


async def test_real_uids_under_other_attributes_are_translated_or_emptied() -> None:
    """A UI value that is a real study or series UID shows its public UID; one that this answer
    names as a study the map does not know is emptied; others pass and are asked for once."""

    def ui(*values: str) -> dict[str, Any]:
        return {"vr": "UI", "Value": list(values)}

    known = {
        "00080016": ui("1.2.840.10008.5.1.4.1.1.4"),
        "00080018": ui("2.25.5"),
        "0020000D": ui(STUDY),
        "0020000E": ui(SERIES),
        "00200052": ui(STUDY),
        "00081140": {"vr": "SQ", "Value": [{"00081155": ui(SERIES)}]},
        "00209161": ui(OTHER_STUDY),
        "0040A124": ui("1.2.840.99.2"),  # examination 43's study, named nowhere else
    }
    unknown = {"0020000D": ui(OTHER_STUDY), "00080018": ui("2.25.6")}
    rows = [known, unknown]
    upstream = _Recorder(b"[" + b",".join(orjson.dumps(r) for r in rows) + b"]")
    identifiers = _CountingMap(ROWS)
    app = _build(upstream, identifiers)
    answer = await call(app, "GET", b"/dicomweb/instances", b"includefield=all")
    assert answer.status == 200
    (row,) = orjson.loads(answer.body)
    assert row["00200052"]["Value"] == [PUBLIC_STUDY]
    assert row["00081140"]["Value"][0]["00081155"]["Value"] == [PUBLIC_SERIES]
    assert "Value" not in row["00209161"]
    assert row["0040A124"]["Value"] == ["1.4.1.43"]
    assert row["00080018"]["Value"] == ["2.25.5"]
    assert row["00080016"]["Value"] == ["1.2.840.10008.5.1.4.1.1.4"]
    assert STUDY.encode() not in answer.body and OTHER_STUDY.encode() not in answer.body
    asked = [uid for batch in identifiers.asked for uid in batch]
    assert "2.25.5" not in asked  # an instance's own SOP Instance UID is not looked up
    assert not [uid for uid in asked if uid.startswith("1.2.840.10008.")]
