"""Request ids, the access log and Prometheus metrics: in-process for the small rules, against
real proxy processes and the real Orthanc for what users see (log files, scrapes, workers)."""

from __future__ import annotations

import gc
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TextIO

import httpx
import pytest
from joserfc import jwt
from joserfc.jwk import KeySet
from prometheus_client import values
from prometheus_client.parser import text_string_to_metric_families

from shanoir_dicomweb_proxy import Settings
from shanoir_dicomweb_proxy._auth import dev_token
from shanoir_dicomweb_proxy._logwriter import BatchedWriter
from shanoir_dicomweb_proxy._observability import (
    JsonFormatter,
    ObservabilityMiddleware,
    ObservedRequest,
    _Handler,
    configure_logging,
)
from shanoir_dicomweb_proxy._scope import get_record as scope_record
from shanoir_dicomweb_proxy._store import SqliteStore
from shanoir_dicomweb_proxy._types import Message, Scope
from shanoir_dicomweb_proxy.testing import OrthancServer, ProxyServer, SampleSet

from .support.archive import SERIES_ROOT, STUDY_ROOT
from .support.asgi import build, call
from .support.keys import rsa_key_file
from .support.settings import CORE_SETTINGS, ProxyFactory
from .support.waiting import wait_for

HEX_ID = re.compile(r"[0-9a-f]{32}")
REPO = Path(__file__).resolve().parent.parent

# --- in-process ------------------------------------------------------------------------------


