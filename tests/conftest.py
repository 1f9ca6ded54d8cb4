"""Session fixtures: the real Orthanc upstream with sample data, and proxies in front of it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from shanoir_dicomweb_proxy.testing import OrthancServer, ProxyServer, SampleSet, generate_samples

from .archive import archive, real_uids, store_path

__all__ = ["archive", "real_uids", "store_path"]  # session fixtures of the second archive

# Identity mapping, no authentication: the gateway core on its own.
CORE_SETTINGS: dict[str, Any] = {
    "auth": {"enabled": False},
    "mapping": {"backend": "identity"},
    "access": {"backend": "allow_all"},
}


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


ProxyFactory = Callable[..., ProxyServer]


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
