"""The identifier map backends: static file, http contract (against a real loopback server),
and build_identifier_map for each [mapping] backend."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from shanoir_dicomweb_proxy._backends import (
    CachingIdentifierMap,
    HttpIdentifierMap,
    ManagedIdentifierMap,
    SqliteIdentifierMap,
    StaticIdentifierMap,
    build_identifier_map,
)
from shanoir_dicomweb_proxy._config import MappingSettings, Settings
from shanoir_dicomweb_proxy._errors import ConfigError, MappingUnavailable, ProxyError
from shanoir_dicomweb_proxy._identifiers import SeriesEntry
from shanoir_dicomweb_proxy._store import SqliteStore, StoreError
from shanoir_dicomweb_proxy.testing import free_port

from .support.loopback_http import FakePlatform, LoopbackServer, serving

STUDY_42 = "1.2.840.113619.2.1.42"
STUDY_43 = "1.2.840.113619.2.1.43"
SERIES_7 = "1.2.840.113619.2.1.42.7"
SERIES_8 = "1.2.840.113619.2.1.42.8"
SERIES_9 = "1.2.840.113619.2.1.43.9"
UNKNOWN = "1.2.840.113619.2.1.99"
ROOTS: dict[str, Any] = {"study_root": "1.4.9.12.34.1.8527", "series_root": "1.4.9.12.34.2.8527"}

ENTRY_7 = SeriesEntry(7, 42, SERIES_7)
ENTRY_8 = SeriesEntry(8, 42, SERIES_8)
ENTRY_9 = SeriesEntry(9, 43, SERIES_9)

MAPPING_TOML = f"""\
[[examinations]]
id = 42
study_uid = "{STUDY_42}"
acquisitions = [
  {{ id = 7, series_uid = "{SERIES_7}" }},
  {{ id = 8, series_uid = "{SERIES_8}" }},
]

[[examinations]]
id = 43
study_uid = "{STUDY_43}"

[[examinations.acquisitions]]
id = 9
series_uid = "{SERIES_9}"

