"""The embedded store: schema and migrations, registration, import, the async maps, and the
``store`` commands run as users run them, against the real Orthanc."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import random
import sqlite3
import stat
import subprocess
import sys
import threading
from collections.abc import Collection, Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from shanoir_dicomweb_proxy import Settings, Upstream
from shanoir_dicomweb_proxy._backends import CachingIdentifierMap, SqliteIdentifierMap
from shanoir_dicomweb_proxy._identifiers import IdentifierMap, SeriesEntry
from shanoir_dicomweb_proxy._store import (
    SCHEMA_VERSION,
    ImportRow,
    SqliteStore,
    StoreConflict,
    StoreError,
    load_import_file,
    sync_store,
)
from shanoir_dicomweb_proxy.testing import OrthancServer, SampleSet, dump_toml, free_port

from .support.settings import CORE_SETTINGS

STUDY_ROOT, SERIES_ROOT = "1.4.9.12.34.1.8527", "1.4.9.12.34.2.8527"
_NOWHERE = f"http://127.0.0.1:{free_port()}/dicom-web"


def _uid(n: int) -> str:
    return f"1.2.3.{n}"


# --- schema -----------------------------------------------------------------------------------


def test_new_file_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite3"
    with SqliteStore(path) as store:
        assert store.schema_version == SCHEMA_VERSION
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    assert {"examinations", "acquisitions", "acquisitions_by_exam"} <= tables
    conn.close()


def test_empty_file_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite3"
    path.touch()
    with SqliteStore(path) as store:
        assert store.schema_version == SCHEMA_VERSION
        assert store.register_study(_uid(1)) == 1


def test_foreign_keys_are_on(tmp_path: Path) -> None:
    with SqliteStore(tmp_path / "s.sqlite3") as store:
        with pytest.raises(StoreError, match="examination 7 does not exist"):
            store.register_series(7, _uid(1))


def test_newer_store_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite3"
    SqliteStore(path).close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(
        StoreError,
        match=rf"schema version {SCHEMA_VERSION + 1}, newer .* \({SCHEMA_VERSION}\): upgrade",
    ):
        SqliteStore(path)


def test_another_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.sqlite3"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE patients (id INTEGER)")
    conn.close()
    with pytest.raises(StoreError, match="not a shanoir-dicomweb-proxy store"):
        SqliteStore(path)
    garbage = tmp_path / "garbage.sqlite3"
    garbage.write_bytes(b"not a database at all" * 100)
    with pytest.raises(StoreError, match="cannot open the store"):
        SqliteStore(garbage)


def test_missing_file_or_folder(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no store there"):
        SqliteStore(tmp_path / "nope.sqlite3", create=False)
    with pytest.raises(StoreError, match="cannot open the store"):
        SqliteStore(tmp_path / "no-such-folder" / "store.sqlite3")
    store = SqliteStore(tmp_path / "s.sqlite3")
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.register_study(_uid(1))


# --- registration -----------------------------------------------------------------------------


def test_registration_is_idempotent_and_ordered(tmp_path: Path) -> None:
    with SqliteStore(tmp_path / "s.sqlite3") as store:
        assert [store.register_study(_uid(n)) for n in (5, 3, 5, 4, 3)] == [1, 2, 1, 3, 2]
        assert store.register_series(1, _uid(50)) == 1
        assert store.register_series(2, _uid(30)) == 2
        assert store.register_series(1, _uid(50)) == 1
        with pytest.raises(StoreConflict, match=r"series 1\.2\.3\.50 is acquisition 1 of "):
            store.register_series(2, _uid(50))
        done = store.register(_uid(6), [_uid(61), _uid(30), _uid(62), _uid(61)])
        assert (done.exam_id, done.new_study, done.new_series) == (4, True, 2)
        assert done.series == {_uid(61): 3, _uid(62): 4}
        assert len(done.conflicts) == 1 and "acquisition 2 of examination 2" in done.conflicts[0]
        again = store.register(_uid(6), [_uid(61), _uid(62)])
        assert (again.exam_id, again.new_study, again.new_series) == (4, False, 0)
        # Explicit IDs (an import) move the counter on: new IDs never go back.
        store.import_entries([ImportRow(100, _uid(7), 200, _uid(71))])
        assert store.register_study(_uid(8)) == 101
        assert store.register_series(101, _uid(81)) == 201
        entries = store.entries()
    assert [e.exam_id for e in entries] == [1, 2, 3, 4, 100, 101]
    assert entries[0].acquisitions == (SeriesEntry(1, 1, _uid(50)),)
    assert entries[2].acquisitions == ()


def test_lookups(tmp_path: Path) -> None:
    with SqliteStore(tmp_path / "s.sqlite3") as store:
        for n in range(1, 1201):
            store.register(_uid(n), [_uid(10_000 + n)])
        uids = [_uid(n) for n in range(1, 1201)] + ["9.9.9", _uid(1)]
        found = store.lookup_studies_by_uid(uids)
        assert len(found) == 1200 and found[_uid(1000)] == 1000
        assert store.lookup_studies_by_id([1, 1200, 1201]) == {1: _uid(1), 1200: _uid(1200)}
        assert store.lookup_series_by_uid([_uid(10_007)]) == {
            _uid(10_007): SeriesEntry(7, 7, _uid(10_007))
        }
        assert store.lookup_series_by_id(range(1, 1300)).keys() == set(range(1, 1201))
        # IDs no store can hold (a 20-digit public UID) are unknown, not an error.
        assert store.lookup_studies_by_id([0, -1, 2**63, 10**20 - 1]) == {}
        assert store.lookup_series_by_id([2**64]) == {}


# --- import -----------------------------------------------------------------------------------


def _seeded(tmp_path: Path) -> SqliteStore:
    store = SqliteStore(tmp_path / "s.sqlite3")
    store.import_entries([ImportRow(1, _uid(1), 10, _uid(10)), ImportRow(2, _uid(2))])
    return store


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (
            [ImportRow(1, _uid(9), where="line 4")],
            "line 4: examination 1 is already study 1.2.3.1 (in the store); "
            "this row says study 1.2.3.9",
        ),
        (
            [ImportRow(3, _uid(1))],
            "row 2: study 1.2.3.1 is already examination 1 (in the store); "
            "this row says examination 3",
        ),
        (
            [ImportRow(2, _uid(2), 10, _uid(11))],
            "row 2: acquisition 10 is already series 1.2.3.10 (in the store); "
            "this row says series 1.2.3.11",
        ),
        (
            [ImportRow(1, _uid(1), 11, _uid(10))],
            "row 2: series 1.2.3.10 is already acquisition 10 (in the store); "
            "this row says acquisition 11",
        ),
        (
            [ImportRow(2, _uid(2), 10, _uid(10))],
            "row 2: acquisition 10 belongs to examination 1 (in the store); "
            "this row says examination 2",
        ),
        (
            [ImportRow(5, _uid(5), where="line 2"), ImportRow(6, _uid(5), where="line 3")],
            "line 3: study 1.2.3.5 is already examination 5 (by line 2); "
            "this row says examination 6",
        ),
        (
            [ImportRow(5, _uid(5), 50, _uid(50)), ImportRow(5, _uid(5), 50, _uid(50))],
            "row 3: duplicate of row 2",
        ),
        ([ImportRow(0, _uid(5))], "row 2: exam_id: expected a positive integer, got 0"),
        ([ImportRow(5, "1.2.x")], "row 2: study_uid: expected a UID"),
        ([ImportRow(5, _uid(5), 50)], "acquisition_id and series_uid go together"),
    ],
)
def test_import_conflicts(tmp_path: Path, rows: list[ImportRow], message: str) -> None:
    with _seeded(tmp_path) as store:
        before = store.entries()
        good = [ImportRow(7, _uid(7), 70, _uid(70))]
        with pytest.raises(StoreError) as caught:
            store.import_entries(good + rows)
        assert message in str(caught.value)
        assert store.entries() == before  # all or nothing


def test_import_is_idempotent(tmp_path: Path) -> None:
    with _seeded(tmp_path) as store:
        summary = store.import_entries([ImportRow(1, _uid(1), 10, _uid(10)), ImportRow(2, _uid(2))])
        assert (summary.rows, summary.new_studies, summary.new_series) == (2, 0, 0)
        summary = store.import_entries([ImportRow(2, _uid(2), 20, _uid(20))])
        assert (summary.rows, summary.new_studies, summary.new_series) == (1, 0, 1)


def test_import_files(tmp_path: Path) -> None:
    csv_file = tmp_path / "export.csv"
    csv_file.write_text(
        "\ufeffstudy_uid, exam_id ,acquisition_id,series_uid\r\n"
        "1.2.3.1,1,10,1.2.3.10\r\n"
        "1.2.3.1,1,11,1.2.3.11\r\n"
        "\r\n"
        "1.2.3.2,2,,\r\n",
        encoding="utf-8",
    )
    rows = load_import_file(csv_file)
    assert rows == [
        ImportRow(1, _uid(1), 10, _uid(10), where="line 2"),
        ImportRow(1, _uid(1), 11, _uid(11), where="line 3"),
        ImportRow(2, _uid(2), where="line 5"),
    ]
    flat = tmp_path / "flat.json"
    flat.write_text(
        '[\n {"exam_id": 1, "study_uid": "1.2.3.1", "acquisition_id": 10,\n'
        '  "series_uid": "1.2.3.10"},\n'
        ' {"exam_id": 2, "study_uid": "1.2.3.2", "acquisition_id": null}\n]\n'
    )
    assert [(r.exam_id, r.acquisition_id, r.where) for r in load_import_file(flat)] == [
        (1, 10, "item 1 (line 2)"),
        (2, None, "item 2 (line 4)"),
    ]
    nested = tmp_path / "nested.json"
    nested.write_text(
        json.dumps(
            [
                {
                    "exam_id": 1,
                    "study_uid": _uid(1),
                    "public_study_uid": None,
                    "acquisitions": [{"acquisition_id": 10, "series_uid": _uid(10)}],
                },
                {"exam_id": 2, "study_uid": _uid(2), "acquisitions": []},
            ]
        )
    )
    assert [(r.exam_id, r.acquisition_id) for r in load_import_file(nested)] == [
        (1, None),
        (1, 10),
        (2, None),
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("exam_id,study_uid,series_uid\n", "line 1: expected the header"),
        ("exam_id,study_uid,acquisition_id,series_uid\n1,1.2.3\n", "line 2: expected 4 fields"),
        ("exam_id,study_uid,acquisition_id,series_uid\nx,1.2,,\n", "line 2: exam_id: expected"),
        ("exam_id,study_uid,acquisition_id,series_uid\n1,1.2,7,\n", "line 2: acquisition_id and"),
        ('[\n{"exam_id": 1, "study_uid": "1.2"},\n{"exam_id": 2,\n', "line 4 column 1"),
        ('[{"exam_id": 1, "study_uid": "1.2", "acq": 3}]', "item 1 (line 1): unknown key 'acq'"),
        ('[{"exam_id": "1", "study_uid": "1.2"}]', "exam_id: expected a positive integer"),
        ('{"exam_id": 1}', "line 1: expected a JSON array of objects"),
        ("[1]", "item 1 (line 1): expected an object"),
        ('[{"exam_id": 1, "study_uid": "1.2"}] []', "unexpected text after the array"),
    ],
)
def test_import_file_errors(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.txt"
    path.write_text(text)
    with pytest.raises(StoreError, match=r"bad\.txt: ") as caught:
        load_import_file(path)
    assert message in str(caught.value)


# --- the async maps ---------------------------------------------------------------------------


@pytest.fixture
def populated(tmp_path: Path) -> Iterator[SqliteStore]:
    with SqliteStore(tmp_path / "s.sqlite3") as store:
        store.import_entries(
            ImportRow(n, _uid(n), 100_000 + n, _uid(100_000 + n)) for n in range(1, 3001)
        )
        yield store


async def test_concurrent_batched_lookups(populated: SqliteStore) -> None:
    identifiers = SqliteIdentifierMap(populated)
    assert isinstance(identifiers, IdentifierMap)
    rng = random.Random(4)

    async def one(task: int) -> None:
        numbers = rng.sample(range(1, 4001), 600)  # a quarter of them unknown
        known = [n for n in numbers if n <= 3000]
        if task % 2:
            found = await identifiers.studies_by_uid([_uid(n) for n in numbers])
            assert found == {_uid(n): n for n in known}
            back = await identifiers.studies_by_id(numbers)
            assert back == {n: _uid(n) for n in known}
        else:
            series = await identifiers.series_by_uid([_uid(100_000 + n) for n in numbers])
            assert series == {
                _uid(100_000 + n): SeriesEntry(100_000 + n, n, _uid(100_000 + n)) for n in known
            }
            by_id = await identifiers.series_by_id([100_000 + n for n in numbers])
            assert by_id.keys() == {100_000 + n for n in known}

    await asyncio.gather(*(one(task) for task in range(200)))
    assert await identifiers.studies_by_uid([]) == {}


class _Counting:
    """An inner map that records what it was asked."""

    def __init__(self, studies: Mapping[str, int], series: Mapping[str, SeriesEntry]) -> None:
        self.studies, self.series = dict(studies), dict(series)
        self.asked: list[tuple[str, frozenset[object]]] = []
        self.fail = False
        self.delay = 0.0

    async def _answer(self, kind: str, keys: Collection[Any], table: Mapping[Any, Any]) -> Any:
        self.asked.append((kind, frozenset(keys)))
        await asyncio.sleep(self.delay)
        if self.fail:
            raise RuntimeError("backend down")
        return {key: table[key] for key in keys if key in table}

    async def studies_by_uid(self, uids: Collection[str]) -> Mapping[str, int]:
        answer: Mapping[str, int] = await self._answer("study uid", uids, self.studies)
        return answer

    async def studies_by_id(self, exam_ids: Collection[int]) -> Mapping[int, str]:
        table = {exam: uid for uid, exam in self.studies.items()}
        answer: Mapping[int, str] = await self._answer("study id", exam_ids, table)
        return answer

    async def series_by_uid(self, uids: Collection[str]) -> Mapping[str, SeriesEntry]:
        answer: Mapping[str, SeriesEntry] = await self._answer("series uid", uids, self.series)
        return answer

    async def series_by_id(self, acquisition_ids: Collection[int]) -> Mapping[int, SeriesEntry]:
        table = {entry.acquisition_id: entry for entry in self.series.values()}
        answer: Mapping[int, SeriesEntry] = await self._answer("series id", acquisition_ids, table)
        return answer

    def keys(self, kind: str) -> list[object]:
        return [key for asked_kind, keys in self.asked if asked_kind == kind for key in keys]


def _counting() -> _Counting:
    studies = {_uid(n): n for n in range(1, 11)}
    series = {_uid(100 + n): SeriesEntry(100 + n, n, _uid(100 + n)) for n in range(1, 11)}
    return _Counting(studies, series)


async def test_cache_asks_once_per_uid() -> None:
    inner = _counting()
    cache = CachingIdentifierMap(inner, ttl=60, maxsize=1000)
    assert isinstance(cache, IdentifierMap)
    first = await cache.studies_by_uid([_uid(1), _uid(2), "9.9"])
    assert first == {_uid(1): 1, _uid(2): 2}
    second = await cache.studies_by_uid([_uid(1), _uid(2), _uid(3), "9.9", _uid(3)])
    assert second == {_uid(1): 1, _uid(2): 2, _uid(3): 3}
    assert inner.asked == [
        ("study uid", frozenset({_uid(1), _uid(2), "9.9"})),
        ("study uid", frozenset({_uid(3)})),
    ]
    # An answer in one direction fills the other.
    assert await cache.studies_by_id([1, 3]) == {1: _uid(1), 3: _uid(3)}
    entry = SeriesEntry(105, 5, _uid(105))
    assert await cache.series_by_id([105, 999]) == {105: entry}
    assert await cache.series_by_uid([_uid(105)]) == {_uid(105): entry}
    assert [kind for kind, _ in inner.asked] == ["study uid", "study uid", "series id"]


async def test_cache_remembers_unknowns_briefly() -> None:
    inner = _counting()
    cache = CachingIdentifierMap(inner, ttl=60, maxsize=1000, negative_ttl=0.2)
    made_up = [f"9.9.{n}" for n in range(100)]
    for _ in range(20):
        assert await cache.studies_by_uid(made_up) == {}
    assert len(inner.asked) == 1
    inner.studies["9.9.7"] = 77  # registered meanwhile
    await asyncio.sleep(0.3)
    assert await cache.studies_by_uid(made_up) == {"9.9.7": 77}
    assert len(inner.asked) == 2
    assert CachingIdentifierMap(inner, ttl=1, maxsize=1).negative_ttl == 1  # never past ttl


async def test_cache_shares_lookups_in_flight() -> None:
    inner = _counting()
    inner.delay = 0.05
    cache = CachingIdentifierMap(inner, ttl=60, maxsize=1000)
    batches = [[_uid(n) for n in range(1, 11) if n % k == 0] + ["9.9"] for k in (1, 2, 3, 5)]
    answers = await asyncio.gather(*(cache.studies_by_uid(batch) for batch in batches * 25))
    for batch, answer in zip(batches * 25, answers, strict=True):
        assert answer == {uid: int(uid.rsplit(".", 1)[1]) for uid in batch if uid != "9.9"}
    asked = inner.keys("study uid")
    assert sorted(map(str, asked)) == sorted([_uid(n) for n in range(1, 11)] + ["9.9"])


async def test_cache_after_inner_failure() -> None:
    inner = _counting()
    inner.delay, inner.fail = 0.05, True
    cache = CachingIdentifierMap(inner, ttl=60, maxsize=1000)
    results = await asyncio.gather(
        cache.studies_by_uid([_uid(1)]), cache.studies_by_uid([_uid(1)]), return_exceptions=True
    )
    assert all(isinstance(r, RuntimeError) for r in results)
    inner.fail = False
    assert await cache.studies_by_uid([_uid(1)]) == {_uid(1): 1}  # failures are not cached


def test_cache_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="maxsize"):
        CachingIdentifierMap(_counting(), ttl=1, maxsize=0)
    with pytest.raises(ValueError, match="ttl"):
        CachingIdentifierMap(_counting(), ttl=-1, maxsize=10)


async def test_cache_over_the_store(populated: SqliteStore) -> None:
    cache = CachingIdentifierMap(SqliteIdentifierMap(populated), ttl=60, maxsize=10_000)
    uids = [_uid(n) for n in range(1, 1001)]
    cold = await cache.studies_by_uid(uids)
    warm = await cache.studies_by_uid(uids)
    assert cold == warm == {_uid(n): n for n in range(1, 1001)}


# --- the walk, against upstreams that page differently -----------------------------------------


def _element(vr: str, value: object) -> dict[str, Any]:
    return {"vr": vr, "Value": [value]}


async def test_sync_walk_follows_the_upstreams_paging(tmp_path: Path) -> None:
    """An upstream that caps pages below the limit (and says so with Warning 299), one that
    ignores offset, and SeriesNumber as numbers, strings or absent."""
    dates = [("20200102", "0900"), ("20200101", "1000"), ("20200101", "0900"), ("20200101", "")]
    studies = [
        {"0020000D": _element("UI", f"1.2.{n}"), "00080020": _element("DA", date)}
        | ({"00080030": _element("TM", time)} if time else {})
        for n, (date, time) in enumerate(dates * 2)
    ]
    numbers: list[object] = [10, "2", None, " 3 ", "x"]
    series = [
        {"0020000E": _element("UI", f"1.3.{n}")}
        | ({"00200011": _element("IS", number)} if number is not None else {})
        for n, number in enumerate(numbers)
    ]
    requests: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        requests.append(str(request.url))
        offset = int(request.url.params["offset"])
        if request.url.path.endswith("/studies"):
            page = studies[offset : offset + 3]  # at most 3 rows, whatever the limit
            more = offset + 3 < len(studies)
            headers = {"warning": '299 pacs "There are additional results"'} if more else {}
            return httpx.Response(200, json=page, headers=headers)
        return httpx.Response(200, json=series)  # offset ignored

    settings = Settings.from_dict({**CORE_SETTINGS, "upstream": {"url": "http://pacs/dicom-web"}})
    upstream = Upstream(settings.upstream, transport=httpx.MockTransport(answer))
    with SqliteStore(tmp_path / "s.sqlite3") as store:
        done = await sync_store(store, upstream, page_size=5)
        await upstream.aclose()
        assert done.summary() == "8 studies (8 new), 5 series (5 new)"
        # The same series under every study: registered under the first, left out elsewhere.
        assert len(done.conflicts) == 7 * 5
        message = "series 1.3.1 is acquisition 1 of examination 1, not of examination 2"
        assert message in done.conflicts[0]
        entries = store.entries()
    expected = sorted((date, time, f"1.2.{n}") for n, (date, time) in enumerate(dates * 2))
    assert [e.study_uid for e in entries] == [uid for _, _, uid in expected]
    # 2, 3, 10 by number; then the ones without a usable number, by UID.
    assert [
        a.series_uid for a in entries[0].acquisitions
    ] == "1.3.1 1.3.3 1.3.0 1.3.2 1.3.4".split()
    study_pages = [r for r in requests if "/series" not in r]
    assert len(study_pages) == 3  # 3 + 3 + 2 rows: the last page is short without Warning
    assert sum("/series" in r for r in requests) == 2 * 8  # the repeated page ends it


# --- the command line, against the real Orthanc -----------------------------------------------


def _run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "shanoir_dicomweb_proxy", "store", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)


def _config(
    folder: Path, upstream_url: str, *, backend: str = "sqlite", store: str = "store.sqlite3"
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    mapping = {"backend": backend, "study_root": STUDY_ROOT, "series_root": SERIES_ROOT}
    settings = {
        **CORE_SETTINGS,
        "upstream": {"url": upstream_url},
        "mapping": mapping,
        "store": {"path": store},
    }
    path = folder / "proxy.toml"
    path.write_text(dump_toml(settings))
    return path


def _listing(config: Path) -> list[dict[str, Any]]:
    result = _run("list", "-c", str(config), "--json")
    assert result.returncode == 0, result.stderr
    data: list[dict[str, Any]] = json.loads(result.stdout)
    return data


def _sync(config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    result = _run("sync", "-c", str(config), *extra)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture(scope="module")
def synced(tmp_path_factory: pytest.TempPathFactory, orthanc: OrthancServer) -> Path:
    """A store synced once from the session's Orthanc; its config file."""
    config = _config(tmp_path_factory.mktemp("synced"), orthanc.dicomweb_url)
    result = _sync(config)
    assert result.stdout.strip() == "13 studies (13 new), 27 series (27 new)"
    return config


