"""Streaming against the real Orthanc: bounded memory, hang-ups, pooled connections.

Only a real server on loopback can show this (httpx.ASGITransport buffers whole bodies).
"""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest

from shanoir_dicomweb_proxy.testing import OrthancServer, ProxyServer, SampleSet

from .support.dicomweb import DICOM
from .support.settings import ProxyFactory

MB = 1024 * 1024


def _large_path(samples: SampleSet) -> str:
    large = samples.large
    return f"/studies/{large.study_uid}/series/{large.series_uid}/instances/{large.sop_uid}"


@pytest.mark.slow
def test_slow_reader_does_not_grow_memory(proxy: ProxyServer, samples: SampleSet) -> None:
    """A client reading 57.7 MB at ~25 MB/s: the proxy must not buffer what it cannot send."""
    baseline = proxy.rss()
    peak = baseline
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, proxy.rss())
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    received = 0
    try:
        with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            request = (
                f"GET {proxy.base_path}{_large_path(samples)} HTTP/1.1\r\n"
                f"Host: 127.0.0.1:{proxy.port}\r\nAccept: {DICOM}\r\nConnection: close\r\n\r\n"
            )
            sock.sendall(request.encode())
            while chunk := sock.recv(256 * 1024):
                received += len(chunk)
                time.sleep(0.01)
    finally:
        done.set()
        sampler.join()
    assert received > samples.large.path.stat().st_size
    growth = peak - baseline
    assert growth < 32 * MB, f"proxy RSS grew by {growth / MB:.1f} MB"


def test_hangups_do_not_leak_upstream_connections(
    orthanc: OrthancServer, proxy_factory: ProxyFactory, samples: SampleSet
) -> None:
    # With two upstream connections at most, leaked ones would block the next request.
    proxy = proxy_factory(
        orthanc.dicomweb_url,
        upstream={"max_connections": 2, "max_keepalive_connections": 2, "pool_timeout": 3.0},
    )
    url = proxy.dicomweb_url + _large_path(samples)
    for _ in range(5):
        with httpx.stream("GET", url, headers={"accept": DICOM}) as response:
            assert response.status_code == 200
            next(response.iter_raw())  # then hang up mid-body
    study = samples.small_studies[0]
    series = study.series[0]
    for _ in range(3):
        response = httpx.get(
            f"{proxy.dicomweb_url}/studies/{study.uid}/series/{series.uid}", timeout=10
        )
        assert response.status_code == 200


def test_stale_pooled_connection_is_retried(
    orthanc: OrthancServer, proxy_factory: ProxyFactory
) -> None:
    # Orthanc closes idle connections after 1 s; keep them pooled longer than that.
    proxy = proxy_factory(orthanc.dicomweb_url, upstream={"keepalive_expiry": 30.0})
    with httpx.Client() as client:
        for _ in range(3):
            response = client.get(proxy.dicomweb_url + "/studies", params={"limit": "1"})
            assert response.status_code == 200
            time.sleep(1.3)


@pytest.mark.parametrize("workers", [2])
def test_several_workers(
    orthanc: OrthancServer, workers: int, tmp_path_factory: pytest.TempPathFactory
) -> None:
    settings = {
        "auth": {"enabled": False},
        "mapping": {"backend": "identity"},
        "access": {"backend": "allow_all"},
        "upstream": {"url": orthanc.dicomweb_url},
    }
    with ProxyServer(tmp_path_factory.mktemp("workers"), settings, workers=workers) as proxy:
        for _ in range(4):
            response = httpx.get(proxy.dicomweb_url + "/studies", params={"limit": "2"})
            assert response.status_code == 200 and len(response.json()) == 2