class Recording:
    """A stand-in PACS that keeps the requests it got."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return httpx.Response(
            200, stream=httpx.ByteStream(b"[]"), headers={"content-type": "application/dicom+json"}
        )


@pytest.mark.parametrize(
    ("supplied", "kept"),
    [
        ("trace-42.a_b~C", True),
        ("x" * 64, True),
        ("x" * 65, False),
        ("two words", False),
        ('quo"te', False),
        ("é-accent", False),
        ("", False),
        (None, False),
    ],
)
async def test_request_id_kept_only_when_a_short_token(supplied: str | None, kept: bool) -> None:
    upstream = Recording()
    app = build(upstream)
    headers = [] if supplied is None else [(b"x-request-id", supplied.encode())]
    answer = await call(app, "GET", b"/dicomweb/studies", headers=headers)
    assert answer.status == 200
    echoed = answer.headers[b"x-request-id"].decode()
    if kept:
        assert echoed == supplied
    else:
        assert HEX_ID.fullmatch(echoed), echoed
    # The PACS gets the same id, never the client's refused one.
    assert upstream.requests[0].headers.get_list("x-request-id") == [echoed]


class ServerRequest:
    """What a server keeps for a request (hypercorn's ``HTTPStream``, uvicorn's
    ``RequestResponseCycle``): the scope, and the ``send`` and ``receive`` it hands the app."""

    def __init__(self, scope: Scope) -> None:
        self.scope = scope
        self.sent: list[Message] = []

    async def receive(self) -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(self, message: Message) -> None:
        self.sent.append(message)


async def test_a_request_leaves_no_reference_cycle_to_collect() -> None:
    """The record in the scope lets go of the server's callables once the request is over:
    else scope, record and the server's object make a cycle per request, and collecting
    them cost the hypercorn proxy more CPU than its request ids and metrics together."""
    app = build(Recording())
    scope: Scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/dicomweb/studies",
        "raw_path": b"/dicomweb/studies",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"proxy.test:8080")],
        "server": ("127.0.0.1", 8080),
        "client": ("127.0.0.1", 5000),
    }
    server = ServerRequest(scope)
    gone = weakref.ref(server)
    gc.disable()
    try:
        await app(scope, server.receive, server.send)
        assert server.sent[0]["type"] == "http.response.start"
        assert not server.sent[-1].get("more_body", False)
        del server, scope
        assert gone() is None  # freed by reference counting, not left to the collector
    finally:
        gc.enable()


async def test_the_server_callables_are_refused_after_the_request() -> None:
    middleware = ObservabilityMiddleware(
        lambda scope, receive, send: send(
            {"type": "http.response.start", "status": 204, "headers": []}
        ),
        access_log=False,
    )
    scope: Scope = {"type": "http", "method": "GET", "path": "/", "headers": []}
    server = ServerRequest(scope)
    await middleware(scope, server.receive, server.send)
    record = scope_record(scope)
    assert isinstance(record, ObservedRequest) and record.status == 204
    with pytest.raises(RuntimeError, match="after the request"):
        await record.send({"type": "http.response.body", "body": b""})
    with pytest.raises(RuntimeError, match="after the request"):
        await record.receive()


def _rsa_keys(folder: Path) -> tuple[KeySet, Path]:
    path = folder / "jwks.json"
    return rsa_key_file(path), path


def _token(keys: KeySet, kid: str = "k", **overrides: Any) -> str:
    now = int(time.time())
    claims = {"iss": "https://idp.test", "sub": "alice", "aud": "dicomweb-proxy", "exp": now + 60}
    claims.update(overrides)
    head = {"alg": "RS256", "typ": "JWT", "kid": kid}
    return jwt.encode(head, {k: v for k, v in claims.items() if v is not None}, keys.keys[0])


@pytest.mark.parametrize(
    ("reason", "authorization"),
    [
        ("missing", None),
        ("malformed", lambda keys: "Basic YWxpY2U6cHc="),
        ("malformed", lambda keys: "Bearer not.a.jwt"),
        ("expired", lambda keys: "Bearer " + _token(keys, exp=int(time.time()) - 3600)),
        ("wrong_audience", lambda keys: "Bearer " + _token(keys, aud="another")),
        ("wrong_issuer", lambda keys: "Bearer " + _token(keys, iss="https://evil.test")),
        ("invalid_claims", lambda keys: "Bearer " + _token(keys, sub=None)),
        ("token_type", lambda keys: "Bearer " + _token(keys, typ="ID")),
        ("unknown_key", lambda keys: "Bearer " + _token(keys, kid="gone")),
        (
            "bad_signature",
            lambda keys: "Bearer " + _token(keys)[:-8] + ("A" * 8),
        ),
    ],
)
async def test_token_failure_reasons(
    tmp_path: Path, reason: str, authorization: Callable[[KeySet], str] | None
) -> None:
    keys, jwks = _rsa_keys(tmp_path)
    auth = {
        "enabled": True,
        "issuer": "https://idp.test",
        "audience": ["dicomweb-proxy"],
        "jwks_file": str(jwks),
    }
    upstream = Recording()
    app = build(upstream, auth=auth)
    headers = [] if authorization is None else [(b"authorization", authorization(keys).encode())]
    answer = await call(app, "GET", b"/dicomweb/studies", headers=headers)
    assert answer.status == 401
    assert upstream.requests == []
    registry = app.observability.registry
    failures = registry.get_sample_value("dicomweb_proxy_token_failures_total", {"reason": reason})
    assert failures == 1
    requests = registry.get_sample_value(
        "dicomweb_proxy_requests_total", {"route": "other", "status": "401"}
    )
    assert requests == 1


def _access_record(**fields: Any) -> ObservedRequest:
    async def nothing(*args: Any) -> Any:
        raise AssertionError("unused")

    record = ObservedRequest(b"req-1", "GET", nothing, nothing)
    for name, value in fields.items():
        setattr(record, name, value)
    return record


def test_text_line_quotes_claims_that_could_forge_fields() -> None:
    record = _access_record(subject="alice\nINFO forged status=200", user_id="7 x=1")
    line = str(record)
    assert "\n" not in line
    assert 'subject="alice\\nINFO forged status=200"' in line
    assert 'user_id="7 x=1"' in line
    assert re.search(r"\bupstream_ms=- ", line)


def test_json_formatter() -> None:
    formatter = JsonFormatter()
    record = _access_record(route="wado.metadata.series", status=200, bytes_out=12)
    access = logging.LogRecord("shanoir_dicomweb_proxy.requests", 20, "", 0, record, None, None)
    data = json.loads(formatter.format(access))
    assert data["logger"] == "shanoir_dicomweb_proxy.requests" and data["level"] == "INFO"
    assert data["message"] == "GET wado.metadata.series 200"
    assert data["request_id"] == "req-1" and data["bytes_out"] == 12
    assert data["upstream_ms"] is None and data["subject"] is None
    try:
        raise ValueError("boom")
    except ValueError:
        failed = logging.LogRecord("x", 40, "", 0, "failed %s", ("here",), sys.exc_info())
    data = json.loads(formatter.format(failed))
    assert data["message"] == "failed here" and data["level"] == "ERROR"
    assert "ValueError: boom" in data["exception"]
    assert "request_id" not in data


@pytest.fixture
def root_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    httpx_level = logging.getLogger("httpx").level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger("httpx").setLevel(httpx_level)


def test_configure_logging(root_logging: None) -> None:
    base = {**CORE_SETTINGS, "upstream": {"url": "http://pacs.invalid/dicom-web"}}
    debug_json = Settings.from_dict({**base, "logging": {"level": "debug", "format": "json"}})
    configure_logging(debug_json)
    configure_logging(debug_json)  # again (each worker process): still one handler
    root = logging.getLogger()
    ours = [h for h in root.handlers if isinstance(h.formatter, JsonFormatter)]
    assert len(ours) == 1
    assert root.level == logging.DEBUG
    assert logging.getLogger("httpx").level == logging.WARNING
    configure_logging(Settings.from_dict(base))
    assert not [h for h in root.handlers if isinstance(h.formatter, JsonFormatter)]
    assert root.level == logging.INFO


def test_the_log_writer_writes_what_was_queued_at_once(
    capsys: pytest.CaptureFixture[str],
) -> None:
    class Stream(io.StringIO):
        writes = 0

        def write(self, text: str) -> int:
            self.writes += 1
            return super().write(text)

    stream = Stream()
    target: logging.StreamHandler[TextIO] = logging.StreamHandler(stream)
    target.setFormatter(logging.Formatter("%(message)s"))
    handler = _Handler(target)
    records = [logging.LogRecord("x", 20, "", 0, "line %d", (n,), None) for n in range(50)]
    records.insert(10, logging.LogRecord("x", 20, "", 0, "line %d", ("not a number",), None))
    for record in records:
        handler.emit(record)
    handler.close()  # writes what is queued
    assert stream.getvalue().splitlines() == [f"line {n}" for n in range(50)]
    assert stream.writes <= 2  # one per turn of the writer thread, not one per record
    assert "Logging error" in capsys.readouterr().err  # the bad record, reported


def test_a_batch_that_fails_does_not_stop_the_writer(caplog: pytest.LogCaptureFixture) -> None:
    written: list[str] = []

    def write(text: str) -> None:
        if "boom" in text:
            raise RuntimeError("a bug in a writer")
        written.append(text)

    writer: BatchedWriter[str] = BatchedWriter(str, write, name="test-writer")
    writer.put("boom\n")
    wait_for(lambda: "could not write a batch" in caplog.text, "the failure logged", 5)
    writer.put("after\n")
    wait_for(lambda: written == ["after\n"], "the next batch written", 5)
    writer.close()


_WORKER_LOGGING = """
import json, logging, sys, time
from shanoir_dicomweb_proxy import Settings
from shanoir_dicomweb_proxy._observability import configure_logging
configure_logging(Settings.from_dict(json.loads(sys.argv[2])))
log = logging.getLogger("worker")
for n in range(3000):
    log.info("%s %d %s", sys.argv[1], n, "x" * 300)
    if n % 300 == 0:
        time.sleep(0.05)  # batches of many lines, as under load
