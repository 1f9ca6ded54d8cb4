"""A series under another study's path is refused by the proxy itself, before the upstream is
asked anything: the upstream here is a lenient one that serves any series under any study
path (what Orthanc would serve for the series alone), so no PACS refusal can stand in for the
proxy's check (DESIGN §4: "the proxy never trusts the PACS for that")."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from shanoir_dicomweb_proxy import Settings
from shanoir_dicomweb_proxy._auth import dev_token
from shanoir_dicomweb_proxy._store import SqliteStore
from shanoir_dicomweb_proxy.testing import OrthancServer

from .support.archive import SEG_SERIES, SERIES_ROOT, STUDY_ROOT
from .support.dicomweb import DICOM
from .support.keys import rsa_key_file
from .support.loopback_http import running
from .support.settings import ProxyFactory

_SERIES_PATH = re.compile(r"^(/dicom-web/studies/)([^/?]+)(/series/)([^/?]+)(.*)$")


class _LenientPacs(ThreadingHTTPServer):
    """Relays every request to Orthanc, but serves a series under whatever study path it is
    asked for: the study of the path is replaced by the series' own. Records every path."""

    daemon_threads = True

    def __init__(self, orthanc: str, study_of: dict[str, str]) -> None:
        super().__init__(("127.0.0.1", 0), _LenientHandler)
        self.orthanc = orthanc  # scheme://host:port
        self.study_of = study_of  # real series UID → its real study UID
        self.paths: list[str] = []
        self.lock = threading.Lock()

    @property
    def dicomweb_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/dicom-web"


class _LenientHandler(BaseHTTPRequestHandler):
    server: _LenientPacs

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        with self.server.lock:
            self.server.paths.append(self.path)
        path = self.path
        match = _SERIES_PATH.match(path)
        if match and match.group(4) in self.server.study_of:
            head, _, middle, series, rest = match.groups()
            path = f"{head}{self.server.study_of[series]}{middle}{series}{rest}"
        accept = self.headers.get("accept", "*/*")
        answer = httpx.get(self.server.orthanc + path, headers={"accept": accept}, timeout=30)
        self.send_response(answer.status_code)
        self.send_header("content-type", answer.headers.get("content-type", "text/plain"))
        self.send_header("content-length", str(len(answer.content)))
        self.end_headers()
        self.wfile.write(answer.content)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def site(
    tmp_path_factory: pytest.TempPathFactory,
    archive: OrthancServer,
    store_path: Path,
    proxy_factory: ProxyFactory,
) -> Iterator[dict[str, Any]]:
    """Alice may read examinations A and B (the SEG's), not C nor D; the SEG's series and one
    of D's are left out of the map (``unmapped_series = "expose"``); the proxy's upstream is
    lenient."""
    folder = tmp_path_factory.mktemp("foreign-series")
    store = folder / "store.sqlite3"
    with SqliteStore(store_path) as full:
        synced = [e for e in full.entries() if e.acquisitions]
    study_of = {s.series_uid: e.study_uid for e in synced for s in e.acquisitions}
    seg = study_of[SEG_SERIES]
    several = [e for e in synced if len(e.acquisitions) > 1 and e.study_uid != seg]
    d_unmapped = several[2].acquisitions[-1].series_uid
    unmapped = {SEG_SERIES, d_unmapped}
    with SqliteStore(store) as opened:
        for entry in synced:
            series = [x.series_uid for x in entry.acquisitions if x.series_uid not in unmapped]
            opened.register(entry.study_uid, series)
        by_study = {e.study_uid: e for e in opened.entries()}
        a, c, d = (by_study[e.study_uid] for e in several[:3])
        b = by_study[seg]
        for exam in (a, b):
            opened.grant("alice", exam.exam_id, "read")
    orthanc = archive.dicomweb_url.rsplit("/dicom-web", 1)[0]
    instances = {  # the first instance of each examination's first series
        e.exam_id: httpx.get(
            f"{archive.dicomweb_url}/studies/{e.study_uid}/series/"
            f"{e.acquisitions[0].series_uid}/instances"
        ).json()[0]["00080018"]["Value"][0]
        for e in (a, b, c)
    }
    keys = folder / "keys.json"
    rsa_key_file(keys)
    with running(_LenientPacs(orthanc, study_of)) as pacs:
        proxy = proxy_factory(
            pacs.dicomweb_url,
            auth={"enabled": True, "jwks_file": str(keys), "audience": ["dicomweb-proxy"]},
            mapping={
                "backend": "sqlite",
                "study_root": STUDY_ROOT,
                "series_root": SERIES_ROOT,
                "unmapped_series": "expose",
            },
            access={"backend": "sqlite"},
            store={"path": str(store)},
        )
        settings = Settings.from_toml(proxy.config_path)
        token = dev_token(settings, "alice", {"userId": "alice"}, ttl=600)
        headers = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=proxy.dicomweb_url, headers=headers, timeout=60) as alice:
            yield {
                "pacs": pacs,
                "alice": alice,
                "a": a,
                "b": b,
                "c": c,
                "instances": instances,
                "unmapped": {"b": SEG_SERIES, "d": d_unmapped},
            }


