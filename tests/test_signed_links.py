"""Signed links end to end (docs/links.md): a proxy with SQLite mapping and access, tokens, real
Orthanc, and requests with no header at all under a link's URL."""

from __future__ import annotations

import base64
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from shanoir_dicomweb_proxy import Settings
from shanoir_dicomweb_proxy._auth import dev_token
from shanoir_dicomweb_proxy._store import SqliteStore
from shanoir_dicomweb_proxy.testing import OrthancServer, ProxyServer, SampleSet

from .support.archive import SERIES_ROOT, STUDY_ROOT
from .support.dicomweb import DICOM, OCTET, XML
from .support.keys import link_key_file, oct_key, rsa_key_file
from .support.relay import RecordingRelay
from .support.settings import ProxyFactory
from .support.waiting import wait_for, whole_lines

MAX_TTL = 600


@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory,
    archive: OrthancServer,
    store_path: Path,
    proxy_factory: ProxyFactory,
    samples: SampleSet,
) -> Iterator[dict[str, Any]]:
    """alice may read two examinations, bob a third; links signed with key "old"."""
    folder = tmp_path_factory.mktemp("links")
    store = folder / "store.sqlite3"
    shutil.copy(store_path, store)
    jwks = folder / "jwks.json"
    rsa_key_file(jwks)
    old = oct_key("old")
    link_keys = link_key_file(folder / "links.json", old)
    images = {study.uid for study in samples.small_studies}  # studies of several image series
    with SqliteStore(store) as opened:
        exams = sorted(e.exam_id for e in opened.entries() if e.study_uid in images)
        for exam in exams[:2]:
            opened.grant("alice", exam, "read")
        opened.grant("bob", exams[2], "read")
    sections: dict[str, Any] = {
        "auth": {"enabled": True, "jwks_file": str(jwks), "audience": ["dicomweb-proxy"]},
        "mapping": {"backend": "sqlite", "study_root": STUDY_ROOT, "series_root": SERIES_ROOT},
        "access": {"backend": "sqlite"},
        "store": {"path": str(store)},
        "logging": {"audit_log": str(folder / "audit.jsonl")},
        "links": {"enabled": True, "max_ttl": MAX_TTL, "keys_file": str(link_keys)},
    }
    proxy = proxy_factory(archive.dicomweb_url, **sections)
    settings = Settings.from_toml(proxy.config_path)

    def token(user: str) -> str:
        return dev_token(settings, user, {"userId": user}, ttl=600)

    yield {
        "proxy": proxy,
        "sections": sections,
        "exams": exams,
        "token": token,
        "folder": folder,
        "old": old,
        "archive": archive,
        "factory": proxy_factory,
    }


def _link(world: dict[str, Any], user: str, **body: Any) -> httpx.Response:
    headers = {"authorization": f"Bearer {world['token'](user)}"}
    return httpx.post(world["proxy"].dicomweb_url + "/links", json=body, headers=headers)


def _study(world: dict[str, Any], index: int) -> str:
    return f"{STUDY_ROOT}.{world['exams'][index]}"


def _image(url: str, study: str) -> tuple[str, str]:
    """A series and an image instance of ``study``, read through ``url`` (a link)."""
    row = httpx.get(f"{url}/studies/{study}/instances").json()[0]
    return row["0020000E"]["Value"][0], row["00080018"]["Value"][0]


