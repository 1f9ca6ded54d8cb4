"""A client's close frees its connection in the proxy at once (issue 19).

Hypercorn 0.18 kept a connection that its client closed between two requests until the
keep-alive timeout (75 s): its descriptor held, the socket in CLOSE_WAIT. Here the proxy runs as
users run it (``serve``, on either engine, one worker and several), and every connection a
client closes, after a search, a probe or a hang-up in the middle of a retrieve, must be gone
within a second.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from shanoir_dicomweb_proxy.testing import OrthancServer, ProxyServer, SampleSet

from .support.settings import CORE_SETTINGS
from .support.sockets import TcpSocket, open_descriptors, server_connections, settle

DICOM = 'multipart/related; type="application/dicom"'


@pytest.fixture(
    scope="module",
    params=[("hypercorn", 1), ("hypercorn", 2), ("uvicorn", 1), ("uvicorn", 2)],
    ids=["hypercorn-1-worker", "hypercorn-2-workers", "uvicorn-1-worker", "uvicorn-2-workers"],
)
def served(
    request: pytest.FixtureRequest, orthanc: OrthancServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyServer]:
    engine, workers = request.param
    settings = {
        **CORE_SETTINGS,
        "server": {"engine": engine},
        "upstream": {"url": orthanc.dicomweb_url},
    }
    workdir: Path = tmp_path_factory.mktemp("connections")
    with ProxyServer(workdir, settings, workers=workers) as proxy:
        yield proxy


def _left(proxy: ProxyServer, client_port: int) -> list[TcpSocket]:
    """What the proxy still holds of the connection from ``client_port``, after a second."""
    return settle(
        lambda: [s for s in server_connections(proxy.port) if s.remote_port == client_port],
        lambda held: not held,
        within=1.0,
    )


def _search(proxy: ProxyServer) -> tuple[int, int]:
    """One search on a kept-alive connection, closed by the client a moment after the whole
    answer (as a browser or a pooled client does: the connection is idle by then).
    Returns the status and the client's port."""
    with httpx.Client() as client:
        response = client.get(proxy.dicomweb_url + "/studies", params={"limit": "1"})
        port: int = response.extensions["network_stream"].get_extra_info("client_addr")[1]
        time.sleep(0.1)
    return response.status_code, port


def test_a_closed_connection_is_freed_after_a_search(served: ProxyServer) -> None:
    status, port = _search(served)
    assert status == 200
    assert _left(served, port) == []


def test_every_closed_connection_is_freed(served: ProxyServer) -> None:
    with httpx.Client() as client:
        assert client.get(served.url + "/healthz").status_code == 200
        assert client.get(served.dicomweb_url + "/studies").status_code == 200
    ports = [_search(served)[1] for _ in range(5)]
    held = settle(
        lambda: [s for s in server_connections(served.port) if s.remote_port in ports],
        lambda held: not held,
        within=1.0,
    )
    assert held == []
    # Nothing of the client's at all: its httpx connection went too.
    assert settle(lambda: server_connections(served.port), lambda s: not s, 1.0) == []


def test_a_hangup_mid_retrieve_is_freed(served: ProxyServer, samples: SampleSet) -> None:
    large = samples.large
    path = f"/studies/{large.study_uid}/series/{large.series_uid}/instances/{large.sop_uid}"
    with socket.create_connection(("127.0.0.1", served.port)) as sock:
        port = sock.getsockname()[1]
        head = f"GET {served.base_path}{path} HTTP/1.1\r\nHost: proxy\r\nAccept: {DICOM}\r\n\r\n"
        sock.sendall(head.encode())
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    assert _left(served, port) == []


def test_descriptors_come_back_to_idle(proxy: ProxyServer) -> None:
    served = proxy  # one worker: its descriptors are the server's
    idle = settle(lambda: open_descriptors(served.pid)["socket"], lambda _: True, 0)
    for _ in range(10):
        _search(served)
    # Upstream connections may stay pooled a little; client ones must all be gone.
    assert settle(lambda: server_connections(served.port), lambda s: not s, 1.0) == []
    sockets = settle(
        lambda: open_descriptors(served.pid)["socket"], lambda n: n <= idle + 4, within=1.0
    )
    assert sockets <= idle + 4, f"{sockets} sockets open, {idle} when idle"
