"""Graceful shutdown: on SIGTERM the proxy stops listening and lets streams in flight finish."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from shanoir_dicomweb_proxy.testing import ProxyServer

from .support.faults import SLOW_CHUNKS, FaultServer
from .support.settings import CORE_SETTINGS

RETRIEVE = "/studies/1.2/series/3.4/instances/5.6"
BODY = SLOW_CHUNKS * 65536  # sent over about 3 s


@pytest.fixture
def slow() -> Iterator[FaultServer]:
    server = FaultServer(mode="slow").start()
    yield server
    server.stop()


def _proxy(
    tmp_path: Path, slow: FaultServer, grace: float, workers: int = 1, engine: str = "hypercorn"
) -> ProxyServer:
    settings = {
        **CORE_SETTINGS,
        "server": {"shutdown_grace": grace, "engine": engine},
        "upstream": {"url": slow.url},
    }
    return ProxyServer(tmp_path / "proxy", settings, workers=workers)


class _Download(threading.Thread):
    """Reads the slow retrieve through the proxy; says when the headers are in."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.started = threading.Event()
        self.received = 0
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            with httpx.stream("GET", self.url + RETRIEVE, timeout=30) as response:
                assert response.status_code == 200
                self.started.set()
                for chunk in response.iter_raw():
                    self.received += len(chunk)
        except Exception as exc:
            self.error = exc
        finally:
            self.started.set()


def _refused(port: int, within: float) -> bool:
    """Whether new connections are refused on ``port`` within ``within`` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        except OSError:
            return True
        time.sleep(0.05)
    return False


def _wait_exit(proxy: ProxyServer, within: float) -> int | None:
    proc = proxy._proc
    assert proc is not None
    try:
        return proc.wait(within)
    except Exception:
        return None


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["hypercorn", "uvicorn"])
@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_lets_a_stream_in_flight_finish(
    tmp_path: Path, slow: FaultServer, workers: int, engine: str
) -> None:
    proxy = _proxy(tmp_path, slow, grace=20, workers=workers, engine=engine)
    proxy.start()
    try:
        download = _Download(proxy.dicomweb_url)
        download.start()
        assert download.started.wait(10) and download.error is None
        os.kill(proxy.pid, signal.SIGTERM)
        # Not listening any more, while the stream still runs.
        assert _refused(proxy.port, within=2.0)
        assert download.is_alive()
        download.join(20)
        assert download.error is None
        assert download.received == BODY
        assert _wait_exit(proxy, within=10) == 0
    finally:
        proxy.stop()


@pytest.mark.parametrize("engine", ["hypercorn", "uvicorn"])
def test_streams_past_the_grace_period_are_cut(
    tmp_path: Path, slow: FaultServer, engine: str
) -> None:
    proxy = _proxy(tmp_path, slow, grace=0.5, engine=engine)
    proxy.start()
    try:
        download = _Download(proxy.dicomweb_url)
        download.start()
        assert download.started.wait(10) and download.error is None
        sent = time.monotonic()
        os.kill(proxy.pid, signal.SIGTERM)
        download.join(20)
        # The client sees a failed transfer, never a short body taken for a whole one.
        assert isinstance(download.error, httpx.TransportError)
        assert download.received < BODY
        assert _wait_exit(proxy, within=10) is not None
        assert time.monotonic() - sent < 2.5  # well before the stream's 3 s
    finally:
        proxy.stop()