def test_sync_registers_everything_in_a_stable_order(
    synced: Path, orthanc: OrthancServer, samples: SampleSet
) -> None:
    listing = _listing(synced)
    assert sorted(e["study_uid"] for e in listing) == sorted(samples.all_study_uids())
    series = [a for e in listing for a in e["acquisitions"]]
    assert sorted(a["series_uid"] for a in series) == sorted(samples.all_series_uids())
    assert [e["exam_id"] for e in listing] == list(range(1, 14))
    assert [a["acquisition_id"] for a in series] == list(range(1, 28))
    first = listing[0]
    assert first["public_study_uid"] == f"{STUDY_ROOT}.1"
    assert first["acquisitions"][0]["public_series_uid"] == f"{SERIES_ROOT}.1"
    # The order: StudyDate, StudyTime, StudyInstanceUID; SeriesNumber, SeriesInstanceUID.
    accept = {"accept": "application/dicom+json"}
    studies = httpx.get(orthanc.dicomweb_url + "/studies", headers=accept).json()

    def value(row: dict[str, Any], tag: str) -> Any:
        return row.get(tag, {}).get("Value", [""])[0]

    expected = sorted(studies, key=lambda r: [value(r, t) for t in ("00080020", "00080030")])
    assert [e["study_uid"] for e in listing] == [value(r, "0020000D") for r in expected]
    for entry in listing:
        url = f"{orthanc.dicomweb_url}/studies/{entry['study_uid']}/series"
        rows = httpx.get(url, headers=accept).json()
        rows.sort(key=lambda r: (int(value(r, "00200011")), value(r, "0020000E")))
        assert [a["series_uid"] for a in entry["acquisitions"]] == [
            value(r, "0020000E") for r in rows
        ]