[[examinations]]
id = 44
study_uid = "1.2.840.113619.2.1.44"
"""

MAPPING_DATA: dict[str, Any] = {
    "examinations": [
        {
            "id": 42,
            "study_uid": STUDY_42,
            "acquisitions": [{"id": 7, "series_uid": SERIES_7}, {"id": 8, "series_uid": SERIES_8}],
        },
        {"id": 43, "study_uid": STUDY_43, "acquisitions": [{"id": 9, "series_uid": SERIES_9}]},
        {"id": 44, "study_uid": "1.2.840.113619.2.1.44"},
    ]
}


def settings(tmp_path: Path, **mapping: Any) -> Settings:
    return Settings.from_dict(
        {
            "upstream": {"url": "http://127.0.0.1:8042/dicom-web"},
            "auth": {"enabled": False},
            "mapping": {**ROOTS, **mapping},
            "store": {"path": str(tmp_path / "store.sqlite3")},
        }
    )


async def check_full_map(identifiers: Any) -> None:
    """The map of MAPPING_TOML / MAPPING_DATA, asked in both directions and in batches."""
    assert await identifiers.studies_by_uid([STUDY_42, STUDY_43, UNKNOWN]) == {
        STUDY_42: 42,
        STUDY_43: 43,
    }
    assert await identifiers.studies_by_id([42, 44, 45]) == {
        42: STUDY_42,
        44: "1.2.840.113619.2.1.44",
    }
    assert await identifiers.series_by_uid([SERIES_9, SERIES_7, UNKNOWN]) == {
        SERIES_9: ENTRY_9,
        SERIES_7: ENTRY_7,
    }
    assert await identifiers.series_by_id([8, 9, 10]) == {8: ENTRY_8, 9: ENTRY_9}
    assert await identifiers.studies_by_uid([]) == {}
    assert await identifiers.series_by_id([42]) == {}  # an examination ID is no acquisition


# --- static: formats -------------------------------------------------------------------------


async def test_static_from_toml(tmp_path: Path) -> None:
    path = tmp_path / "mapping.toml"
    path.write_text(MAPPING_TOML)
    identifiers = StaticIdentifierMap.from_file(path)
    await check_full_map(identifiers)
    assert (
        repr(identifiers) == f"StaticIdentifierMap({str(path)!r}, 3 examinations, 3 acquisitions)"
    )


async def test_static_from_json_object(tmp_path: Path) -> None:
    path = tmp_path / "mapping.json"
    path.write_text(json.dumps(MAPPING_DATA, indent=2), encoding="utf-8-sig")  # with a BOM
    await check_full_map(StaticIdentifierMap.from_file(path))


async def test_static_reads_store_list_json(tmp_path: Path) -> None:
    # The nested shape store list --json writes (and store import reads).
    items = [
        {
            "exam_id": e["id"],
            "study_uid": e["study_uid"],
            "public_study_uid": None,
            "acquisitions": [
                {"acquisition_id": a["id"], "series_uid": a["series_uid"]}
                for a in e.get("acquisitions", [])
            ],
        }
        for e in MAPPING_DATA["examinations"]
    ]
    path = tmp_path / "export.json"
    path.write_text(json.dumps(items))
    await check_full_map(StaticIdentifierMap.from_file(path))


async def test_static_reads_store_import_csv(tmp_path: Path) -> None:
    path = tmp_path / "export.csv"
    path.write_text(
        "exam_id,study_uid,acquisition_id,series_uid\n"
        f"42,{STUDY_42},7,{SERIES_7}\n"
        f"42,{STUDY_42},8,{SERIES_8}\n"
        f"43,{STUDY_43},9,{SERIES_9}\n"
        "44,1.2.840.113619.2.1.44,,\n"
    )
    await check_full_map(StaticIdentifierMap.from_file(path))


async def test_static_empty_list(tmp_path: Path) -> None:
    path = tmp_path / "empty.toml"
    path.write_text("examinations = []\n")
    assert await StaticIdentifierMap.from_file(path).studies_by_uid([STUDY_42]) == {}


# --- static: errors --------------------------------------------------------------------------


def exam(id: Any = 42, uid: Any = STUDY_42, *acquisitions: dict[str, Any]) -> dict[str, Any]:
    return {"id": id, "study_uid": uid, "acquisitions": list(acquisitions)}


def acq(id: Any, uid: Any) -> dict[str, Any]:
    return {"id": id, "series_uid": uid}


LONG_UID = "1." + "2" * 63


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            {"examinations": [exam(), exam(42, STUDY_43)]},
            f"item 2: examination 42 is already study {STUDY_42} (item 1); "
            f"this entry says study {STUDY_43}",
        ),
        (
            {"examinations": [exam(), exam()]},
            "item 2: examination 42 is listed twice (also item 1)",
        ),
        (
            {"examinations": [exam(), exam(43, STUDY_42)]},
            f"item 2: study {STUDY_42} is already examination 42 (item 1); "
            "this entry says examination 43",
        ),
        (
            {
                "examinations": [
                    exam(42, STUDY_42, acq(7, SERIES_7)),
                    exam(43, STUDY_43, acq(7, SERIES_9)),
                ]
            },
            "item 2, acquisition 1: acquisition 7 is listed twice (also item 1, acquisition 1)",
        ),
        (
            {"examinations": [exam(42, STUDY_42, acq(7, SERIES_7), acq(8, SERIES_7))]},
            f"item 1, acquisition 2: series {SERIES_7} is already acquisition 7 "
            "(item 1, acquisition 1); this entry says acquisition 8",
        ),
        (
            {"examinations": [exam(42, "1.2.abc")]},
            "item 1: study_uid: expected a UID (digits and dots, at most 64 characters), "
            "got '1.2.abc'",
        ),
        (
            {"examinations": [exam(42, STUDY_42, acq(7, LONG_UID))]},
            "item 1, acquisition 1: series_uid: expected a UID (digits and dots, at most 64 "
            "characters)",
        ),
        (
            {"examinations": [exam(42, "1..2")]},
            "item 1: study_uid: expected a UID",
        ),
        ({"examinations": [exam(0)]}, "item 1: id: expected a positive integer, got 0"),
        ({"examinations": [exam(-3)]}, "item 1: id: expected a positive integer, got -3"),
        ({"examinations": [exam("42")]}, "item 1: id: expected a positive integer, got '42'"),
        ({"examinations": [exam(True)]}, "item 1: id: expected a positive integer, got True"),
        (
            {"examinations": [exam(42, STUDY_42, acq(0, SERIES_7))]},
            "item 1, acquisition 1: id: expected a positive integer, got 0",
        ),
        (
            {"examinations": [exam(42, STUDY_42, {"series_uid": SERIES_7})]},
            "item 1, acquisition 1: id: expected a positive integer, got None",
        ),
        (
            {"examinations": [{"id": 42}]},
            "item 1: study_uid: expected a UID",
        ),
        (
            {"examinations": [{**exam(), "exam_id": 42}]},
            "item 1: unknown key 'exam_id' (expected acquisitions, id, study_uid)",
        ),
        (
            {"examinations": [exam(42, STUDY_42, {"id": 7, "series_uid": SERIES_7, "x": 1})]},
            "item 1, acquisition 1: unknown key 'x' (expected id, series_uid)",
        ),
        (
            {"examinations": [{"id": 42, "study_uid": STUDY_42, "acquisitions": {}}]},
            "item 1: acquisitions: expected an array",
        ),
        ({"examinations": ["42"]}, "item 1: expected an examination (id, study_uid, acquisitions)"),
        ({"studies": []}, "top level: unknown key 'studies' (expected examinations)"),
        ({}, "examinations: expected an array of examinations"),
    ],
)
def test_static_file_errors(tmp_path: Path, data: dict[str, Any], expected: str) -> None:
    path = tmp_path / "mapping.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError) as info:
        StaticIdentifierMap.from_file(path)
    assert str(info.value).startswith(f"{path}: {expected}")


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("m.toml", "[[examinations]\n", "invalid TOML: "),
        (
            "m.toml",
            "[[examinations]]\nid = 42\nstudy_uid = 1.5\n",
            "item 1: study_uid: expected a UID",
        ),
        ("m.json", '{"examinations": [}', "line 1 column 19: Expecting value"),
        ("m.json", '[{"id": 42, "study_uid": "1.2"}]', "item 1 (line 1): unknown key 'id'"),
        (
            "m.csv",
            f"exam_id,study_uid,acquisition_id,series_uid\n42,{STUDY_42},,\n42,{STUDY_42},,\n",
            "line 3: examination 42 is listed twice (also line 2)",
        ),
        ("m.csv", "exam,uid\n", "line 1: expected the header exam_id,study_uid,"),
    ],
)
def test_static_syntax_errors(tmp_path: Path, name: str, text: str, expected: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        StaticIdentifierMap.from_file(path)
    assert str(info.value).startswith(f"{path}: {expected}")


def test_static_unreadable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing\.toml: cannot read: No such file"):
        StaticIdentifierMap.from_file(tmp_path / "missing.toml")
    (tmp_path / "latin1.json").write_bytes(b'{"examinations": ["\xe9"]}')
    with pytest.raises(ConfigError, match=r"latin1\.json: not UTF-8 text \(byte 19\)"):
        StaticIdentifierMap.from_file(tmp_path / "latin1.json")


# --- http: a platform implementing the contract ----------------------------------------------


@dataclass
class Platform(FakePlatform):
    """What the loopback platform knows, how it misbehaves, and what it was asked."""

    paths = frozenset({"/api/studies/lookup", "/api/series/lookup"})

    studies: dict[int, str] = field(default_factory=lambda: {42: STUDY_42, 43: STUDY_43})
    series: dict[int, SeriesEntry] = field(
        default_factory=lambda: {7: ENTRY_7, 8: ENTRY_8, 9: ENTRY_9}
    )
    extra: list[dict[str, Any]] = field(default_factory=list)  # added to every answer

    def answer(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        if path == "/api/studies/lookup":
            if "uids" in body:
                exams = {uid: exam_id for exam_id, uid in self.studies.items()}
                found = [(exams[u], u) for u in body["uids"] if u in exams]
            else:
                found = [(i, self.studies[i]) for i in body["ids"] if i in self.studies]
            return {"studies": [{"id": i, "study_uid": u} for i, u in found] + self.extra}
        if "uids" in body:
            series = {e.series_uid: e for e in self.series.values()}
            entries = [series[u] for u in body["uids"] if u in series]
        else:
            entries = [self.series[i] for i in body["ids"] if i in self.series]
        rows = [
            {"id": e.acquisition_id, "exam_id": e.exam_id, "series_uid": e.series_uid}
            for e in entries
        ]
        return {"series": rows + self.extra}


@pytest.fixture
def platform() -> Platform:
    return Platform()


@pytest.fixture
def server(platform: Platform) -> Iterator[LoopbackServer]:
    with serving(platform) as server:
        yield server


@pytest.fixture
async def http_map(server: LoopbackServer) -> AsyncIterator[HttpIdentifierMap]:
    identifiers = HttpIdentifierMap(server.url, timeout=httpx.Timeout(2.0))
    yield identifiers
    await identifiers.aclose()


async def test_http_lookups(http_map: HttpIdentifierMap, platform: Platform) -> None:
    platform.studies[44] = "1.2.840.113619.2.1.44"
    await check_full_map(http_map)
    paths = [(path, sorted(body)) for path, body, _ in platform.requests]
    assert paths == [
        ("/api/studies/lookup", ["uids"]),
        ("/api/studies/lookup", ["ids"]),
        ("/api/series/lookup", ["uids"]),
        ("/api/series/lookup", ["ids"]),
        ("/api/series/lookup", ["ids"]),  # the empty batch asked nothing
    ]
    assert platform.requests[1][1] == {"ids": [42, 44, 45]}
    headers = platform.requests[0][2]
    assert headers["content-type"] == "application/json"
    assert headers["accept"] == "application/json"
    assert "authorization" not in headers


async def test_http_chunks_large_batches(http_map: HttpIdentifierMap, platform: Platform) -> None:
    uids = [f"1.2.3.{n}" for n in range(2498)] + [STUDY_43, STUDY_42]
    assert await http_map.studies_by_uid(uids) == {STUDY_42: 42, STUDY_43: 43}
    sizes = [len(body["uids"]) for _, body, _ in platform.requests]
    assert sizes == [1000, 1000, 500]
    assert [u for _, body, _ in platform.requests for u in body["uids"]] == uids
    platform.requests.clear()
    assert await http_map.series_by_id(list(range(1, 2501))) == {7: ENTRY_7, 8: ENTRY_8, 9: ENTRY_9}
    assert [len(body["ids"]) for _, body, _ in platform.requests] == [1000, 1000, 500]


async def test_http_skips_keys_no_answer_can_hold(
    http_map: HttpIdentifierMap, platform: Platform
) -> None:
    assert await http_map.studies_by_uid(["not a uid", "1.2.x", "1." + "2" * 63, ""]) == {}
    assert await http_map.series_by_id([0, -1, 2**63]) == {}
    assert platform.requests == []
    assert await http_map.studies_by_uid([STUDY_42, "bad", STUDY_42]) == {STUDY_42: 42}
    assert platform.requests[0][1] == {"uids": [STUDY_42]}  # once, and only the valid one


async def test_http_ignores_answers_it_did_not_ask_for(
    http_map: HttpIdentifierMap, platform: Platform
) -> None:
    platform.extra = [{"id": 99, "study_uid": UNKNOWN}]
    assert await http_map.studies_by_uid([STUDY_42]) == {STUDY_42: 42}
    assert await http_map.studies_by_id([43]) == {43: STUDY_43}


async def test_http_sends_the_bearer_token(server: LoopbackServer, platform: Platform) -> None:
    identifiers = HttpIdentifierMap(server.url, token="s3cr3t-T0ken")
    try:
        assert await identifiers.series_by_uid([SERIES_8]) == {SERIES_8: ENTRY_8}
    finally:
        await identifiers.aclose()
    assert platform.requests[0][2]["authorization"] == "Bearer s3cr3t-T0ken"


async def test_http_client_is_lazy_and_closed(server: LoopbackServer) -> None:
    identifiers = HttpIdentifierMap(server.url + "/")
    assert identifiers._client is None
    assert await identifiers.studies_by_id([42]) == {42: STUDY_42}
    client = identifiers._client
    assert client is not None and client.is_closed is False
    await identifiers.aclose()
    assert client.is_closed and identifiers._client is None
    await identifiers.aclose()  # idempotent


async def expect_unavailable(
    identifiers: HttpIdentifierMap, caplog: pytest.LogCaptureFixture, logged: str
) -> None:
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="shanoir_dicomweb_proxy.mapping"):
        with pytest.raises(MappingUnavailable) as info:
            await identifiers.studies_by_uid([STUDY_42, STUDY_43])
    error = info.value
    assert isinstance(error, ProxyError)
    assert (error.status, error.code) == (503, "mapping_unavailable")
    assert error.detail == "the identifier mapping cannot be reached"
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert logged in caplog.text
    for text in (error.detail, caplog.text):
        assert STUDY_42 not in text and STUDY_43 not in text and UNKNOWN not in text


@pytest.mark.parametrize("status", [500, 502, 503, 404, 401, 403, 302, 204])
async def test_http_error_status(
    http_map: HttpIdentifierMap,
    platform: Platform,
    caplog: pytest.LogCaptureFixture,
    status: int,
) -> None:
    platform.status = status
    hint = " (check [mapping] token)" if status in (401, 403) else ""
    await expect_unavailable(http_map, caplog, f"/api/studies/lookup: answered {status}{hint}")


async def test_http_timeout(
    server: LoopbackServer, platform: Platform, caplog: pytest.LogCaptureFixture
) -> None:
    platform.delay = 1.0
    identifiers = HttpIdentifierMap(server.url, timeout=httpx.Timeout(0.2))
    started = time.monotonic()
    try:
        await expect_unavailable(identifiers, caplog, "/api/studies/lookup: no answer in time")
    finally:
        await identifiers.aclose()
    assert time.monotonic() - started < 0.9


async def test_http_unreachable(caplog: pytest.LogCaptureFixture) -> None:
    identifiers = HttpIdentifierMap(f"http://127.0.0.1:{free_port()}/api")
    try:
        await expect_unavailable(identifiers, caplog, "/api/studies/lookup: ConnectError: ")
    finally:
        await identifiers.aclose()


@pytest.mark.parametrize(
    ("raw", "logged"),
    [
        (b"<html>oops</html>", "malformed answer: not JSON"),
        (b"", "malformed answer: not JSON"),
        (b"[]", "malformed answer: expected an object with a 'studies' array"),
        (b'{"series": []}', "malformed answer: expected an object with a 'studies' array"),
        (b'{"studies": {}}', "malformed answer: expected an object with a 'studies' array"),
        (b'{"studies": [42]}', "malformed answer: studies[0]: expected an object"),
    ],
)
async def test_http_garbage(
    http_map: HttpIdentifierMap,
    platform: Platform,
    caplog: pytest.LogCaptureFixture,
    raw: bytes,
    logged: str,
) -> None:
    platform.raw = raw
    await expect_unavailable(http_map, caplog, logged)


@pytest.mark.parametrize(
    ("entry", "logged"),
    [
        ({"id": "43", "study_uid": STUDY_43}, "studies[1].id: expected a positive integer"),
        ({"id": 0, "study_uid": STUDY_43}, "studies[1].id: expected a positive integer"),
        ({"id": -43, "study_uid": STUDY_43}, "studies[1].id: expected a positive integer"),
        ({"id": 43.0, "study_uid": STUDY_43}, "studies[1].id: expected a positive integer"),
        ({"id": True, "study_uid": STUDY_43}, "studies[1].id: expected a positive integer"),
        ({"id": 2**63, "study_uid": STUDY_43}, "studies[1].id: expected a positive integer"),
        ({"study_uid": STUDY_43}, "studies[1].id: expected a positive integer"),
        ({"id": 43, "study_uid": STUDY_43 + ".x"}, "studies[1].study_uid: expected a UID"),
        ({"id": 43, "study_uid": "1." + "2" * 63}, "studies[1].study_uid: expected a UID"),
        ({"id": 43, "study_uid": 1.2}, "studies[1].study_uid: expected a UID"),
        ({"id": 43}, "studies[1].study_uid: expected a UID"),
        ({"id": 42, "study_uid": STUDY_43}, "studies: the same ID or UID twice"),
        ({"id": 43, "study_uid": STUDY_42}, "studies: the same ID or UID twice"),
    ],
)
async def test_http_malformed_entries(
    http_map: HttpIdentifierMap,
    platform: Platform,
    caplog: pytest.LogCaptureFixture,
    entry: dict[str, Any],
    logged: str,
) -> None:
    platform.studies = {42: STUDY_42}
    platform.extra = [entry]
    await expect_unavailable(http_map, caplog, f"malformed answer: {logged}")


@pytest.mark.parametrize(
    "entry",
    [
        {"id": 9, "exam_id": 0, "series_uid": SERIES_9},
        {"id": 9, "exam_id": "43", "series_uid": SERIES_9},
        {"id": 9, "series_uid": SERIES_9},
        {"id": None, "exam_id": 43, "series_uid": SERIES_9},
        {"id": 9, "exam_id": 43, "series_uid": "1.2.3-4"},
        {"id": 7, "exam_id": 43, "series_uid": SERIES_9},  # acquisition 7 twice
    ],
)
async def test_http_malformed_series(
    http_map: HttpIdentifierMap, platform: Platform, entry: dict[str, Any]
) -> None:
    platform.extra = [entry]
    with pytest.raises(MappingUnavailable):
        await http_map.series_by_id([7])
    platform.extra = []
    assert await http_map.series_by_id([7]) == {7: ENTRY_7}  # the platform recovered


def test_http_batch_size_bounds() -> None:
    with pytest.raises(ValueError, match="batch_size must be between 1 and 1000"):
        HttpIdentifierMap("http://127.0.0.1:1", batch_size=1001)


# --- build_identifier_map --------------------------------------------------------------------


def test_build_identity(tmp_path: Path) -> None:
    assert build_identifier_map(settings(tmp_path, backend="identity")) is None
    assert not (tmp_path / "store.sqlite3").exists()


async def test_build_sqlite_opens_and_closes_the_store(tmp_path: Path) -> None:
    with SqliteStore(tmp_path / "store.sqlite3") as store:
        exam_id = store.register_study(STUDY_42)
        acquisition_id = store.register_series(exam_id, SERIES_7)
    identifiers = build_identifier_map(settings(tmp_path, backend="sqlite"))
    assert isinstance(identifiers, ManagedIdentifierMap)
    assert isinstance(identifiers, CachingIdentifierMap)
    assert (identifiers.ttl, identifiers.maxsize, identifiers.negative_ttl) == (60, 100_000, 5)
    inner = identifiers.inner
    assert isinstance(inner, SqliteIdentifierMap)
    async with identifiers:
        assert await identifiers.studies_by_uid([STUDY_42, UNKNOWN]) == {STUDY_42: exam_id}
        assert await identifiers.series_by_id([acquisition_id]) == {
            acquisition_id: SeriesEntry(acquisition_id, exam_id, SERIES_7)
        }
    with pytest.raises(StoreError, match="the store is closed"):
        inner.store.lookup_studies_by_id([exam_id])


async def test_build_sqlite_with_the_callers_store(tmp_path: Path) -> None:
    with SqliteStore(tmp_path / "other.sqlite3") as store:
        exam_id = store.register_study(STUDY_43)
        identifiers = build_identifier_map(settings(tmp_path, cache_ttl=5), store=store)
        assert identifiers is not None and identifiers.ttl == 5
        assert await identifiers.studies_by_id([exam_id]) == {exam_id: STUDY_43}
        await identifiers.aclose()
        assert store.lookup_studies_by_id([exam_id]) == {exam_id: STUDY_43}  # still open
    assert not (tmp_path / "store.sqlite3").exists()


def test_build_sqlite_unusable_store(tmp_path: Path) -> None:
    (tmp_path / "store.sqlite3").write_text("not a database, but long enough to be read " * 40)
    with pytest.raises(ConfigError, match=r"^\[store\] path: .*store\.sqlite3: "):
        build_identifier_map(settings(tmp_path))


async def test_build_static(tmp_path: Path) -> None:
    (tmp_path / "mapping.toml").write_text(MAPPING_TOML)
    toml = tmp_path / "proxy.toml"
    toml.write_text(
        '[upstream]\nurl = "http://127.0.0.1:8042/dicom-web"\n[auth]\nenabled = false\n'
        '[mapping]\nbackend = "static"\nfile = "mapping.toml"\n'
        'study_root = "1.4.9.12.34.1.8527"\nseries_root = "1.4.9.12.34.2.8527"\n'
    )
    identifiers = build_identifier_map(Settings.from_toml(toml))  # file relative to proxy.toml
    assert identifiers is not None and isinstance(identifiers.inner, StaticIdentifierMap)
    async with identifiers:
        await check_full_map(identifiers)


def test_build_static_bad_file(tmp_path: Path) -> None:
    path = tmp_path / "mapping.toml"
    path.write_text("[[examinations]]\nid = 0\n")
    with pytest.raises(ConfigError) as info:
        build_identifier_map(settings(tmp_path, backend="static", file=str(path)))
    assert str(info.value) == (
        f"[mapping] file: {path}: item 1: id: expected a positive integer, got 0"
    )


async def test_build_http_caches(
    tmp_path: Path, server: LoopbackServer, platform: Platform
) -> None:
    config = settings(tmp_path, backend="http", url=server.url, token="abc", cache_ttl=30)
    identifiers = build_identifier_map(config)
    assert identifiers is not None and identifiers.ttl == 30
    inner = identifiers.inner
    assert isinstance(inner, HttpIdentifierMap)
    async with identifiers:
        for _ in range(3):
            assert await identifiers.studies_by_uid([STUDY_42, UNKNOWN]) == {STUDY_42: 42}
        assert await identifiers.studies_by_id([42]) == {42: STUDY_42}  # mirrored: no request
        assert len(platform.requests) == 1
        assert platform.requests[0][2]["authorization"] == "Bearer abc"
        client = inner._client
        assert client is not None
    assert client.is_closed


# --- [mapping] token and cache_ttl -----------------------------------------------------------


def test_mapping_token_and_cache_ttl_defaults() -> None:
    mapping = MappingSettings(**ROOTS)
    assert (mapping.token, mapping.cache_ttl) == ("", 60.0)
    http = MappingSettings(backend="http", url="https://shanoir/api/", token="t0k.e_n", **ROOTS)
    assert http.token == "t0k.e_n" and http.url == "https://shanoir/api"
    assert "t0k.e_n" not in repr(http) and "token='***'" in repr(http)
    assert http.to_dict()["token"] == "***"
    assert MappingSettings(cache_ttl=0, **ROOTS).cache_ttl == 0.0


@pytest.mark.parametrize(
    ("mapping", "expected"),
    [
        (
            {"token": "abc"},
            '[mapping] token: only used with backend = "http" (backend is "sqlite")',
        ),
        (
            {"backend": "identity", "token": "abc"},
            '[mapping] token: only used with backend = "http" (backend is "identity")',
        ),
        (
            {"backend": "http", "url": "https://shanoir/api", "token": "a b"},
            "[mapping] token: expected a token of printable ASCII characters without spaces",
        ),
        (
            {"backend": "http", "url": "https://shanoir/api", "token": "abc\n"},
            "[mapping] token: expected a token of printable ASCII characters without spaces",
        ),
        (
            {"backend": "http", "url": "https://shanoir/api", "token": 12345},
            "[mapping] token: expected a string, got an integer",
        ),
        ({"cache_ttl": -1}, "[mapping] cache_ttl: must be >= 0"),
        ({"cache_ttl": "60"}, '[mapping] cache_ttl: expected a number, got "60"'),
    ],
)
def test_mapping_token_and_cache_ttl_errors(
    tmp_path: Path, mapping: dict[str, Any], expected: str
) -> None:
    with pytest.raises(ConfigError) as info:
        settings(tmp_path, **mapping)
    assert str(info.value) == f"<dict>: {expected}"
    assert "12345" not in str(info.value) and "a b" not in str(info.value)