def test_a_link_reads_its_study_with_no_header(world: dict[str, Any]) -> None:
    study = _study(world, 0)
    made = _link(world, "alice", study=study, ttl=120)
    assert made.status_code == 201, made.text
    url, expires = made.json()["url"], made.json()["expires"]
    assert url.startswith(world["proxy"].dicomweb_url + "/links/")
    assert 110 <= expires - time.time() <= 121
    series, instance = _image(url, study)
    i = f"{url}/studies/{study}/series/{series}/instances/{instance}"
    wado = f"requestType=WADO&studyUID={study}&seriesUID={series}&objectUID={instance}"
    for path, accept in [
        (f"{url}/studies?StudyInstanceUID={study}", "application/dicom+json"),
        (f"{url}/studies/{study}/series", "application/dicom+json"),
        (f"{url}/studies/{study}/metadata", XML),
        (f"{url}/studies/{study}/series/{series}/metadata", "application/dicom+json"),
        (f"{url}/studies/{study}/series/{series}", DICOM),
        (i + "/frames/1", OCTET),
        (i + "/rendered", "image/jpeg"),
        (i + "/thumbnail", "image/jpeg"),
        (i + "/bulk/7fe00010", "application/octet-stream"),
        (f"{url}/wado?{wado}&contentType=application/dicom", "*/*"),
    ]:
        response = httpx.get(path, headers={"accept": accept}, timeout=30)
        assert response.status_code == 200, (path, response.status_code, response.text[:200])
    # Links in answers keep the link, so that a viewer can follow them without a header.
    metadata = httpx.get(f"{url}/studies/{study}/series/{series}/metadata").json()
    bulk = metadata[0]["7FE00010"]["BulkDataURI"]
    assert bulk.startswith(url + "/studies/")
    assert httpx.get(bulk, headers={"accept": OCTET}).status_code == 200
    # At the root, only its study; another study (even one alice may read) is not found.
    rows = httpx.get(f"{url}/studies").json()
    assert [r["0020000D"]["Value"][0] for r in rows] == [study]
    other = _study(world, 1)
    assert httpx.get(f"{url}/studies/{other}/metadata").status_code == 404
    assert httpx.get(f"{url}/studies?StudyInstanceUID={other}").content in (b"", b"[]")


def test_a_link_to_one_acquisition_shows_only_it(world: dict[str, Any]) -> None:
    study = _study(world, 0)
    full = _link(world, "alice", study=study).json()["url"]
    all_series = [
        r["0020000E"]["Value"][0] for r in httpx.get(f"{full}/studies/{study}/series").json()
    ]
    assert len(all_series) >= 2, "the test needs a study of several series"
    series, other = all_series[0], all_series[1]
    url = _link(world, "alice", study=study, series=series).json()["url"]
    listed = httpx.get(f"{url}/studies/{study}/series").json()
    assert [r["0020000E"]["Value"][0] for r in listed] == [series]
    instances = httpx.get(f"{url}/studies/{study}/instances").json()
    assert instances and {r["0020000E"]["Value"][0] for r in instances} == {series}
    assert httpx.get(f"{url}/studies/{study}/series/{series}/metadata").status_code == 200
    assert httpx.get(f"{url}/studies/{study}/series/{other}/metadata").status_code == 404
    assert httpx.get(f"{url}/studies/{study}/metadata").status_code == 404
    assert httpx.get(f"{url}/studies/{study}/series/{other}/rendered").status_code == 404


def test_links_are_made_only_for_what_the_caller_may_read(world: dict[str, Any]) -> None:
    bobs = _study(world, 2)
    assert _link(world, "alice", study=bobs).status_code == 404
    assert _link(world, "alice", study=f"{STUDY_ROOT}.99999").status_code == 404
    assert _link(world, "bob", study=bobs).status_code == 201
    # alice holds read, not download.
    assert _link(world, "alice", study=_study(world, 0), action="download").status_code == 404
    # A series of another examination.
    url = _link(world, "bob", study=bobs).json()["url"]
    bobs_series = httpx.get(f"{url}/studies/{bobs}/series").json()[0]["0020000E"]["Value"][0]
    assert _link(world, "alice", study=_study(world, 0), series=bobs_series).status_code == 404
    # The longest life is [links] max_ttl.
    long = _link(world, "alice", study=_study(world, 0), ttl=10 * MAX_TTL).json()
    assert long["expires"] - time.time() <= MAX_TTL + 1
    for body in (
        {},
        {"study": 5},
        {"study": _study(world, 0), "action": "write"},
        {"study": _study(world, 0), "ttl": -1},
        {"study": _study(world, 0), "x": 1},
    ):
        refused = _link(world, "alice", **body)
        assert refused.status_code == 400, body
        assert refused.headers["content-type"] == "application/problem+json"
    anonymous = httpx.post(world["proxy"].dicomweb_url + "/links", json={"study": _study(world, 0)})
    assert anonymous.status_code == 401