logging.shutdown()
"""


def test_workers_sharing_a_slow_stderr_pipe_never_split_a_line() -> None:
    """Worker processes write to one stderr pipe; when its reader is slow the pipe fills, and
    a write larger than PIPE_BUF may then be cut by another worker's. Each write holds whole
    lines and at most PIPE_BUF bytes, so every line arrives whole."""
    upstream = {"url": "http://pacs.invalid/dicom-web"}
    settings = json.dumps({**CORE_SETTINGS, "upstream": upstream, "logging": {"format": "json"}})
    read, write = os.pipe()
    workers = [
        subprocess.Popen([sys.executable, "-c", _WORKER_LOGGING, name, settings], stderr=write)
        for name in ("alpha", "beta")
    ]
    os.close(write)
    received = bytearray()
    with open(read, "rb", buffering=0) as pipe:
        while chunk := pipe.read(1024):  # a slow reader: small reads, with pauses
            received += chunk
            time.sleep(0.0005)
    assert [worker.wait(30) for worker in workers] == [0, 0]
    lines = [json.loads(line)["message"] for line in received.decode().splitlines()]
    for name in ("alpha", "beta"):
        numbers = [int(m.split()[1]) for m in lines if m.startswith(f"{name} ")]
        assert numbers == list(range(3000))


async def test_multiprocess_metrics_are_read_from_the_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As in a worker started with PROMETHEUS_MULTIPROC_DIR set: values live in files there.
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    monkeypatch.setattr(values, "ValueClass", values.MultiProcessValue())
    app = build(Recording())
    assert (await call(app, "GET", b"/dicomweb/studies")).status == 200
    assert any(name.startswith("counter_") for name in os.listdir(tmp_path))
    answer = await call(app, "GET", b"/metrics")
    assert answer.status == 200
    assert answer.headers[b"content-type"].startswith(b"text/plain")
    samples = _samples(answer.body.decode())
    assert (
        samples[("dicomweb_proxy_requests_total", _labels(route="qido.search.study", status="200"))]
        == 1
    )


class Counts:
    cache_hits = 0
    cache_misses = 0


def test_multiprocess_cache_counts_reach_the_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Caches count in memory; each worker adds what is new to the shared files.
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    monkeypatch.setattr(values, "ValueClass", values.MultiProcessValue())
    counts = Counts()
    middleware = ObservabilityMiddleware(Recording(), caches={"fake": counts})
    hits = ("dicomweb_proxy_cache_hits_total", _labels(cache="fake"))
    misses = ("dicomweb_proxy_cache_misses_total", _labels(cache="fake"))
    assert _samples(middleware.exposition().decode())[hits] == 0
    counts.cache_hits, counts.cache_misses = 5, 2
    first = _samples(middleware.exposition().decode())
    assert (first[hits], first[misses]) == (5, 2)
    counts.cache_hits = 7
    second = _samples(middleware.exposition().decode())  # added once, not twice
    assert (second[hits], second[misses]) == (7, 2)


# --- real servers ----------------------------------------------------------------------------

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _labels(**labels: str) -> frozenset[tuple[str, str]]:
    return frozenset(labels.items())


def _samples(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _scrape(proxy: ProxyServer) -> Samples:
    response = httpx.get(proxy.url + "/metrics", timeout=10)  # no token
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return _samples(response.text)


def _eventually(check: Callable[[], bool], timeout: float = 5.0) -> None:
    """The access line and the metrics of a request are written just after its last byte."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "not within the timeout"
        time.sleep(0.05)


