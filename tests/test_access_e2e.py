"""Access control end to end: grants made with the CLI, tokens, the real Orthanc, and clients
that must never see, fetch or infer an examination they were not granted."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from joserfc.jwk import RSAKey

from shanoir_dicomweb_proxy import Settings
from shanoir_dicomweb_proxy._auth import dev_token
from shanoir_dicomweb_proxy._store import SqliteStore
from shanoir_dicomweb_proxy.testing import OrthancServer

from .support.archive import SERIES_ROOT, STUDY_ROOT
from .support.dicomweb import DICOM, OCTET, XML
from .support.settings import ProxyFactory

TTL = 2  # [access] cache_ttl: a revoke holds within it


def _cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "shanoir_dicomweb_proxy", "store", *args, "-c", str(config)]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory,
    archive: OrthancServer,
    store_path: Path,
    proxy_factory: ProxyFactory,
) -> Iterator[dict[str, Any]]:
    """A proxy with sqlite mapping and access; alice has two examinations, bob all but two,
    carol none, and admin the admin role."""
    folder = tmp_path_factory.mktemp("access")
    store = folder / "store.sqlite3"
    shutil.copy(store_path, store)
    keys = folder / "keys.json"
    key = RSAKey.generate_key(2048, parameters={"kid": "k"}, private=True)
    keys.write_text(json.dumps({"keys": [key.as_dict(private=True)]}))
    with SqliteStore(store) as opened:
        exams = sorted(e.exam_id for e in opened.entries())
    sections: dict[str, Any] = {
        "auth": {"enabled": True, "jwks_file": str(keys), "audience": ["dicomweb-proxy"]},
        "mapping": {"backend": "sqlite", "study_root": STUDY_ROOT, "series_root": SERIES_ROOT},
        "access": {"backend": "sqlite", "cache_ttl": TTL},
        "store": {"path": str(store)},
        "logging": {"audit_log": str(folder / "audit.jsonl")},
    }
    proxy = proxy_factory(archive.dicomweb_url, **sections)
    # The same store and grants, but every search of a non-admin is filtered, not narrowed.
    filtering = proxy_factory(
        archive.dicomweb_url,
        **{
            **sections,
            "access": {**sections["access"], "inject_max": 0},
            "logging": {"audit_log": str(folder / "audit-filtering.jsonl")},
        },
    )
    config = proxy.config_path
    grants = {"alice": exams[:2], "bob": exams[2:], "carol": []}
    for user, granted in grants.items():
        for exam in granted:
            result = _cli(config, "grant", "--user", user, "--study", str(exam), "--action", "read")
            assert result.returncode == 0, result.stderr
    settings = Settings.from_toml(config)

    def token(user: str, *roles: str) -> str:
        claims = {"userId": user, "realm_access": {"roles": list(roles)}}
        return dev_token(settings, user, claims, ttl=600)

    clients: list[httpx.Client] = []
    yield {
        "proxy": proxy,
        "filtering": filtering,
        "exams": exams,
        "grants": grants,
        "token": token,
        "config": config,
        "clients": clients,
    }
    for client in clients:
        client.close()


def _client(world: dict[str, Any], user: str, *roles: str, proxy: str = "proxy") -> httpx.Client:
    headers = {"Authorization": f"Bearer {world['token'](user, *roles)}"}
    client = httpx.Client(base_url=world[proxy].dicomweb_url, headers=headers, timeout=60)
    world["clients"].append(client)
    return client


def _exam(uid: str) -> int:
    assert uid.startswith(STUDY_ROOT + "."), uid
    return int(uid.rsplit(".", 1)[1])


def _studies(client: httpx.Client, query: str = "") -> list[int]:
    response = client.get("/studies" + query)
    assert response.status_code == 200, response.text
    return [_exam(r["0020000D"]["Value"][0]) for r in response.json()]


def test_searches_show_only_granted_examinations(world: dict[str, Any]) -> None:
    alice = _client(world, "alice")
    assert sorted(_studies(alice)) == world["grants"]["alice"]
    for level in ("/series", "/instances"):
        rows = alice.get(level).json()
        assert rows and {_exam(r["0020000D"]["Value"][0]) for r in rows} <= set(
            world["grants"]["alice"]
        )
    assert _studies(_client(world, "carol")) == []
    assert sorted(_studies(_client(world, "admin", "ROLE_ADMIN"))) == world["exams"]


def test_most_of_the_archive_pages_exactly(world: dict[str, Any]) -> None:
    bob = _client(world, "bob")
    everything = _studies(bob)
    assert sorted(everything) == world["grants"]["bob"]
    pages: list[int] = []
    for offset in range(0, len(everything) + 3, 3):
        pages += _studies(bob, f"?limit=3&offset={offset}")
    assert pages == everything  # same order, no gap, no duplicate


_KEY = {"/studies": "0020000D", "/series": "0020000E", "/instances": "00080018"}


def _rows(client: httpx.Client, level: str, accept: str, query: str = "") -> list[str]:
    """The UIDs naming the rows of a search, in order, from its JSON or XML answer."""
    response = client.get(level + query, headers={"Accept": accept})
    if response.status_code == 204:
        return []
    assert response.status_code == 200, response.text
    if "xml" in accept:
        value = rf'tag="{_KEY[level]}"[^>]*>\s*<Value number="1">([^<]+)</Value>'
        return re.findall(value, response.text)
    return [row[_KEY[level]]["Value"][0] for row in response.json()]


@pytest.mark.parametrize("level", ["/studies", "/series", "/instances"])
@pytest.mark.parametrize("accept", ["application/dicom+json", "application/dicom+xml"])
def test_filtered_searches_page_exactly(world: dict[str, Any], level: str, accept: str) -> None:
    narrowed = _client(world, "bob")
    filtered = _client(world, "bob", proxy="filtering")
    everything = _rows(filtered, level, accept)
    assert len(everything) > 3 and len(set(everything)) == len(everything)
    assert sorted(everything) == sorted(_rows(narrowed, level, accept))
    pages: list[str] = []
    for offset in range(0, len(everything) + 3, 3):
        query = f"?limit=3&offset={offset}"
        page = _rows(filtered, level, accept, query)
        warning = filtered.get(level + query, headers={"Accept": accept}).headers.get("warning")
        assert (warning is not None) == (offset + 3 < len(everything)), (offset, warning)
        pages += page
    assert pages == everything  # same order, no gap, no duplicate


def _routes(study: str, series: str, instance: str) -> list[tuple[str, str]]:
    i = f"/studies/{study}/series/{series}/instances/{instance}"
    wado = f"/wado?requestType=WADO&studyUID={study}&seriesUID={series}&objectUID={instance}"
    return [
        (f"/studies/{study}/series", "application/dicom+json"),
        (f"/studies/{study}/instances", "application/dicom+json"),
        (f"/studies/{study}/metadata", "application/dicom+json"),
        (f"/studies/{study}/metadata", XML),
        (f"/studies/{study}", DICOM),
        (f"/studies/{study}/series/{series}", DICOM),
        (f"/studies/{study}/series/{series}/metadata", "application/dicom+json"),
        (f"/studies/{study}/series/{series}/rendered", "image/jpeg"),
        (i, DICOM),
        (i + "/metadata", "application/dicom+json"),
        (i + "/frames/1", OCTET),
        (i + "/rendered", "image/png"),
        (i + "/bulk/7fe00010", "application/octet-stream"),
        (i + "/thumbnail", "image/jpeg"),
        (i.replace("/series/", "//series/") + "//metadata", "application/dicom+json"),
        (f"{wado}&contentType=application/dicom", "*/*"),
        (f"{wado}&contentType=image/jpeg&rows=64", "*/*"),
    ]


def test_every_route_of_a_foreign_examination_is_not_found(world: dict[str, Any]) -> None:
    admin = _client(world, "admin", "ROLE_ADMIN")
    alice = _client(world, "alice")
    mine = f"{STUDY_ROOT}.{world['grants']['alice'][0]}"
    foreign = f"{STUDY_ROOT}.{world['grants']['bob'][0]}"
    row = admin.get(f"/studies/{foreign}/instances").json()[0]
    series, instance = row["0020000E"]["Value"][0], row["00080018"]["Value"][0]
    missing = alice.get(f"/studies/{STUDY_ROOT}.99999/metadata")
    for study in (foreign, mine):  # mine: a foreign series under my own study
        for path, accept in _routes(study, series, instance):
            if study == mine and "/series/" not in path and "seriesUID" not in path:
                continue
            response = alice.get(path, headers={"Accept": accept})
            assert response.status_code == 404, (path, response.status_code)
            assert response.content == missing.content or study == mine, path
            assert foreign not in response.text and series not in response.text


def test_a_foreign_instance_under_my_own_series_is_not_found(world: dict[str, Any]) -> None:
    admin = _client(world, "admin", "ROLE_ADMIN")
    alice = _client(world, "alice")
    foreign = f"{STUDY_ROOT}.{world['grants']['bob'][0]}"
    # An image of alice's (an SR has no pixel data to ask for): every route of it must answer.
    own, mine = next(
        (row, study)
        for study in (f"{STUDY_ROOT}.{e}" for e in world["grants"]["alice"])
        for row in admin.get(f"/studies/{study}/instances").json()
        if ".88." not in row["00080016"]["Value"][0]
    )
    series, instance = own["0020000E"]["Value"][0], own["00080018"]["Value"][0]
    stranger = admin.get(f"/studies/{foreign}/instances").json()[0]["00080018"]["Value"][0]
    for path, accept in _routes(mine, series, instance)[8:]:
        assert alice.get(path, headers={"Accept": accept}).status_code == 200, path
        path = path.replace(instance, stranger)
        response = alice.get(path, headers={"Accept": accept})
        assert response.status_code == 404, (path, response.status_code)
        assert stranger not in response.text


def test_no_byte_names_a_foreign_examination(world: dict[str, Any], real_uids: set[str]) -> None:
    alice = _client(world, "alice")
    mine = world["grants"]["alice"]
    others = [e for e in world["exams"] if e not in mine]
    public = [f"{STUDY_ROOT}.{e}" for e in others]
    pattern = re.compile(
        "|".join(re.escape(u) + r"(?![0-9])" for u in [*real_uids, *public]).encode()
    )
    checked = 0
    for exam in mine:
        study = f"{STUDY_ROOT}.{exam}"
        for series_row in alice.get(f"/studies/{study}/series").json():
            series = series_row["0020000E"]["Value"][0]
            rows = alice.get(f"/studies/{study}/series/{series}/instances").json()
            for path, accept in _routes(study, series, rows[0]["00080018"]["Value"][0]):
                response = alice.get(path, headers={"Accept": accept})
                head = "\n".join(f"{k}: {v}" for k, v in response.headers.items()).encode()
                for blob in (head, response.content):
                    hit = pattern.search(blob)
                    assert hit is None, (path, hit and hit.group(0))
                checked += response.status_code == 200
    for level in ("/studies", "/series", "/instances"):
        assert pattern.search(alice.get(level).content) is None
    assert checked > 10


def test_revoke_holds_within_the_ttl(world: dict[str, Any]) -> None:
    dave = _client(world, "dave")
    exam = world["exams"][-1]
    path = f"/studies/{STUDY_ROOT}.{exam}/metadata"
    rights = ("--user", "dave", "--study", str(exam), "--action", "read")
    assert _cli(world["config"], "grant", *rights).returncode == 0
    assert dave.get(path).status_code == 200
    assert _cli(world["config"], "revoke", *rights).returncode == 0
    time.sleep(TTL + 0.5)
    assert dave.get(path).status_code == 404