def test_second_sync_adds_nothing(synced: Path) -> None:
    before = _listing(synced)
    result = _sync(synced, "--page-size", "4")  # paging: 4 pages of studies, 2 of some series
    assert result.stdout.strip() == "13 studies (0 new), 27 series (0 new)"
    assert result.stderr == ""  # not a terminal: no progress line
    assert _listing(synced) == before


def test_list_text(synced: Path, samples: SampleSet) -> None:
    result = _run("list", "-c", str(synced))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[-1] == "13 examinations, 27 acquisitions"
    assert lines[0].startswith("examination 1  study 1.2.")
    assert lines[0].endswith(f"  public {STUDY_ROOT}.1")
    assert lines[1].startswith("  acquisition 1  series ")
    assert all(uid in result.stdout for uid in samples.all_series_uids())


def test_sync_whatever_the_mapping_backend(tmp_path: Path, orthanc: OrthancServer) -> None:
    config = _config(tmp_path, orthanc.dicomweb_url, backend="identity")
    _sync(config)
    listing = _listing(config)
    assert len(listing) == 13 and listing[0]["public_study_uid"] is None


class _FailingForwarder(ThreadingHTTPServer):
    """Forwards to Orthanc, and answers 500 to every series search after the first few."""

    def __init__(self, upstream_url: str, *, series_searches: int) -> None:
        super().__init__(("127.0.0.1", 0), _Forward)
        self.upstream_url = upstream_url
        self.allowed = series_searches
        self.lock = threading.Lock()
        self.client = httpx.Client()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/dicom-web"


