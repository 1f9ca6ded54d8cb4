"""The faults of issue 19 that tests/test_upstream_faults.py (a scripted upstream) does not
cover, on real processes: Orthanc killed and restarted under a running proxy, the disk holding
the upload spool full, a thousand idle connections, slowloris clients.

(Stalled upstream: ``test_timeout_is_504``; reset mid retrieve: ``test_failure_mid_body_aborts
_the_client``; identity provider down: tests/test_auth_idp.py; platform down:
``test_policy_down_is_503_and_nothing_reaches_the_pacs``, ``test_shanoir_down_or_slow_is_503
_without_its_words``.)
"""

from __future__ import annotations

import contextlib
import json
import resource
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import httpx
import pytest

from shanoir_dicomweb_proxy.testing import OrthancServer, ProxyServer, SampleSet, free_port

from .support.settings import ProxyFactory
from .support.sockets import server_connections, settle

DICOM = 'multipart/related; type="application/dicom"'
BOUNDARY = "faults-boundary"


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    """An Orthanc of its own, empty: killed, restarted and uploaded to here."""
    with OrthancServer(tmp_path_factory.mktemp("faults-orthanc")) as server:
        yield server


def _instances(pacs: OrthancServer) -> int:
    return len(httpx.get(pacs.url + "/instances", timeout=10).json())


