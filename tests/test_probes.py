"""Readiness (``/readyz``), liveness (``/healthz``) and ``check``: the probes they share, against
real upstreams (Orthanc, a local server stopped and started again) and a real identity provider."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from joserfc.jwk import RSAKey

from shanoir_dicomweb_proxy import DicomWebProxy, Settings
from shanoir_dicomweb_proxy._store import SqliteStore
from shanoir_dicomweb_proxy.testing import OrthancServer, ProxyServer, dump_toml, free_port

from .support.asgi import call
from .support.faults import FaultServer
from .support.idp import PROXY_CLIENT_ID, PROXY_CLIENT_SECRET, IdentityProvider
from .support.loopback_http import WholePlatform, serving
from .support.settings import CORE_SETTINGS

SQLITE = {
    "mapping": {"backend": "sqlite", "study_root": "1.4.9.1", "series_root": "1.4.9.2"},
    "access": {"backend": "sqlite"},
    "logging": {"audit_log": ""},
}


class Answering(ThreadingHTTPServer):
    """Answers GET and POST from ``routes`` (path → status and body; else 404) and counts the
    requests per path."""

    daemon_threads = True

    def __init__(self, routes: dict[str, tuple[int, bytes]]) -> None:
        super().__init__(("127.0.0.1", 0), _AnsweringHandler)
        self.routes = routes
        self.hits: Counter[str] = Counter()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _AnsweringHandler(BaseHTTPRequestHandler):
    server: Answering

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        path = self.path.partition("?")[0]
        self.server.hits[path] += 1
        status, body = self.server.routes.get(path, (404, b"{}"))
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET  # noqa: N815

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def answering() -> Iterator[Answering]:
    server = Answering({})
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture
def fault() -> Iterator[FaultServer]:
    server = FaultServer("json").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def idp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IdentityProvider]:
    with IdentityProvider(tmp_path_factory.mktemp("idp")) as provider:
        yield provider


def _public_jwks() -> dict[str, Any]:
    key = RSAKey.generate_key(2048, parameters={"kid": "k1"}, private=True)
    return {"keys": [key.as_dict(private=False)]}


def _jwks_file(tmp_path: Path) -> str:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(_public_jwks()))
    return str(path)


def _app(upstream_url: str, **sections: Any) -> DicomWebProxy:
    data = {**CORE_SETTINGS, **sections, "upstream": {"url": upstream_url}}
    return DicomWebProxy(Settings.from_dict(data))


async def _readyz(app: DicomWebProxy, path: bytes = b"/readyz") -> tuple[int, dict[str, Any]]:
    answer = await call(app, "GET", path)
    assert answer.headers[b"content-type"] == b"application/json"
    assert answer.headers[b"cache-control"] == b"no-store"
    return answer.status, json.loads(answer.body)


def _wait_status(url: str, status: int, timeout: float = 10.0) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while True:
        response = httpx.get(url, timeout=5)
        if response.status_code == status or time.monotonic() > deadline:
            return response
        time.sleep(0.1)


# --- /readyz and /healthz in a server process ---------------------------------------------------


def test_readyz_flips_with_the_upstream(tmp_path: Path, fault: FaultServer) -> None:
    settings = {**CORE_SETTINGS, "auth": {"jwks_file": _jwks_file(tmp_path)}}
    with ProxyServer(tmp_path / "proxy", {**settings, "upstream": {"url": fault.url}}) as proxy:
        assert httpx.get(proxy.dicomweb_url + "/studies").status_code == 401  # auth is on
        ready = httpx.get(proxy.url + "/readyz")  # and the probe needs no token
        assert ready.status_code == 200
        body = ready.json()
        assert body["status"] == "ready"
        assert body["checks"]["upstream"]["ok"] and body["checks"]["issuer"]["ok"]
        assert body["checks"]["upstream"]["detail"] == "QIDO answered 200"
        assert b"accept: application/dicom+json" in fault.last_request.lower()
        assert fault.last_request.startswith(b"GET /dicom-web/studies?limit=1 ")

        fault.stop()
        down = _wait_status(proxy.url + "/readyz", 503)
        assert down.status_code == 503
        body = down.json()
        assert body["status"] == "not ready"
        assert body["checks"]["upstream"] == {
            "ok": False,
            "detail": "unreachable",
            "duration_ms": body["checks"]["upstream"]["duration_ms"],
        }
        assert body["checks"]["issuer"]["ok"]
        health = httpx.get(proxy.url + "/healthz")  # liveness does not follow the upstream
        assert health.status_code == 200 and health.json() == {"status": "ok"}

        revived = FaultServer("json", port=fault.port).start()
        try:
            back = _wait_status(proxy.url + "/readyz", 200)
        finally:
            revived.stop()
        assert back.status_code == 200 and back.json()["status"] == "ready"


def test_readyz_in_front_of_orthanc(tmp_path: Path, orthanc: OrthancServer) -> None:
    path = tmp_path / "store.sqlite3"
    with SqliteStore(path) as store:
        store.register_study("1.2.3.4")
    settings = {
        **CORE_SETTINGS,
        **SQLITE,
        "auth": {"jwks_file": _jwks_file(tmp_path)},
        "store": {"path": str(path)},
        "upstream": {"url": orthanc.dicomweb_url},
    }
    with ProxyServer(tmp_path / "proxy", settings) as proxy:
        response = httpx.get(proxy.url + "/readyz")
    assert response.status_code == 200, response.text
    checks = response.json()["checks"]
    assert set(checks) == {"upstream", "issuer", "store"}
    assert checks["upstream"]["detail"] == "QIDO answered 200"
    assert checks["issuer"]["detail"] == "1 keys from [auth] jwks_file"
    assert checks["store"]["ok"] and checks["store"]["detail"] == "answers"
    # Orthanc's answer holds patient data: none of it may show in the probe's answer.
    assert "00100010" not in response.text and "PatientName" not in response.text


def test_probe_paths_follow_the_settings(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}/dicom-web"
    moved = {**CORE_SETTINGS, "server": {"healthz_path": "", "readyz_path": "/ready"}}
    with ProxyServer(tmp_path / "moved", {**moved, "upstream": {"url": dead}}) as proxy:
        # The test bed waited on /ready, which answers 503 here: the upstream is down.
        ready = httpx.get(proxy.url + "/ready")
        assert ready.status_code == 503 and not ready.json()["checks"]["upstream"]["ok"]
        for path in ("/healthz", "/readyz"):
            response = httpx.get(proxy.url + path)
            assert response.status_code == 404, path
            assert response.json()["code"] == "not_found"
    off = {**CORE_SETTINGS, "server": {"healthz_path": "", "readyz_path": ""}}
    with ProxyServer(tmp_path / "off", {**off, "upstream": {"url": dead}}) as proxy:
        for path in ("/healthz", "/readyz"):
            response = httpx.get(proxy.url + path)
            assert response.status_code == 404, path
        elsewhere = httpx.get(proxy.url + "/elsewhere")
        assert elsewhere.status_code == 404


# --- the probes in-process ----------------------------------------------------------------------


async def test_readiness_is_reused_for_a_second(fault: FaultServer) -> None:
    app = _app(fault.url)
    async with app:
        answers = await asyncio.gather(*(_readyz(app) for _ in range(20)))
        assert {status for status, _ in answers} == {200}
        assert fault.requests == 1  # twenty probes, one upstream request
        fault.stop()
        status, _ = await _readyz(app)
        assert status == 200 and fault.requests == 1  # still the answer of a moment ago
        await asyncio.sleep(1.1)
        status, body = await _readyz(app)
        assert status == 503 and body["checks"]["upstream"]["detail"] == "unreachable"


async def test_an_unreachable_issuer_makes_readiness_fail(fault: FaultServer) -> None:
    issuer = f"http://127.0.0.1:{free_port()}/realms/shanoir-ng"
    app = _app(fault.url, auth={"issuer": issuer})
    async with app:
        status, body = await _readyz(app)
    assert status == 503 and body["status"] == "not ready"
    assert body["checks"]["upstream"]["ok"]
    issuer_check = body["checks"]["issuer"]
    assert not issuer_check["ok"]
    assert issuer_check["detail"] == (
        f"no keys: {issuer}/.well-known/openid-configuration: cannot be reached"
    )


async def test_issuer_keys_are_not_fetched_for_every_probe(
    fault: FaultServer, answering: Answering
) -> None:
    answering.routes["/certs"] = (200, json.dumps(_public_jwks()).encode())
    auth = {"jwks_url": answering.url + "/certs", "jwks_refresh": 1.0, "jwks_min_refetch": 0}
    app = _app(fault.url, auth=auth)
    app.probes.reuse = 0  # every probe runs: only the key store may spare the IdP
    async with app:  # fetches the keys
        for _ in range(5):
            status, body = await _readyz(app)
            assert status == 200, body
        assert answering.hits["/certs"] == 1
        assert body["checks"]["issuer"]["detail"] == "1 keys, fetched 0 s ago"
        answering.shutdown()  # the IdP goes away; its keys are due for a refresh in 1 s
        answering.server_close()
        await asyncio.sleep(1.1)
        status, body = await _readyz(app)
    # Tokens signed with the known keys are still checked: still ready, and it says why.
    assert status == 200
    detail = body["checks"]["issuer"]["detail"]
    assert detail.startswith("1 keys, fetched 1 s ago; the last refresh failed: ")
    assert detail.endswith("/certs: cannot be reached")


async def test_the_store_is_probed(tmp_path: Path, fault: FaultServer) -> None:
    app = _app(fault.url, **SQLITE, store={"path": str(tmp_path / "store.sqlite3")})
    async with app:
        status, body = await _readyz(app)
        assert status == 200
        assert body["checks"]["store"]["detail"] == (
            "answers; empty: `store sync` or `store import` fills it"
        )
        assert app.backends is not None and app.backends.store is not None
        app.backends.store.close()
        await asyncio.sleep(1.1)
        status, body = await _readyz(app)
    assert status == 503
    assert body["checks"]["store"] == {
        "ok": False,
        "detail": "the store is closed",
        "duration_ms": body["checks"]["store"]["duration_ms"],
    }
    assert body["checks"]["upstream"]["ok"]


def _http_backends(url: str) -> dict[str, Any]:
    return {
        "mapping": {"backend": "http", "url": url, "study_root": "1.4", "series_root": "1.5"},
        "access": {"backend": "http", "url": url},
        "logging": {"audit_log": ""},
    }


async def test_http_backends_are_probed(fault: FaultServer) -> None:
    platform = WholePlatform()
    with serving(platform) as server:
        app = _app(fault.url, **_http_backends(server.url))
        async with app:
            status, body = await _readyz(app)
            assert status == 200, body
            assert body["checks"]["mapping"]["detail"] == "answers"
            assert body["checks"]["access"]["detail"] == "answers"
            assert "store" not in body["checks"]
            asked = {path: request for path, request, _ in platform.requests}
            assert asked["/api/studies/lookup"] == {"ids": [1]}
            assert asked["/api/access/allowed"]["exam_ids"] == [1]
            platform.status = 401
            await asyncio.sleep(1.1)  # past the reuse of the last answer
            status, body = await _readyz(app)
    assert status == 503
    assert body["checks"]["mapping"]["detail"] == (
        "POST /studies/lookup answered 401 (check [mapping] token)"
    )
    assert body["checks"]["access"]["detail"] == (
        "POST /access/allowed answered 401 (check [access] token)"
    )
    assert body["checks"]["upstream"]["ok"]


async def test_http_backends_down_make_readiness_fail(fault: FaultServer) -> None:
    """A platform pointing at nothing: every request would get 503, so readiness says so."""
    app = _app(fault.url, **_http_backends(f"http://127.0.0.1:{free_port()}/api"))
    async with app:
        status, body = await _readyz(app)
    assert status == 503
    for name in ("mapping", "access"):
        assert body["checks"][name]["ok"] is False
        assert body["checks"][name]["detail"] == "unreachable"
    assert body["checks"]["upstream"]["ok"]


async def test_a_malformed_platform_fails_readiness(fault: FaultServer) -> None:
    platform = WholePlatform(raw=b'{"studies": 3, "exam_ids": "x"}')
    with serving(platform) as server:
        app = _app(fault.url, **_http_backends(server.url))
        async with app:
            status, body = await _readyz(app)
    assert status == 503
    assert body["checks"]["mapping"]["detail"] == (
        "POST /studies/lookup: malformed answer: expected an object with a 'studies' array"
    )
    assert body["checks"]["access"]["detail"] == (
        "POST /access/allowed: malformed answer: exam_ids: expected an array of positive integers"
    )


async def test_upstream_credentials_and_refusals(answering: Answering) -> None:
    answering.routes["/dicom-web/studies"] = (401, b'{"Message": "PATIENT^SECRET"}')
    upstream = {"url": answering.url + "/dicom-web", "auth": {"type": "bearer", "token": "t0k"}}
    app = DicomWebProxy(Settings.from_dict({**CORE_SETTINGS, "upstream": upstream}))
    async with app:
        answer = await call(app, "GET", b"/readyz")
    assert answer.status == 503
    assert json.loads(answer.body)["checks"]["upstream"]["detail"] == (
        "QIDO answered 401: check [upstream.auth]"
    )
    assert b"PATIENT" not in answer.body and b"t0k" not in answer.body
    assert answering.hits["/dicom-web/studies"] == 1


async def test_introspection_only(idp: IdentityProvider, fault: FaultServer) -> None:
    introspection = {
        "url": idp.introspection_url,
        "client_id": PROXY_CLIENT_ID,
        "client_secret": PROXY_CLIENT_SECRET,
    }
    app = _app(fault.url, auth={"introspection": introspection})
    async with app:
        status, body = await _readyz(app)
    assert status == 200, body
    assert body["checks"]["issuer"]["detail"] == "introspection answered 200"

    wrong = {**introspection, "client_secret": "not-the-secret"}
    app = _app(fault.url, auth={"introspection": wrong})
    async with app:
        status, body = await _readyz(app)
    assert status == 503
    assert body["checks"]["issuer"]["detail"] == (
        "introspection answered 401: check [auth.introspection] client_id and client_secret"
    )


async def test_healthz_needs_no_token_and_can_move(tmp_path: Path, fault: FaultServer) -> None:
    auth = {"jwks_file": _jwks_file(tmp_path)}
    app = _app(fault.url, auth=auth, server={"healthz_path": "/live"})
    async with app:
        live = await call(app, "GET", b"/live")
        old = await call(app, "GET", b"/healthz")
    assert live.status == 200 and json.loads(live.body) == {"status": "ok"}
    assert old.status == 401  # an ordinary path now: auth comes first, as for any other


# --- check ----------------------------------------------------------------------------------------


def _check(config: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "shanoir_dicomweb_proxy", "check", "-c", str(config)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert "Traceback" not in result.stdout + result.stderr
    return result


def _config(tmp_path: Path, **sections: Any) -> Path:
    path = tmp_path / "proxy.toml"
    server = {"bind": f"127.0.0.1:{free_port()}"}  # check tries to listen there
    path.write_text(dump_toml({**CORE_SETTINGS, "server": server, **sections}))
    return path


def _lines(result: subprocess.CompletedProcess[str]) -> dict[str, str]:
    """The report's lines by check name: ``{"upstream": "ok    upstream  http://…"}``."""
    return {line.split()[1]: line for line in result.stdout.splitlines() if len(line.split()) > 2}