class _Forward(BaseHTTPRequestHandler):
    server: _FailingForwarder

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        path = self.path.removeprefix("/dicom-web")
        if path.split("?")[0].endswith("/series"):
            with self.server.lock:
                self.server.allowed -= 1
                failing = self.server.allowed < 0
            if failing:
                self.send_response(500)
                self.send_header("content-length", "0")
                self.end_headers()
                return
        accept = {"accept": self.headers.get("accept", "*/*")}
        answer = self.server.client.get(self.server.upstream_url + path, headers=accept)
        self.send_response(answer.status_code)
        self.send_header("content-type", answer.headers.get("content-type", ""))
        self.send_header("content-length", str(len(answer.content)))
        self.end_headers()
        self.wfile.write(answer.content)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def failing(orthanc: OrthancServer) -> Iterator[_FailingForwarder]:
    server = _FailingForwarder(orthanc.dicomweb_url, series_searches=5)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    server.client.close()


def test_interrupted_sync_carries_on(
    tmp_path: Path, synced: Path, orthanc: OrthancServer, failing: _FailingForwarder
) -> None:
    broken = _config(tmp_path, failing.url, store="resumed.sqlite3")
    result = _run("sync", "-c", str(broken))
    assert result.returncode == 1
    assert "error: store sync: GET /studies/" in result.stderr
    assert "the upstream answered 500" in result.stderr
    assert "store sync again to carry on" in result.stderr
    partial = _listing(broken)
    assert 0 < len(partial) <= 5  # whole studies only, each with all its series
    assert partial == _listing(synced)[: len(partial)]
    resumed = _config(tmp_path, orthanc.dicomweb_url, store="resumed.sqlite3")
    result = _sync(resumed)
    new_series = 27 - sum(len(e["acquisitions"]) for e in partial)
    summary = f"13 studies ({13 - len(partial)} new), 27 series ({new_series} new)"
    assert result.stdout.strip() == summary
    assert _listing(resumed) == _listing(synced)  # the IDs one uninterrupted run gives


