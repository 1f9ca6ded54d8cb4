"""What the proxy does when the upstream misbehaves, and what crosses it in each direction.

A small misbehaving server (tests/support/faults.py) stands in for failures that a real Orthanc
will not produce on demand.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from shanoir_dicomweb_proxy.testing import ProxyServer, free_port

from .support.faults import FaultServer
from .support.settings import ProxyFactory

RETRIEVE = "/studies/1.2.3/series/4.5.6"


@pytest.fixture(scope="module")
def fault() -> Iterator[FaultServer]:
    server = FaultServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def faulty_proxy(fault: FaultServer, proxy_factory: ProxyFactory) -> ProxyServer:
    return proxy_factory(fault.url, upstream={"read_timeout": 1.5})


def _problem(response: httpx.Response, status: int) -> dict[str, object]:
    assert response.status_code == status
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, object] = response.json()
    assert body["status"] == status
    return body


def test_connection_refused_is_502(proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory(f"http://127.0.0.1:{free_port()}/dicom-web")
    body = _problem(httpx.get(proxy.dicomweb_url + "/studies"), 502)
    assert body["code"] == "upstream_unavailable"


def test_timeout_is_504(fault: FaultServer, faulty_proxy: ProxyServer) -> None:
    fault.mode = "silent"
    started = time.monotonic()
    body = _problem(httpx.get(faulty_proxy.dicomweb_url + "/studies", timeout=10), 504)
    assert body["code"] == "upstream_timeout"
    assert 1.4 < time.monotonic() - started < 8


def test_upstream_500_is_502_without_its_body(
    fault: FaultServer, faulty_proxy: ProxyServer
) -> None:
    fault.mode = "error500"
    response = httpx.get(faulty_proxy.dicomweb_url + "/studies")
    _problem(response, 502)
    assert b"secret" not in response.content


@pytest.mark.parametrize("mode", ["reset", "eof"])
def test_failure_mid_body_aborts_the_client(
    fault: FaultServer, faulty_proxy: ProxyServer, mode: str
) -> None:
    # A truncated series must never look complete: the client's read has to fail.
    fault.mode = mode
    received = 0
    with pytest.raises(httpx.TransportError):  # noqa: PT012
        with httpx.stream("GET", faulty_proxy.dicomweb_url + RETRIEVE) as response:
            assert response.status_code == 200
            for chunk in response.iter_raw():
                received += len(chunk)
    assert received > 0


def test_client_hangup_before_first_byte_cancels_upstream(
    fault: FaultServer, faulty_proxy: ProxyServer
) -> None:
    fault.mode = "silent"
    fault.disconnects.clear()
    with pytest.raises(httpx.ReadTimeout):
        httpx.get(faulty_proxy.dicomweb_url + RETRIEVE, timeout=0.3)
    deadline = time.monotonic() + 1.2  # before the proxy's own 1.5 s read timeout
    while not fault.disconnects and time.monotonic() < deadline:
        time.sleep(0.02)
    assert fault.disconnects, "the upstream request outlived the client"


def test_client_hangup_mid_stream_cancels_upstream(
    fault: FaultServer, faulty_proxy: ProxyServer
) -> None:
    fault.mode = "trickle"
    fault.disconnects.clear()
    with httpx.stream("GET", faulty_proxy.dicomweb_url + RETRIEVE) as response:
        next(response.iter_raw())
    deadline = time.monotonic() + 5
    while not fault.disconnects and time.monotonic() < deadline:
        time.sleep(0.02)
    assert fault.disconnects, "the upstream kept streaming to nobody"


def test_headers_in_both_directions(fault: FaultServer, faulty_proxy: ProxyServer) -> None:
    fault.mode = "etag"
    response = httpx.get(
        faulty_proxy.dicomweb_url + "/studies",
        params={"PatientName": "Doe^J*", "includefield": "00081030,00080060"},
        headers={
            "authorization": "Bearer client-token",
            "cookie": "sid=client",
            "accept": "application/dicom+json",
            "x-forwarded-for": "10.0.0.1",
            "connection": "keep-alive, x-private",
            "x-private": "1",
        },
    )
    assert response.status_code == 200
    sent = fault.last_request.lower()
    # The query reaches the upstream with DICOM's special characters literal.
    assert sent.startswith(
        b"get /dicom-web/studies?patientname=doe^j*&includefield=00081030,00080060 http/1.1"
    )
    for secret in (b"client-token", b"sid=client", b"10.0.0.1", b"x-private"):
        assert secret not in sent
    assert b"accept: application/dicom+json" in sent
    assert b"accept-encoding: identity" in sent
    # The upstream's cookie and its own challenge stay behind; its ETag comes through.
    assert response.headers["etag"] == '"v1"'
    assert "set-cookie" not in response.headers
    assert "www-authenticate" not in response.headers


def test_if_none_match_passes_through(fault: FaultServer, faulty_proxy: ProxyServer) -> None:
    fault.mode = "etag"
    response = httpx.get(faulty_proxy.dicomweb_url + "/studies", headers={"if-none-match": '"v1"'})
    assert response.status_code == 304
    assert response.headers["etag"] == '"v1"'


def test_invalid_routes_never_reach_the_upstream(
    fault: FaultServer, faulty_proxy: ProxyServer
) -> None:
    fault.mode = "json"
    before = fault.requests
    base = faulty_proxy.dicomweb_url
    unknown = (404, "not a DICOMweb resource")
    frames = "frame numbers are from 1 to 999999999 (PS3.18 \u00a78.3.5.1.1)"
    for method, path, (status, detail) in [
        ("DELETE", "/studies/1.2.3", (405, "DELETE is not allowed on this resource")),
        ("GET", "/studies/1.2.3/reject/113001%5EDCM", unknown),
        ("POST", "/studies/1.2.3/series", (405, "POST is not allowed on this resource")),
        ("GET", "/../aets", unknown),
        ("GET", "/studies/1.2.3/..%2F..%2Fadmin", unknown),
        ("GET", "/studies/1.2.x", unknown),
        ("GET", "/studies/1.2.3/series/4.5/instances/6.7/frames/0", (400, frames)),
        ("PUT", "/studies", (405, "PUT is not allowed on this resource")),
    ]:
        response = httpx.request(method, base + path)
        assert (response.status_code, response.json()["detail"]) == (status, detail), path
        assert response.headers["content-type"] == "application/problem+json"
    response = httpx.get(faulty_proxy.url + "/dicom-web/studies")  # outside base_path
    assert response.status_code == 404
    assert fault.requests == before


def test_upstream_cookies_are_never_replayed(fault: FaultServer, faulty_proxy: ProxyServer) -> None:
    # The upstream client is shared by every user: a cookie set for one request must not be
    # sent with the next one, which may be another user's.
    fault.mode = "etag"
    for _ in range(2):
        assert httpx.get(faulty_proxy.dicomweb_url + "/studies").status_code == 200
        assert b"cookie" not in fault.last_request.lower()