def test_check_a_good_config(tmp_path: Path, orthanc: OrthancServer) -> None:
    path = tmp_path / "store.sqlite3"
    SqliteStore(path).close()
    config = _config(
        tmp_path,
        **SQLITE,
        upstream={"url": orthanc.dicomweb_url},
        auth={"jwks_file": _jwks_file(tmp_path)},
        store={"path": str(path)},
    )
    result = _check(config)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = _lines(result)
    assert lines["settings"] == f"ok    settings  {config}: valid"
    upstream = f"ok    upstream  {orthanc.dicomweb_url}: QIDO answered 200 ("
    assert lines["upstream"].startswith(upstream)
    assert lines["issuer"].startswith(f"ok    issuer    {tmp_path / 'keys.json'}: 1 keys from")
    assert lines["store"] == (
        f"ok    store     {path}: answers; empty: `store sync` or `store import` fills it"
    )
    assert result.stdout.splitlines()[-1] == "all checks passed"


def test_check_a_real_issuer(tmp_path: Path, orthanc: OrthancServer, idp: IdentityProvider) -> None:
    config = _config(tmp_path, upstream={"url": orthanc.dicomweb_url}, auth={"issuer": idp.issuer})
    result = _check(config)
    assert result.returncode == 0, result.stdout + result.stderr
    issuer = _lines(result)["issuer"]
    assert issuer.startswith(f"ok    issuer    {idp.issuer}: ")
    assert f": {len(idp.kids)} keys, fetched 0 s ago" in issuer