def _public_series(entry: Any) -> str:
    return f"{SERIES_ROOT}.{entry.acquisitions[0].acquisition_id}"


def _routes(instance: str) -> list[tuple[str, str]]:
    """Routes under a series, each with what it accepts."""
    return [
        ("/metadata", "application/dicom+json"),
        ("", DICOM),
        ("/instances", "application/dicom+json"),
        (f"/instances/{instance}/metadata", "application/dicom+json"),
        (f"/instances/{instance}", DICOM),
    ]


_REFUSED = {"status": 404, "code": "not_found", "detail": "no such series"}


def test_the_lenient_upstream_serves_a_series_under_any_study(site: dict[str, Any]) -> None:
    """The premise: asked directly, this upstream does not refuse a foreign series."""
    a, c = site["a"], site["c"]
    series = c.acquisitions[0].series_uid
    path = f"{site['pacs'].dicomweb_url}/studies/{a.study_uid}/series/{series}/metadata"
    response = httpx.get(path, headers={"accept": "application/dicom+json"}, timeout=30)
    assert response.status_code == 200
    assert response.json()[0]["0020000E"]["Value"] == [series]


@pytest.mark.parametrize("owner", ["b", "c"])  # readable by alice, and not
def test_a_foreign_series_under_a_readable_study_is_refused_before_the_upstream(
    site: dict[str, Any], owner: str
) -> None:
    alice, pacs = site["alice"], site["pacs"]
    mine = f"{STUDY_ROOT}.{site['a'].exam_id}"
    own, foreign = _public_series(site["a"]), _public_series(site[owner])
    instances = site["instances"]
    # Alice's own series answers through this upstream: the routes below are served.
    for suffix, accept in _routes(instances[site["a"].exam_id]):
        response = alice.get(f"/studies/{mine}/series/{own}{suffix}", headers={"Accept": accept})
        assert response.status_code == 200, (suffix, response.text[:200])
    missing = alice.get(f"/studies/{mine}/series/{SERIES_ROOT}.999999/metadata")
    assert missing.status_code == 404 and missing.json() == _REFUSED
    with pacs.lock:
        pacs.paths.clear()
    for suffix, accept in _routes(instances[site[owner].exam_id]):
        path = f"/studies/{mine}/series/{foreign}{suffix}"
        response = alice.get(path, headers={"Accept": accept})
        assert response.status_code == 404, (path, response.status_code, response.text[:200])
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json() == _REFUSED, path
        assert response.content == missing.content
    with pacs.lock:
        assert pacs.paths == []  # nothing was asked of the upstream, not even a check


@pytest.mark.parametrize("owner", ["b", "d"])  # readable by alice, and not
def test_an_unmapped_series_of_another_study_is_refused_after_asking_where_it_is(
    site: dict[str, Any], owner: str
) -> None:
    """A series the map does not know stands for itself: the upstream is asked which study
    holds it (a search), and the series is refused under any other study's path; the resource
    itself is never asked for."""
    alice, pacs = site["alice"], site["pacs"]
    mine = f"{STUDY_ROOT}.{site['a'].exam_id}"
    series = site["unmapped"][owner]
    # Under its own study (when readable), the unmapped series is served.
    seg_study = f"{STUDY_ROOT}.{site['b'].exam_id}"
    assert alice.get(f"/studies/{seg_study}/series/{SEG_SERIES}/metadata").status_code == 200
    with pacs.lock:
        pacs.paths.clear()
    for suffix, accept in _routes("0")[:3]:
        path = f"/studies/{mine}/series/{series}{suffix}"
        response = alice.get(path, headers={"Accept": accept})
        assert response.status_code == 404, (path, response.status_code, response.text[:200])
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json() == _REFUSED, path
    with pacs.lock:
        assert pacs.paths and all(p.startswith("/dicom-web/series?") for p in pacs.paths), (
            pacs.paths
        )