def test_orthanc_killed_is_502_fast_then_200_when_it_is_back(
    pacs: OrthancServer, proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(pacs.dicomweb_url)
    search = proxy.dicomweb_url + "/studies"
    with httpx.Client(timeout=10) as client:
        assert client.get(search).status_code == 200  # a pooled connection to Orthanc now
        pacs.kill()
        try:
            for _ in range(3):
                started = time.monotonic()
                response = client.get(search)
                assert response.status_code == 502, response.text
                assert response.json()["code"] == "upstream_unavailable"
                assert time.monotonic() - started < 0.5
        finally:
            pacs.start()
        back = time.monotonic()
        assert client.get(search).status_code == 200  # the same proxy process, not restarted
        assert time.monotonic() - back < 1.0


class _LimitedProxy(ProxyServer):
    """The proxy with no file allowed past ``fsize`` bytes: writing past it fails as on a full
    disk (EFBIG where a full disk says ENOSPC; Python ignores SIGXFSZ)."""

    def __init__(self, workdir: Path, settings: dict[str, Any], *, fsize: int) -> None:
        super().__init__(workdir, settings)
        self.fsize = fsize

    def _popen(
        self,
        command: Sequence[str],
        *,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
        log_mode: Literal["ab", "wb"] = "ab",
    ) -> subprocess.Popen[bytes]:
        limited = ["prlimit", f"--fsize={self.fsize}", "--", *command]
        return super()._popen(limited, cwd=cwd, env=env, log_mode=log_mode)


def _upload(proxy: ProxyServer, body: bytes) -> tuple[bytes, float]:
    return _upload_to(proxy.port, proxy.base_path + "/studies", body)


def _upload_to(port: int, path: str, body: bytes) -> tuple[bytes, float]:
    """POST ``body`` chunked on a raw socket while reading the answer, as a client that
    notices an early answer does: the whole answer, and how long the server kept the
    connection open after it (at most 10 s)."""
    sock = socket.create_connection(("127.0.0.1", port))
    head = (
        f"POST {path} HTTP/1.1\r\nHost: proxy\r\n"
        f"Transfer-Encoding: chunked\r\nContent-Type: {DICOM}; boundary={BOUNDARY}\r\n\r\n"
    )

    def send() -> None:
        with contextlib.suppress(OSError):  # the proxy may close before the end
            sock.sendall(head.encode())
            for start in range(0, len(body), 1 << 20):
                piece = body[start : start + (1 << 20)]
                sock.sendall(b"%x\r\n" % len(piece) + piece + b"\r\n")
            sock.sendall(b"0\r\n\r\n")

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    sock.settimeout(10)
    answer = b""
    answered = 0.0
    with sock:
        while True:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                data = b""
            except TimeoutError:
                break
            if not answered and b"\r\n\r\n" in answer + data:
                answered = time.monotonic()
            if not data:
                break
            answer += data
    return answer, time.monotonic() - answered


def _batch(samples: SampleSet) -> bytes:
    """The 57.7 MB instance as a STOW batch."""
    part = samples.large.path.read_bytes()
    return (
        f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + part
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )


def test_spool_disk_full_fails_the_upload_whole(
    pacs: OrthancServer, samples: SampleSet, tmp_path: Path, transport: str
) -> None:
    settings = {
        "auth": {"enabled": False},
        "mapping": {"backend": "identity"},
        "access": {"backend": "allow_all"},
        "upstream": {"url": pacs.dicomweb_url, "transport": transport},
    }
    before = _instances(pacs)
    # Chunked, so spooled: to a file past 1 MiB, which may not grow past 4 MiB.
    with _LimitedProxy(tmp_path / "proxy", settings, fsize=4 * 1024 * 1024) as proxy:
        answer, held = _upload(proxy, _batch(samples))
        log = proxy.log_path.read_text(errors="replace")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503"), answer[:500]
    assert b"application/problem+json" in head
    assert json.loads(body)["code"] == "spool_unavailable"
    assert held < 1.0, f"the connection stayed open {held:.1f} s after the answer"
    assert "Traceback" not in log
    assert _instances(pacs) == before


_EARLY_ANSWER = """
import asyncio, sys
import uvicorn
from hypercorn.asyncio import serve
from shanoir_dicomweb_proxy._engines import fix_hypercorn, hypercorn_config, uvicorn_options
from shanoir_dicomweb_proxy import Settings

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await receive()
    await asyncio.sleep(0.5)  # the rest of the body piles up meanwhile
    headers = [(b"content-length", b"2")]
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": b"no"})

settings = Settings.from_toml(sys.argv[1])
if settings.server.engine == "uvicorn":  # as serve does
    options = {**uvicorn_options(settings), "lifespan": "off"}
    uvicorn.Server(uvicorn.Config(app, **options)).run()
else:
    fix_hypercorn()
    asyncio.run(serve(app, hypercorn_config(settings, 1)))
"""


@pytest.mark.parametrize("engine", ["hypercorn", "uvicorn"])
def test_an_upload_answered_early_frees_its_connection(
    tmp_path: Path, samples: SampleSet, engine: str
) -> None:
    # An app that answers before reading the whole body (413, a refused token, a failed
    # spool) while the body keeps coming: hypercorn 0.18 held such a connection forever, the
    # rest of the body queued for an app that had returned. Served as `serve` serves.
    port = free_port()
    config = tmp_path / "proxy.toml"
    config.write_text(
        f'[server]\nbind = "127.0.0.1:{port}"\nengine = "{engine}"\n'
        '[upstream]\nurl = "http://x"\n[auth]\nenabled = false\n[mapping]\nbackend = "identity"\n'
    )
    script = tmp_path / "early.py"
    script.write_text(_EARLY_ANSWER)
    with subprocess.Popen([sys.executable, str(script), str(config)]) as server:
        try:
            settle(lambda: _listening(port), bool, 20.0)
            answer, held = _upload_to(port, "/studies", _batch(samples))
        finally:
            server.terminate()
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert held < 1.0, f"the connection stayed open {held:.1f} s after the answer"


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return False
    return True


@pytest.fixture(scope="module")
def many_descriptors() -> Iterator[None]:
    """Room for a thousand connections on both ends (the proxy inherits the limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2600:
        pytest.skip(f"the hard limit of open files is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2600), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture(scope="module")
def served(
    many_descriptors: None, orthanc: OrthancServer, proxy_factory: ProxyFactory
) -> ProxyServer:
    return proxy_factory(orthanc.dicomweb_url)


def _open(proxy: ProxyServer, count: int) -> list[socket.socket]:
    sockets = []
    for _ in range(count):
        sockets.append(socket.create_connection(("127.0.0.1", proxy.port), timeout=5))
    return sockets


def _served_meanwhile(proxy: ProxyServer) -> float:
    """The slowest of 10 searches by another client."""
    slowest = 0.0
    with httpx.Client(timeout=10) as client:
        for _ in range(10):
            started = time.monotonic()
            response = client.get(proxy.dicomweb_url + "/studies", params={"limit": "1"})
            assert response.status_code == 200
            slowest = max(slowest, time.monotonic() - started)
    return slowest


def test_a_thousand_idle_connections_do_not_stop_others(served: ProxyServer) -> None:
    idle = _open(served, 1000)
    try:
        held = settle(lambda: len(server_connections(served.port)), lambda n: n >= 1000, 5.0)
        assert held >= 1000, f"the proxy accepted {held} of 1000 connections"
        assert _served_meanwhile(served) < 1.0
    finally:
        for sock in idle:
            sock.close()
    assert settle(lambda: server_connections(served.port), lambda s: not s, 2.0) == []


def test_slowloris_clients_do_not_stop_others(served: ProxyServer) -> None:
    # Each sends a request head a few bytes at a time and never finishes it.
    slow = _open(served, 300)
    head = f"GET {served.base_path}/studies HTTP/1.1\r\nHost: x\r\nX-Slow: ".encode()
    try:
        for start in range(0, 24, 8):
            for sock in slow:
                sock.sendall(head[start : start + 8])
            assert _served_meanwhile(served) < 1.0
        # A head that never ends is cut at hypercorn's 16 KiB limit, not held as it grows.
        greedy = slow[0]
        greedy.sendall(b"a" * 20000)
        greedy.settimeout(5)
        assert greedy.recv(65536).startswith(b"HTTP/1.1 4")
    finally:
        for sock in slow:
            sock.close()
    assert settle(lambda: server_connections(served.port), lambda s: not s, 2.0) == []