def test_sync_into_a_store_that_knows_some_studies(
    tmp_path: Path, synced: Path, orthanc: OrthancServer
) -> None:
    reference = _listing(synced)
    known = reference[6]
    rows = [
        {
            "exam_id": 50,
            "study_uid": known["study_uid"],
            "acquisition_id": 70 + n,
            "series_uid": acquisition["series_uid"],
        }
        for n, acquisition in enumerate(known["acquisitions"])
    ]
    export = tmp_path / "known.json"
    export.write_text(json.dumps(rows))
    config = _config(tmp_path, orthanc.dicomweb_url)
    assert _run("import", "-c", str(config), str(export)).returncode == 0
    _sync(config)
    listing = _listing(config)
    others = [e for e in reference if e is not known]
    assert [e["study_uid"] for e in listing] == [known["study_uid"]] + [
        e["study_uid"] for e in others
    ]
    assert [e["exam_id"] for e in listing] == [50, *range(51, 63)]  # new IDs never below 50
    first = 70 + len(known["acquisitions"])
    acquisitions = [a["acquisition_id"] for e in listing[1:] for a in e["acquisitions"]]
    assert acquisitions == list(range(first, first + 27 - len(known["acquisitions"])))


def test_progress_on_a_terminal(synced: Path) -> None:
    controller, terminal = pty.openpty()
    try:
        command = [sys.executable, "-m", "shanoir_dicomweb_proxy", "store", "sync"]
        result = subprocess.run(
            [*command, "-c", str(synced)],
            stdout=subprocess.PIPE,
            stderr=terminal,
            text=True,
            timeout=60,
            check=False,
        )
        os.close(terminal)
        shown = b""
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: the terminal's other side is closed
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(controller)
    assert result.returncode == 0
    assert result.stdout.strip() == "13 studies (0 new), 27 series (0 new)"
    assert b"\r" in shown and b"store sync: 13/13 studies, 27 series (0 new)" in shown


