"""Two replicas behind one Service: two proxy processes on two ports, in front of the same
Orthanc and the same platform (the ``http`` backends), answer a user's requests alike whichever
gets them, and both refuse within ``[access] cache_ttl`` once the platform revokes a right.
The proxy keeps nothing but caches: this is what scaling out (docs/scaling.md) relies on.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from shanoir_dicomweb_proxy import Settings
from shanoir_dicomweb_proxy._auth import dev_token
from shanoir_dicomweb_proxy.testing import OrthancServer, ProxyServer

from .support.keys import rsa_key_file
from .support.loopback_http import WholePlatform, serving
from .support.settings import ProxyFactory

TTL = 1.0  # [access] cache_ttl
STUDY_ROOT, SERIES_ROOT = "1.4.9.1", "1.4.9.2"


@pytest.fixture(scope="module")
def platform(orthanc: OrthancServer) -> WholePlatform:
    response = httpx.get(f"{orthanc.dicomweb_url}/studies", timeout=30)
    uids = sorted(row["0020000D"]["Value"][0] for row in response.json())[:2]
    return WholePlatform(studies={1: uids[0], 2: uids[1]}, grants={("7", "read"): [1, 2]})


@pytest.fixture(scope="module")
def replicas(
    tmp_path_factory: pytest.TempPathFactory,
    orthanc: OrthancServer,
    proxy_factory: ProxyFactory,
    platform: WholePlatform,
) -> Iterator[tuple[ProxyServer, ProxyServer, str]]:
    folder = tmp_path_factory.mktemp("replicas")
    keys = folder / "keys.json"
    rsa_key_file(keys)
    with serving(platform) as server:
        sections: dict[str, Any] = {
            "auth": {"enabled": True, "jwks_file": str(keys)},
            "mapping": {
                "backend": "http",
                "url": server.url,
                "study_root": STUDY_ROOT,
                "series_root": SERIES_ROOT,
            },
            "access": {"backend": "http", "url": server.url, "cache_ttl": TTL},
            "logging": {"audit_log": ""},
        }
        first = proxy_factory(orthanc.dicomweb_url, **sections)
        second = proxy_factory(orthanc.dicomweb_url, **sections)
        settings = Settings.from_toml(Path(first.config_path))
        token = dev_token(settings, "alice", {"userId": "7"}, ttl=600)
        yield first, second, token


def _get(proxy: ProxyServer, token: str, path: str) -> httpx.Response:
    return httpx.get(
        proxy.dicomweb_url + path,
        headers={"authorization": f"Bearer {token}", "accept": "application/dicom+json"},
        timeout=30,
    )


def _same(proxy: ProxyServer, response: httpx.Response) -> str:
    """The answer, with the replica's own address (in its links) taken out."""
    return response.text.replace(proxy.dicomweb_url, "PUBLIC")


def test_replicas_answer_alike_and_both_refuse_after_a_revoke(
    replicas: tuple[ProxyServer, ProxyServer, str], platform: WholePlatform
) -> None:
    first, second, token = replicas
    platform.grants[("7", "read")] = [1, 2]  # as granted before (each transport's replicas)
    exam = f"/studies/{STUDY_ROOT}.1"
    answers = {}
    for proxy in (first, second, first, second):  # alternately, as a Service spreads them
        search = _get(proxy, token, "/studies")
        assert search.status_code == 200, search.text
        found = sorted(row["0020000D"]["Value"][0] for row in search.json())
        assert found == [f"{STUDY_ROOT}.1", f"{STUDY_ROOT}.2"]
        metadata = _get(proxy, token, exam + "/metadata")
        assert metadata.status_code == 200, metadata.text
        answers.setdefault("search", set()).add(_same(proxy, search))
        answers.setdefault("metadata", set()).add(_same(proxy, metadata))
    assert {name: len(seen) for name, seen in answers.items()} == {"search": 1, "metadata": 1}

    platform.grants[("7", "read")] = [2]  # revoked in the platform, which no replica is told
    revoked = time.monotonic()
    refused: dict[str, float] = {}
    while len(refused) < 2 and time.monotonic() - revoked < TTL + 5:
        for name, proxy in (("first", first), ("second", second)):
            if name not in refused and _get(proxy, token, exam + "/metadata").status_code == 404:
                refused[name] = time.monotonic() - revoked
        time.sleep(0.05)
    assert set(refused) == {"first", "second"}
    # Within the cache's lifetime, plus the time one poll round takes.
    assert max(refused.values()) <= TTL + 0.5, refused
    for proxy in (first, second):
        assert _get(proxy, token, exam + "/metadata").status_code == 404
        search = _get(proxy, token, "/studies")
        assert [row["0020000D"]["Value"][0] for row in search.json()] == [f"{STUDY_ROOT}.2"]
        assert _get(proxy, token, f"/studies/{STUDY_ROOT}.2/metadata").status_code == 200