def _log_lines(proxy: ProxyServer, request_id: str) -> list[str]:
    return [line for line in proxy.log_path.read_text().splitlines() if request_id in line]


def _access_line(proxy: ProxyServer, request_id: str) -> str:
    _eventually(lambda: bool(_log_lines(proxy, request_id)))
    lines = _log_lines(proxy, request_id)
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory,
    archive: OrthancServer,
    store_path: Path,
    samples: SampleSet,
    proxy_factory: ProxyFactory,
) -> dict[str, Any]:
    """Two proxies with tokens, sqlite mapping and grants: text logs with metrics, and JSON logs
    without. alice may read the first small study only."""
    folder = tmp_path_factory.mktemp("observability")
    store = folder / "store.sqlite3"
    shutil.copy(store_path, store)
    _, jwks = _rsa_keys(folder)
    study = samples.small_studies[0]
    with SqliteStore(store) as opened:
        entries = opened.entries()
        exam = next(e for e in entries if e.study_uid == study.uid)
        other = next(e for e in entries if e.exam_id != exam.exam_id)
        opened.grant("alice", exam.exam_id, "read")
    sections: dict[str, Any] = {
        "auth": {"enabled": True, "jwks_file": str(jwks), "audience": ["dicomweb-proxy"]},
        "mapping": {"backend": "sqlite", "study_root": STUDY_ROOT, "series_root": SERIES_ROOT},
        "access": {"backend": "sqlite", "cache_ttl": 300},
        "store": {"path": str(store)},
        "logging": {"audit_log": ""},
    }
    text = proxy_factory(archive.dicomweb_url, **sections)
    as_json = proxy_factory(
        archive.dicomweb_url,
        **{
            **sections,
            "server": {"metrics_path": ""},
            "logging": {"audit_log": "", "format": "json"},
        },
    )
    settings = Settings.from_toml(text.config_path)

    def token(ttl: int = 600) -> str:
        return dev_token(settings, "alice", {"userId": "alice"}, ttl=ttl)

    return {
        "text": text,
        "json": as_json,
        "token": token,
        "study": study,
        "public": f"{STUDY_ROOT}.{exam.exam_id}",
        "series": f"{SERIES_ROOT}.{exam.acquisitions[0].acquisition_id}",
        "other": f"{STUDY_ROOT}.{other.exam_id}",
    }