def test_list_round_trips_through_import(tmp_path: Path, synced: Path) -> None:
    export = tmp_path / "export.json"
    result = _run("list", "-c", str(synced), "--json")
    export.write_text(result.stdout)
    config = _config(tmp_path, _NOWHERE, store="copy.sqlite3")
    result = _run("import", "-c", str(config), str(export))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "40 rows: 13 new examinations, 27 new acquisitions"
    assert _listing(config) == _listing(synced)


def test_import_csv_and_json(tmp_path: Path) -> None:
    config = _config(tmp_path, _NOWHERE)
    csv_file = tmp_path / "export.csv"
    csv_file.write_text(
        "exam_id,study_uid,acquisition_id,series_uid\n"
        "12,1.2.3.12,120,1.2.3.120\n"
        "12,1.2.3.12,121,1.2.3.121\n"
        "13,1.2.3.13,,\n"
    )
    result = _run("import", "-c", str(config), str(csv_file))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "3 rows: 2 new examinations, 2 new acquisitions"
    json_file = tmp_path / "more.json"
    json_file.write_text(
        json.dumps(
            [
                {"exam_id": 13, "study_uid": "1.2.3.13", "acquisition_id": 130},
                {"exam_id": 14, "study_uid": "1.2.3.14"},
            ]
        )
    )
    result = _run("import", "-c", str(config), str(json_file))
    assert result.returncode == 2
    message = "more.json: item 1 (line 1): acquisition_id and series_uid go together"
    assert message in result.stderr
    rows = [
        {"exam_id": 13, "study_uid": "1.2.3.13", "acquisition_id": 130, "series_uid": "1.2.3.130"},
        {"exam_id": 14, "study_uid": "1.2.3.14", "series_uid": None},
    ]
    json_file.write_text(json.dumps(rows))
    result = _run("import", "-c", str(config), str(json_file))
    assert result.returncode == 0, result.stderr
    listing = _listing(config)
    assert [(e["exam_id"], len(e["acquisitions"])) for e in listing] == [(12, 2), (13, 1), (14, 0)]
    assert listing[0]["public_study_uid"] == f"{STUDY_ROOT}.12"