def test_check_a_misspelled_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[upstream]\nurl = "http://pacs/dicom-web"\nread_timout = 3\n')
    result = _check(path)
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        f"FAIL  settings  {path}: [upstream] read_timout: unknown key "
        "(did you mean 'read_timeout'?)",
        "1 check failed",
    ]


def test_check_an_unreachable_upstream(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/dicom-web"
    result = _check(_config(tmp_path, upstream={"url": url}))
    assert result.returncode == 1
    upstream = _lines(result)["upstream"]
    assert upstream.startswith(f"FAIL  upstream  {url}: unreachable (")
    assert upstream.endswith("ms): check [upstream] url, and that the PACS runs")
    assert result.stdout.splitlines()[-1] == "1 check failed"


def test_check_upstream_credentials(tmp_path: Path, answering: Answering) -> None:
    answering.routes["/dicom-web/studies"] = (403, b'[{"00100010": "PATIENT^SECRET"}]')
    url = answering.url + "/dicom-web"
    auth = {"type": "basic", "username": "u", "password": "p"}
    result = _check(_config(tmp_path, upstream={"url": url, "auth": auth}))
    assert result.returncode == 1
    pattern = rf"FAIL  upstream  {url}: QIDO answered 403: check \[upstream\.auth\] \(\d+ ms\)"
    assert re.fullmatch(pattern, _lines(result)["upstream"])
    assert "PATIENT" not in result.stdout + result.stderr


def test_check_a_missing_store(tmp_path: Path, orthanc: OrthancServer) -> None:
    path = tmp_path / "nowhere.sqlite3"
    store = {"path": str(path)}
    config = _config(tmp_path, **SQLITE, upstream={"url": orthanc.dicomweb_url}, store=store)
    result = _check(config)
    assert result.returncode == 1
    lines = _lines(result)
    assert lines["upstream"].startswith("ok ")
    assert lines["store"] == (
        f"FAIL  store     {path}: no store there: `store sync` creates it from the upstream "
        "(or `store import` from a file)"
    )
    assert not path.exists()  # check reports, it does not create


@pytest.fixture
def taken() -> Iterator[str]:
    """An address another process (here, a socket) listens on."""
    with socket.create_server(("127.0.0.1", 0)) as sock:
        yield f"127.0.0.1:{sock.getsockname()[1]}"


def test_check_reports_a_taken_port(tmp_path: Path, orthanc: OrthancServer, taken: str) -> None:
    config = _config(tmp_path, upstream={"url": orthanc.dicomweb_url}, server={"bind": taken})
    result = _check(config)
    assert result.returncode == 1
    lines = _lines(result)
    assert lines["upstream"].startswith("ok ")
    assert lines["listen"] == (
        f"FAIL  listen    {taken}: already in use: another process listens there: "
        "choose another [server] bind"
    )
    assert result.stdout.splitlines()[-1] == "1 check failed"


def test_check_a_free_port(tmp_path: Path, orthanc: OrthancServer) -> None:
    result = _check(_config(tmp_path, upstream={"url": orthanc.dicomweb_url}))
    assert result.returncode == 0, result.stdout
    assert re.fullmatch(r"ok    listen    127\.0\.0\.1:\d+: free", _lines(result)["listen"])


@pytest.mark.parametrize("workers", [1, 2])
def test_serve_on_a_taken_port_says_so_in_one_line(
    tmp_path: Path, taken: str, workers: int
) -> None:
    config = _config(tmp_path, upstream={"url": f"http://127.0.0.1:{free_port()}/dicom-web"})
    command = [sys.executable, "-m", "shanoir_dicomweb_proxy", "serve", "-c", str(config)]
    command += ["--bind", taken, "--workers", str(workers)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == (
        f"error: cannot listen on {taken}: already in use: another process listens there\n"
    )


def test_serve_with_a_bad_bind(tmp_path: Path) -> None:
    config = _config(tmp_path, upstream={"url": "http://127.0.0.1:9/dicom-web"})
    command = [sys.executable, "-m", "shanoir_dicomweb_proxy", "serve", "-c", str(config)]
    result = subprocess.run(
        [*command, "--bind", "nowhere"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 2
    assert result.stderr == (
        'error: --bind: expected HOST:PORT (IPv6 as [::1]:8080), got "nowhere"\n'
    )


def test_check_http_backends_down(tmp_path: Path, orthanc: OrthancServer) -> None:
    url = f"http://127.0.0.1:{free_port()}/api"
    result = _check(
        _config(tmp_path, upstream={"url": orthanc.dicomweb_url}, **_http_backends(url))
    )
    assert result.returncode == 1
    lines = _lines(result)
    assert lines["upstream"].startswith("ok ")
    assert re.fullmatch(rf"FAIL  mapping   {url}: unreachable \(\d+ ms\)", lines["mapping"])
    assert re.fullmatch(rf"FAIL  access    {url}: unreachable \(\d+ ms\)", lines["access"])
    assert result.stdout.splitlines()[-1] == "2 checks failed"
