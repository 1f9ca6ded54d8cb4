"""Fuzzing (issue 19): schemathesis drives every operation of ``docs/openapi.yaml``, with valid
and invalid input, against a live proxy (authentication, SQLite mapping and access, signed
links) in front of the real Orthanc, through a relay that records what reaches the PACS.

The contract under test: no answer is a 5xx, none holds a Python traceback, every answer
matches the description (status, content type, body schema, headers; an answer that needs a
token is refused without one), and a request the proxy refuses never reaches the PACS: the
only upstream requests a refusal may cost are the proxy's own membership searches (does this
instance or series belong to the path's study?), and only for a 404.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import hypothesis
import pytest
import requests
import schemathesis
import yaml
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.core.failures import Failure, FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from shanoir_dicomweb_proxy import Settings
from shanoir_dicomweb_proxy._auth import dev_token
from shanoir_dicomweb_proxy._store import SqliteStore
from shanoir_dicomweb_proxy.testing import OrthancServer, ProxyServer, SampleSet

from .support.archive import SERIES_ROOT, STUDY_ROOT
from .support.keys import link_key_file, rsa_key_file
from .support.relay import RecordingRelay
from .support.settings import CORE_SETTINGS

OPENAPI = Path(__file__).parents[1] / "docs" / "openapi.yaml"
#: Cases per operation and generation mode: with the explicit examples, about 800 requests
#: (``FUZZ_EXAMPLES=100`` for a longer run by hand).
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "12"))
CHECKS = [
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
    ignored_auth,
]
# A request line as the proxy writes it upstream (httpx and aiohttp alike).
_REQUEST_LINE = re.compile(rb"(?:^|\r\n)([A-Z]{3,7}) (/[^ \r\n]*) HTTP/1\.1\r\n")
# The proxy's own membership search: the path's UIDs, asked of the PACS before it is trusted.
_MEMBERSHIP = re.compile(rb"^/dicom-web/(series|instances)\?[^ ]*includefield=0020000D")
#: Refusals the proxy can only make on what the PACS answered: a Range past the end of the value.
_DECIDED_ON_THE_ANSWER = frozenset({"range_not_satisfiable"})
_TRACEBACK = re.compile(rb'Traceback \(most recent call last\)|File "[^"]+", line [0-9]+')


@dataclass
class Target:
    proxy: ProxyServer
    relay: RecordingRelay
    token: str
    granted: dict[str, str]  # study, series, instance of an examination alice may read
    denied: dict[str, str]  # the same, of one she may not


@dataclass
class Tally:
    statuses: Counter[int] = field(default_factory=Counter)
    operations: Counter[str] = field(default_factory=Counter)
    refused_upstream: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def target(
    tmp_path_factory: pytest.TempPathFactory,
    archive: OrthancServer,
    store_path: Path,
    samples: SampleSet,
) -> Iterator[Target]:
    """alice may read two image examinations; the others are refused to her."""
    folder = tmp_path_factory.mktemp("fuzz")
    store = folder / "store.sqlite3"
    shutil.copy(store_path, store)
    jwks = folder / "jwks.json"
    rsa_key_file(jwks)
    images = {study.uid for study in samples.small_studies}
    with SqliteStore(store) as opened:
        exams = sorted(e.exam_id for e in opened.entries() if e.study_uid in images)
        for exam in exams[:2]:
            opened.grant("alice", exam, "read")
    upstream = urlsplit(archive.dicomweb_url)
    assert upstream.hostname is not None and upstream.port is not None
    settings: dict[str, Any] = {
        **CORE_SETTINGS,
        "auth": {"enabled": True, "jwks_file": str(jwks), "audience": ["dicomweb-proxy"]},
        "mapping": {"backend": "sqlite", "study_root": STUDY_ROOT, "series_root": SERIES_ROOT},
        "access": {"backend": "sqlite"},
        "store": {"path": str(store)},
        "links": {
            "enabled": True,
            "max_ttl": 600,
            "keys_file": str(link_key_file(folder / "links.json")),
        },
    }
    with RecordingRelay((upstream.hostname, upstream.port)) as relay:
        settings["upstream"] = {"url": relay.url(upstream.path)}
        with ProxyServer(folder / "proxy", settings) as proxy:
            parsed = Settings.from_toml(proxy.config_path)
            token = dev_token(parsed, "alice", {"userId": "alice"}, ttl=900)
            admin = dev_token(parsed, "root", {"realm_access": {"roles": ["ROLE_ADMIN"]}}, ttl=60)
            yield Target(
                proxy,
                relay,
                token,
                _image(proxy, token, f"{STUDY_ROOT}.{exams[0]}"),
                _image(proxy, admin, f"{STUDY_ROOT}.{exams[2]}"),
            )


def _image(proxy: ProxyServer, token: str, study: str) -> dict[str, str]:
    """The public study, series and instance UIDs of an image of ``study``."""
    headers = {"authorization": f"Bearer {token}"}
    answer = httpx.get(f"{proxy.dicomweb_url}/studies/{study}/instances", headers=headers)
    assert answer.status_code == 200, answer.text
    row = answer.json()[0]
    return {
        "study": study,
        "series": row["0020000E"]["Value"][0],
        "instance": row["00080018"]["Value"][0],
    }


def _schema(target: Target) -> schemathesis.BaseSchema:
    """docs/openapi.yaml with the sample's UIDs as the path parameters' examples."""
    raw = yaml.safe_load(OPENAPI.read_text())
    parameters = raw["components"]["parameters"]
    for name in ("study", "series", "instance"):
        parameters[name]["examples"] = {
            "granted": {"value": target.granted[name]},
            "denied": {"value": target.denied[name]},
        }
    parameters["frames"]["examples"] = {"first": {"value": "1"}}
    parameters["tag"]["examples"] = {"pixels": {"value": "7fe00010"}}
    return schemathesis.openapi.from_dict(raw)


@schemathesis.serializer("multipart/related")
def _multipart_related(ctx: schemathesis.SerializationContext, value: object) -> bytes:
    """A STOW body: whatever was generated, as the one part of a ``multipart/related`` upload
    (its Content-Type, with the boundary, is sent by :func:`_runner`)."""
    if isinstance(value, bytes):
        data = value
    elif isinstance(value, str):
        data = value.encode()
    else:
        data = json.dumps(value, default=str).encode()
    return b"--fuzz\r\nContent-Type: application/dicom\r\n\r\n" + data + b"\r\n--fuzz--\r\n"


_STOW = 'multipart/related; type="application/dicom"; boundary=fuzz'
#: Where a case's identifiers point: as generated (mostly nowhere), or in part at what alice
#: may read (or at an examination she may not), so that what lies behind the first checks
#: (membership, the PACS's own answers) is fuzzed too.
_AIMS = ("as generated", "granted study", "granted series", "granted instance", "denied study")
_AIMED = {
    "granted study": ("study",),
    "granted series": ("study", "series"),
    "granted instance": ("study", "series", "instance"),
    "denied study": ("study",),
}
_WADO_URI = {"study": "studyUID", "series": "seriesUID", "instance": "objectUID"}
_KNOWN_ACCEPTS = st.sampled_from(
    [
        "",
        "*/*",
        "application/dicom+json",
        "application/json",
        'multipart/related; type="application/dicom+xml"',
        "application/dicom+xml",
        'multipart/related; type="application/dicom"; transfer-syntax=*',
        "application/dicom",
        "application/zip",
        'multipart/related; type="application/octet-stream"',
        "multipart/related; type=*/*",
        "application/octet-stream",
        "image/jpeg",
        "image/png",
        "text/html,application/xhtml+xml,image/avif,image/webp,*/*;q=0.8",
        "image/*",
        "video/mp4",
    ]
)
# What a header can carry (requests refuses leading or trailing whitespace).
_ANY_ACCEPT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=80)
#: OpenAPI leaves ``Accept`` out of the parameters, so it is drawn here: in one case of four,
#: one of the types PS3.18 names or what viewers and browsers send; in one of four, anything
#: printable; otherwise none (``*/*``).
_ACCEPTS = st.integers(0, 3).flatmap(
    lambda n: (_KNOWN_ACCEPTS, _ANY_ACCEPT.map(str.strip), st.just(""), st.just(""))[n]
)


def _aim(case: schemathesis.Case, aim: str, target: Target) -> None:
    uids = target.denied if aim == "denied study" else target.granted
    for name in _AIMED.get(aim, ()):
        if name in (case.path_parameters or {}):
            case.path_parameters[name] = uids[name]
        if case.operation.path.endswith("/wado") and isinstance(case.query, dict):
            case.query[_WADO_URI[name]] = uids[name]
        if name == "study" and case.operation.path.endswith("/links"):
            if isinstance(case.body, dict):
                case.body["study"] = uids[name]


def _upstream_requests(sent: bytes) -> list[tuple[bytes, bytes]]:
    return [(m.group(1), m.group(2)) for m in _REQUEST_LINE.finditer(sent)]


def _refused_by_proxy(response: schemathesis.Response) -> str | None:
    """The problem code of a 4xx the proxy decided itself (not the PACS's own 4xx)."""
    if not 400 <= response.status_code < 500:
        return None
    if response.headers.get("content-type", [""])[0] != "application/problem+json":
        return None
    code = response.json().get("code")
    return None if code == "upstream_rejected" else str(code)


def _runner(
    target: Target, tally: Tally, session: requests.Session
) -> Callable[[schemathesis.Case, str, str], None]:
    auth = {"Authorization": f"Bearer {target.token}"}
    base_url = target.proxy.url

    def run(case: schemathesis.Case, aim: str, accept: str) -> None:
        _aim(case, aim, target)
        headers = {**auth, "Accept": accept} if accept else dict(auth)
        if case.media_type == "multipart/related":
            headers["Content-Type"] = _STOW
        label = f"{case.operation.method.upper()} {case.operation.path}"
        before = len(target.relay.sent)
        response = case.call(base_url=base_url, session=session, headers=headers, timeout=60)
        sent = bytes(target.relay.sent[before:])
        tally.statuses[response.status_code] += 1
        tally.operations[label] += 1
        where = f"{label}: {case.method} {response.request.url} -> {response.status_code}"
        if response.status_code >= 500:
            tally.failures.append(f"{where}: {response.text[:300]}")
        if _TRACEBACK.search(response.content):
            tally.failures.append(f"{where}: a traceback in the body")
        code = _refused_by_proxy(response)
        if code is not None and code not in _DECIDED_ON_THE_ANSWER:
            reached = _upstream_requests(sent)
            lookups = [r for r in reached if r[0] == b"GET" and _MEMBERSHIP.match(r[1])]
            if reached != lookups or (lookups and code != "not_found"):
                tally.failures.append(f"{where} ({code}) reached the PACS: {reached}")
            if lookups:
                tally.refused_upstream["membership search"] += 1
        try:
            case.validate_response(response, checks=CHECKS, headers=auth)
        except FailureGroup as group:
            for failure in group.exceptions:
                tally.failures.append(f"{where}: {failure.title}: {failure.message[:400]}")
        except Failure as failure:
            tally.failures.append(f"{where}: {failure.title}: {failure.message[:400]}")

    return run


def _fuzz(strategy: st.SearchStrategy[schemathesis.Case], run: Callable[..., None], n: int) -> None:
    @hypothesis.settings(
        max_examples=n,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
        suppress_health_check=list(hypothesis.HealthCheck),
    )
    @hypothesis.given(strategy, st.sampled_from(_AIMS), _ACCEPTS)
    def fuzz(case: schemathesis.Case, aim: str, accept: str) -> None:
        run(case, aim, accept)

    fuzz()


@pytest.mark.slow
def test_fuzzing_finds_no_5xx_no_traceback_no_drift_and_no_refusal_upstream(
    target: Target,
) -> None:
    schema = _schema(target)
    tally = Tally()
    unnegatable: list[str] = []
    started = time.monotonic()
    with requests.Session() as session:
        run = _runner(target, tally, session)
        for result in schema.get_all_operations():
            operation = result.ok()
            for strategy in schema.get_strategies_from_examples(operation):
                _fuzz(strategy, run, 3)
            _fuzz(operation.as_strategy(generation_mode=GenerationMode.POSITIVE), run, EXAMPLES)
            try:
                _fuzz(operation.as_strategy(generation_mode=GenerationMode.NEGATIVE), run, EXAMPLES)
            except hypothesis.errors.Unsatisfiable:
                unnegatable.append(operation.label)  # nothing it takes can be made invalid
    seconds = time.monotonic() - started
    total = sum(tally.statuses.values())
    print(
        f"\nfuzzing: {total} requests in {seconds:.1f} s over {len(tally.operations)} operations;"
        f" statuses {dict(sorted(tally.statuses.items()))};"
        f" refusals that cost a membership search: {tally.refused_upstream['membership search']};"
        f" no invalid input for {unnegatable}"
    )
    assert not tally.failures, "\n".join(tally.failures[:40])
    # And the PACS is still standing.
    assert httpx.get(f"{target.proxy.url}/readyz", timeout=10).status_code == 200
    assert len(tally.operations) == len(list(schema.get_all_operations()))
    # The run reached both sides: answers served, and refusals of every kind the proxy makes.
    assert {200, 400, 401, 404} <= set(tally.statuses), tally.statuses


def test_a_huge_rendered_image_is_refused_and_the_pacs_never_asked(target: Target) -> None:
    """Regression (found by the fuzzing above): ``viewport=99999,99999`` made Orthanc 1.10 die
    and ``65536,4`` made it drop the connection (a 502); the proxy answers 400 and the PACS
    never sees the request."""
    granted = target.granted
    instance = (
        f"{target.proxy.dicomweb_url}/studies/{granted['study']}/series/{granted['series']}"
        f"/instances/{granted['instance']}"
    )
    headers = {"authorization": f"Bearer {target.token}"}
    for path in ("rendered", "thumbnail", "frames/1/rendered"):
        for viewport in ("99999,99999", "65536,4"):
            before = len(target.relay.sent)
            answer = httpx.get(f"{instance}/{path}?viewport={viewport}", headers=headers)
            assert answer.status_code == 400, answer.text
            assert answer.json()["code"] == "bad_request"
            assert _upstream_requests(bytes(target.relay.sent[before:])) == []
    rows = f"requestType=WADO&studyUID={granted['study']}&seriesUID={granted['series']}"
    rows += f"&objectUID={granted['instance']}&rows=99999&columns=99999"
    before = len(target.relay.sent)
    assert httpx.get(f"{target.proxy.dicomweb_url}/wado?{rows}", headers=headers).status_code == 400
    assert _upstream_requests(bytes(target.relay.sent[before:])) == []
    fine = httpx.get(f"{instance}/rendered?viewport=64,64", headers=headers)
    assert fine.status_code == 200 and fine.headers["content-type"] == "image/jpeg"