def test_import_conflict_changes_nothing(tmp_path: Path) -> None:
    config = _config(tmp_path, _NOWHERE)
    good = tmp_path / "good.csv"
    good.write_text("exam_id,study_uid,acquisition_id,series_uid\n1,1.2.3.1,10,1.2.3.10\n")
    assert _run("import", "-c", str(config), str(good)).returncode == 0
    before = _listing(config)
    bad = tmp_path / "bad.csv"
    bad.write_text(
        "exam_id,study_uid,acquisition_id,series_uid\n"
        "2,1.2.3.2,20,1.2.3.20\n"
        "3,1.2.3.3,10,1.2.3.30\n"
    )
    result = _run("import", "-c", str(config), str(bad))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"error: {bad}: line 3: acquisition 10 is already series 1.2.3.10 (in the store); "
        "this row says series 1.2.3.30; nothing was imported"
    )
    duplicate = tmp_path / "dup.csv"
    duplicate.write_text(
        "exam_id,study_uid,acquisition_id,series_uid\n4,1.2.3.4,,\n5,1.2.3.5,,\n4,1.2.3.4,,\n"
    )
    result = _run("import", "-c", str(config), str(duplicate))
    assert result.returncode == 2 and "line 4: duplicate of line 2" in result.stderr
    assert _listing(config) == before


