"""Session fixtures: the real Orthanc upstream with sample data, proxies in front of it, and a
second archive (with a store synced from it) for the translation and access tests.

Helpers shared by the tests are in ``tests/support``; no test imports from this file.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from shanoir_dicomweb_proxy import SqliteStore, Upstream, UpstreamSettings
from shanoir_dicomweb_proxy._store import sync_store
from shanoir_dicomweb_proxy.testing import OrthancServer, ProxyServer, SampleSet, generate_samples

from .support.archive import extra_files
from .support.settings import CORE_SETTINGS, ProxyFactory


@pytest.fixture(scope="session")
def samples(pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> SampleSet:
    # The pytest cache survives sessions, so the 58 MB of samples are written only once.
    cache = getattr(pytestconfig, "cache", None)
    directory = cache.mkdir("dicom-samples") if cache else tmp_path_factory.mktemp("samples")
    return generate_samples(directory)


@pytest.fixture(scope="session")
def orthanc(
    tmp_path_factory: pytest.TempPathFactory, samples: SampleSet
) -> Iterator[OrthancServer]:
    with OrthancServer(tmp_path_factory.mktemp("orthanc")) as server:
        assert server.load(samples.files) == len(samples.files)
        yield server


@pytest.fixture(scope="session", params=["aiohttp", "httpx"])
def transport(request: pytest.FixtureRequest) -> str:
    """Every test with a proxy process runs on both upstream transports."""
    name: str = request.param
    return name


@pytest.fixture(scope="session")
def proxy_factory(
    tmp_path_factory: pytest.TempPathFactory, transport: str
) -> Iterator[ProxyFactory]:
    """Start a proxy process: ``proxy_factory(upstream_url, **sections)``."""
    started: list[ProxyServer] = []

    def start(upstream_url: str, **sections: dict[str, Any]) -> ProxyServer:
        settings = {**CORE_SETTINGS, **sections}
        upstream = {"url": upstream_url, "transport": transport, **sections.get("upstream", {})}
        settings["upstream"] = upstream
        server = ProxyServer(tmp_path_factory.mktemp("proxy"), settings)
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def proxy(orthanc: OrthancServer, proxy_factory: ProxyFactory) -> ProxyServer:
    """The proxy in front of the session's Orthanc, with default settings."""
    return proxy_factory(orthanc.dicomweb_url)


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("work")


# --- the second archive ------------------------------------------------------------------


@pytest.fixture(scope="session")
def archive(
    tmp_path_factory: pytest.TempPathFactory, samples: SampleSet
) -> Iterator[OrthancServer]:
    folder = tmp_path_factory.mktemp("translation")
    extra = extra_files(samples, folder)
    with OrthancServer(folder / "orthanc") as server:
        small = [p for p in samples.files if p != samples.large.path]
        assert server.load([*small, *extra]) == len(small) + len(extra)
        yield server


@pytest.fixture(scope="session")
def store_path(tmp_path_factory: pytest.TempPathFactory, archive: OrthancServer) -> Path:
    path = tmp_path_factory.mktemp("store") / "store.sqlite3"
    upstream = Upstream(UpstreamSettings(url=archive.dicomweb_url, transport="httpx"))

    async def sync() -> None:
        with SqliteStore(path) as store:
            await sync_store(store, upstream)
        await upstream.aclose()

    anyio.run(sync)
    return path


@pytest.fixture(scope="session")
def real_uids(archive: OrthancServer) -> set[str]:
    """Every study and series UID the archive holds, from Orthanc's own REST API."""
    base = archive.dicomweb_url.rsplit("/dicom-web", 1)[0]
    uids: set[str] = set()
    with httpx.Client(base_url=base) as http:
        for level, tag in (("studies", "StudyInstanceUID"), ("series", "SeriesInstanceUID")):
            for entry in http.get(f"/{level}", params={"expand": ""}).json():
                uids.add(entry["MainDicomTags"][tag])
    return uids