def _get(
    proxy: ProxyServer,
    path: str,
    token: str | None,
    request_id: str | None = None,
    **params: str,
) -> httpx.Response:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    if request_id is not None:
        headers["X-Request-ID"] = request_id
    return httpx.get(proxy.dicomweb_url + path, params=params, headers=headers, timeout=60)


def test_request_id_echoed_or_generated(world: dict[str, Any]) -> None:
    proxy, token = world["text"], world["token"]()
    assert _get(proxy, "/studies", token, "client-id-1").headers["x-request-id"] == "client-id-1"
    generated = _get(proxy, "/studies", token).headers["x-request-id"]
    assert HEX_ID.fullmatch(generated)
    refused = _get(proxy, "/studies", token, "not ok\x7f").headers["x-request-id"]
    assert HEX_ID.fullmatch(refused) and refused != generated
    # Errors carry it too, answered before the token is even looked at.
    assert _get(proxy, "/studies", None, "client-id-2").headers["x-request-id"] == "client-id-2"


def test_access_line_has_the_fields_and_no_patient_data(world: dict[str, Any]) -> None:
    proxy, token, study = world["text"], world["token"](), world["study"]
    path = f"/studies/{world['public']}/series"
    response = _get(proxy, path, token, "access-line-1", PatientID=study.patient_id)
    assert response.status_code == 200 and response.json()
    line = _access_line(proxy, "access-line-1")
    assert " shanoir_dicomweb_proxy.requests: " in line
    fields = dict(re.findall(r"(\w+)=(\S+)", line.split(": ", 1)[1]))
    assert fields["method"] == "GET" and fields["route"] == "qido.search.series"
    assert fields["status"] == "200" and fields["bytes_in"] == "0"
    assert int(fields["bytes_out"]) == len(response.content)
    assert float(fields["duration_ms"]) >= float(fields["upstream_ms"]) > 0
    assert fields["subject"] == "alice" and fields["user_id"] == "alice"
    assert fields["decision"] == "allow" and fields["token_failure"] == "-"
    # Nothing that names the patient or the study, nor the token, anywhere in the log.
    log = proxy.log_path.read_text()
    for secret in (world["public"], study.uid, study.patient_id, study.patient_name, token):
        assert secret not in log
    assert token.split(".")[2][:16] not in log
    assert "/studies" not in line and "PatientID" not in line and "?" not in line


def test_json_logs(world: dict[str, Any]) -> None:
    proxy, token = world["json"], world["token"]()
    response = _get(proxy, f"/studies/{world['public']}/series", token, "json-line-1")
    assert response.status_code == 200
    expired = world["token"](ttl=-600)
    assert _get(proxy, "/studies", expired, "json-line-2").status_code == 401
    _eventually(lambda: bool(_log_lines(proxy, "json-line-2")))
    records = [json.loads(line) for line in proxy.log_path.read_text().splitlines() if line]
    assert all({"time", "level", "logger", "message"} <= r.keys() for r in records)
    assert any(r["logger"] == "hypercorn.error" for r in records)  # "Running on ..."
    access = {r["request_id"]: r for r in records if r["logger"].endswith(".requests")}
    line = access["json-line-1"]
    assert line["message"] == "GET qido.search.series 200"
    assert line["status"] == 200 and line["bytes_out"] == len(response.content)
    assert line["subject"] == "alice" and line["user_id"] == "alice"
    assert line["upstream_ms"] > 0 and line["duration_ms"] >= line["upstream_ms"]
    refused = access["json-line-2"]
    assert refused["status"] == 401 and refused["route"] == "other"
    assert refused["token_failure"] == "expired" and refused["subject"] is None
    assert refused["upstream_ms"] is None