def test_store_that_cannot_be_opened(tmp_path: Path, orthanc: OrthancServer) -> None:
    config = _config(tmp_path, orthanc.dicomweb_url, store="missing-folder/store.sqlite3")
    result = _run("sync", "-c", str(config))
    assert result.returncode == 2
    assert "missing-folder/store.sqlite3: cannot open the store" in result.stderr
    assert "Traceback" not in result.stderr
    result = _run("list", "-c", str(config))
    assert result.returncode == 2 and "no store there" in result.stderr


def test_sync_with_the_upstream_down(tmp_path: Path) -> None:
    config = _config(tmp_path, _NOWHERE)
    result = _run("sync", "-c", str(config))
    assert result.returncode == 1
    assert "error: store sync: the upstream could not be reached" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_new_store_is_its_owners_only(tmp_path: Path) -> None:
    """Grants and UIDs: the store and the files SQLite adds beside it are created 0600, even
    under a umask that would leave them readable by everyone."""
    previous = os.umask(0o022)
    try:
        with SqliteStore(tmp_path / "store.sqlite3") as store:
            store.import_entries([ImportRow(1, _uid(1))])
            modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    finally:
        os.umask(previous)
    assert "store.sqlite3-wal" in modes
    assert modes == dict.fromkeys(modes, 0o600), modes