def test_a_link_only_reads_and_makes_no_links(world: dict[str, Any]) -> None:
    study = _study(world, 0)
    url = _link(world, "alice", study=study).json()["url"]
    stow = httpx.post(
        f"{url}/studies/{study}",
        content=b"--b--",
        headers={"content-type": 'multipart/related; type="application/dicom"; boundary=b'},
    )
    assert stow.status_code == 405
    assert stow.json()["detail"] == "a link only reads"
    links = httpx.post(url + "/links", json={"study": study})
    assert (links.status_code, links.json()["detail"]) == (405, "a link only reads")
    assert links.headers["allow"] == stow.headers["allow"] == "GET, HEAD, OPTIONS"


def test_tampered_expired_and_withdrawn_links_are_refused(world: dict[str, Any]) -> None:
    study = _study(world, 0)
    url = _link(world, "alice", study=study, ttl=1).json()["url"]
    token = url.rsplit("/", 1)[1]
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["exam"] = world["exams"][2]  # bob's
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    tampered = url.replace(token, f"{header}.{forged}.{signature}")
    for bad in (tampered, url.replace(token, "x.y.z")):
        response = httpx.get(f"{bad}/studies/{STUDY_ROOT}.{world['exams'][2]}/series")
        assert response.status_code == 401
        assert response.json()["code"] == "invalid_link"
    time.sleep(2.1)
    expired = httpx.get(f"{url}/studies/{study}/series")
    assert expired.status_code == 401
    assert "expired" in expired.json()["detail"]
    # Rotation: a new key signs, the old one still verifies; once withdrawn, its links die.
    link = _link(world, "alice", study=study).json()["url"]
    folder, sections = world["folder"], world["sections"]
    rotated, withdrawn = folder / "rotated.json", folder / "withdrawn.json"
    new = oct_key("new")
    link_key_file(rotated, new, world["old"])
    link_key_file(withdrawn, new)
    suffix = link.split("/links/", 1)[1]
    for keys, status in ((rotated, 200), (withdrawn, 401)):
        links = {**sections["links"], "keys_file": str(keys)}
        other: ProxyServer = world["factory"](
            world["archive"].dicomweb_url, **{**sections, "links": links}
        )
        moved = f"{other.dicomweb_url}/links/{suffix}/studies/{study}/series"
        assert httpx.get(moved).status_code == status, keys.name


def test_a_link_never_goes_upstream(world: dict[str, Any]) -> None:
    """What the proxy sends its PACS, byte for byte, holds neither the link nor its token,
    whatever route the link is used on."""
    archive: OrthancServer = world["archive"]
    target = urlsplit(archive.dicomweb_url)
    assert target.hostname is not None and target.port is not None
    with RecordingRelay((target.hostname, target.port)) as relay:
        proxy: ProxyServer = world["factory"](relay.url(target.path), **world["sections"])
        study = _study(world, 0)
        headers = {"authorization": f"Bearer {world['token']('alice')}"}
        made = httpx.post(proxy.dicomweb_url + "/links", json={"study": study}, headers=headers)
        url = made.json()["url"]
        token = url.rsplit("/", 1)[1]
        series, instance = _image(url, study)
        i = f"{url}/studies/{study}/series/{series}/instances/{instance}"
        wado = f"requestType=WADO&studyUID={study}&seriesUID={series}&objectUID={instance}"
        for path in (f"{i}/metadata", f"{i}/frames/1", f"{i}/rendered", f"{url}/wado?{wado}"):
            assert httpx.get(path, timeout=30).status_code == 200, path
        sent = bytes(relay.sent)
    assert b"GET /dicom-web/studies/" in sent  # the relay did see the proxy's requests
    assert token.encode() not in sent and b"/links" not in sent
    assert token.split(".")[2].encode() not in sent  # not even the signature
    assert headers["authorization"].split()[1].encode() not in sent


def test_a_link_is_never_logged(world: dict[str, Any]) -> None:
    study = _study(world, 0)
    url = _link(world, "alice", study=study).json()["url"]
    token = url.rsplit("/", 1)[1]
    assert httpx.get(f"{url}/studies/{study}/series").status_code == 200
    proxy: ProxyServer = world["proxy"]
    path = world["folder"] / "audit.jsonl"

    def audited() -> bool:  # the audit log is written a batch at a time
        lines = [json.loads(line) for line in whole_lines(path)]
        made = any(line.get("event") == "link" and line["subject"] == "alice" for line in lines)
        return made and any(line.get("subject") == "link:alice" for line in lines)

    wait_for(audited, "the audit lines of the link and of its use")
    assert token not in path.read_text() and token not in proxy.log_path.read_text()