def test_metrics_move_with_traffic(world: dict[str, Any]) -> None:
    proxy, token = world["text"], world["token"]()
    before = _scrape(proxy)
    path = f"/studies/{world['public']}/series"
    first = _get(proxy, path, token)
    assert first.status_code == 200
    assert _get(proxy, path, token).status_code == 200  # the same again: from the caches
    assert _get(proxy, f"/studies/{world['other']}/series", token).status_code == 404  # denied
    assert _get(proxy, "/not-a-route", token).status_code == 404
    assert _get(proxy, "/studies", None).status_code == 401
    assert _get(proxy, "/studies", world["token"](ttl=-600)).status_code == 401

    def delta(after: Samples, name: str, **labels: str) -> float:
        key = (name, _labels(**labels))
        return after.get(key, 0.0) - before.get(key, 0.0)

    requests = "dicomweb_proxy_requests_total"
    expected = {
        (requests, "qido.search.series", "200"): 2,
        (requests, "qido.search.series", "404"): 1,
        (requests, "other", "404"): 1,
        (requests, "other", "401"): 2,
    }

    def settled() -> bool:
        after = _scrape(proxy)
        return all(
            delta(after, name, route=route, status=status) == count
            for (name, route, status), count in expected.items()
        )

    _eventually(settled)
    after = _scrape(proxy)
    series = {"route": "qido.search.series"}
    assert delta(after, "dicomweb_proxy_response_bytes_total", **series) >= 2 * len(first.content)
    assert delta(after, "dicomweb_proxy_request_duration_seconds_count", **series) == 3
    assert delta(after, "dicomweb_proxy_upstream_duration_seconds_count", **series) == 2
    decisions = "dicomweb_proxy_access_decisions_total"
    assert delta(after, decisions, outcome="allow") == 2
    assert delta(after, decisions, outcome="deny") == 1
    failures = "dicomweb_proxy_token_failures_total"
    assert delta(after, failures, reason="missing") == 1
    assert delta(after, failures, reason="expired") == 1
    for cache in ("token", "access", "identifiers"):
        assert delta(after, "dicomweb_proxy_cache_hits_total", cache=cache) >= 1, cache
    # The scrapes themselves are not counted, nor are labels ever identifiers.
    assert not any(name == requests and ("route", "probe") in labels for name, labels in after)
    assert not any(world["public"] in value for _, labels in after for _, value in labels)


def test_metrics_need_no_token_and_can_be_off(world: dict[str, Any]) -> None:
    response = httpx.get(world["text"].url + "/metrics", timeout=10)
    assert response.status_code == 200
    assert "dicomweb_proxy_requests_total" in response.text
    off = world["json"]
    response = httpx.get(off.url + "/metrics", timeout=10)
    assert response.status_code == 401  # just another path: the token comes first
    token = world["token"]()
    headers = {"Authorization": f"Bearer {token}", "X-Request-ID": "metrics-off-1"}
    response = httpx.get(off.url + "/metrics", headers=headers, timeout=10)
    assert response.status_code == 404
    line = json.loads(_access_line(off, "metrics-off-1"))
    assert line["route"] == "other" and line["upstream_ms"] is None  # never reached the PACS


def test_workers_share_their_metrics(
    tmp_path_factory: pytest.TempPathFactory, orthanc: OrthancServer
) -> None:
    folder = tmp_path_factory.mktemp("multiprocess")
    metrics_dir = folder / "metrics"
    metrics_dir.mkdir()
    settings = {**CORE_SETTINGS, "upstream": {"url": orthanc.dicomweb_url}}
    env = {"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    with ProxyServer(folder / "proxy", settings, workers=2, env=env) as proxy:
        count = 40

        def one(_: int) -> int:
            # A new connection each: the kernel spreads them over the workers' shared socket.
            return httpx.get(proxy.dicomweb_url + "/studies", timeout=60).status_code

        with ThreadPoolExecutor(8) as pool:
            assert set(pool.map(one, range(count))) == {200}
        pids = {p.stem.rsplit("_", 1)[1] for p in metrics_dir.glob("counter_*.db")}
        assert len(pids) == 2  # each worker writes its own file

        key = ("dicomweb_proxy_requests_total", _labels(route="qido.search.study", status="200"))
        _eventually(lambda: _scrape(proxy).get(key) == count)


def test_the_grafana_dashboard_charts_what_the_proxy_exports(world: dict[str, Any]) -> None:
    """deploy/grafana-dashboard.json: every query names a metric this proxy's /metrics has
    (its TYPE line), and every exported metric is on some panel."""
    dashboard = json.loads((REPO / "deploy" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert len(exprs) >= 8
    response = httpx.get(world["text"].url + "/metrics", timeout=10)
    exported = {_family(n) for n in re.findall(r"^# TYPE (\S+) ", response.text, re.M)}
    exported = {n for n in exported if n.startswith("dicomweb_proxy_")}
    charted = {_family(n) for e in exprs for n in re.findall(r"\bdicomweb_proxy_[a-z_]+", e)}
    assert charted and charted <= exported, charted - exported
    assert exported <= charted, exported - charted


def _family(name: str) -> str:
    return re.sub(r"_(total|bucket|sum|count|created)$", "", name)
