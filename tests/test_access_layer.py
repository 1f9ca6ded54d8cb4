"""Access decisions in process, with a scripted policy and upstream: paths, searches narrowed
or filtered with exact paging, the audit log, admins, and a policy that is down."""

from __future__ import annotations

import email
import grp
import os
import re
import stat
from collections.abc import Collection
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import httpx
import orjson
import pytest

from shanoir_dicomweb_proxy import DicomWebProxy, Principal, Settings, Upstream
from shanoir_dicomweb_proxy._access import (
    ALL,
    FILTER_PAGE,
    INJECT_MAX,
    AccessMiddleware,
    Action,
    AuditLog,
    Visible,
)
from shanoir_dicomweb_proxy._backends import StaticIdentifierMap
from shanoir_dicomweb_proxy._dicom import to_xml
from shanoir_dicomweb_proxy._errors import ProxyError
from shanoir_dicomweb_proxy._identifiers import UidFormatter
from shanoir_dicomweb_proxy._routing import RoutingMiddleware
from shanoir_dicomweb_proxy._scope import get_dicomweb_request, get_upstream_rows, set_principal
from shanoir_dicomweb_proxy._store import ImportRow
from shanoir_dicomweb_proxy._types import ASGIApp

from .support.asgi import CORE, Answer, call
from .support.waiting import wait_for, whole_lines

EXAMS = 1200  # more than FILTER_PAGE and INJECT_MAX: both strategies are exercised
ROOT = "1.4.1"


def _real(exam: int) -> str:
    return f"2.25.{exam}"


def _public(exam: int) -> str:
    return f"{ROOT}.{exam}"


class _Pacs:
    """Studies 2.25.1 … 2.25.1200 in a fixed order; honours StudyInstanceUID lists, limit and
    offset like Orthanc; records every request."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        # A shuffled but fixed order, as an archive's own index would give.
        self.order = sorted(range(1, EXAMS + 1), key=lambda e: (e * 7919) % EXAMS)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        query = dict(parse_qsl(request.url.query.decode(), keep_blank_values=True))
        exams = self.order
        if "StudyInstanceUID" in query:
            wanted = set(query["StudyInstanceUID"].split(","))
            exams = [e for e in exams if _real(e) in wanted]
        offset, limit = int(query.get("offset", 0)), int(query.get("limit", 0))
        exams = exams[offset : offset + limit if limit else None]
        rows = [{"0020000D": {"vr": "UI", "Value": [_real(e)]}} for e in exams]
        body = orjson.dumps(rows)
        return httpx.Response(
            200, stream=httpx.ByteStream(body), headers={"content-type": "application/dicom+json"}
        )


class _Policy:
    def __init__(self, grants: dict[str, set[int]] | None = None, *, down: bool = False) -> None:
        self.grants = grants or {}
        self.down = down
        self.calls = 0

    async def visible(self, principal: Principal, action: Action) -> Visible:
        self.calls += 1
        if self.down:
            raise _Down("the policy cannot be reached")
        exams = self.grants.get(principal.subject, set())
        return ALL if exams == {0} else frozenset(exams)

    async def allowed(
        self, principal: Principal, action: Action, exam_ids: Collection[int]
    ) -> frozenset[int]:
        visible = await self.visible(principal, action)
        return frozenset(exam_ids) if visible is ALL else frozenset(exam_ids) & visible


class _Down(ProxyError):
    status = 503
    code = "access_unavailable"


def _principal(subject: str, *, admin: bool = False) -> Principal:
    return Principal(
        subject=subject,
        user_id=subject,
        username=subject,
        roles=frozenset({"ROLE_ADMIN"} if admin else ()),
        claims={},
        expires_at=None,
        is_admin=admin,
        token_id="t",
    )


class _As:
    """The app with a principal already in the scope, as AuthMiddleware leaves it."""

    def __init__(self, app: ASGIApp, principal: Principal | None) -> None:
        self.app, self.principal = app, principal

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if self.principal is not None:
            set_principal(scope, self.principal)
        await self.app(scope, receive, send)


def _build(pacs: _Pacs, policy: _Policy, tmp_path: Path, **access: Any) -> DicomWebProxy:
    data: dict[str, Any] = {
        **CORE,
        "mapping": {"backend": "static", "study_root": ROOT, "series_root": "1.4.2", "file": "x"},
        "access": {"backend": "static", "file": "x", **access},
        "logging": {"audit_log": str(tmp_path / "audit.jsonl")},
        "upstream": {"url": "http://pacs.invalid/dicom-web"},
    }
    settings = Settings.from_dict(data)
    upstream = Upstream(settings.upstream, transport=httpx.MockTransport(pacs))
    rows = [ImportRow(e, _real(e)) for e in range(1, EXAMS + 1)]
    return DicomWebProxy(
        settings, upstream=upstream, identifiers=StaticIdentifierMap(rows), access=policy
    )


async def _get(app: DicomWebProxy, who: Principal | None, path: str, query: str = "") -> Answer:
    return await call(_As(app, who), "GET", path.encode(), query.encode())


def _exams(answer: Answer) -> list[int]:
    return [int(r["0020000D"]["Value"][0].rsplit(".", 1)[1]) for r in orjson.loads(answer.body)]


GRANTS = {"alice": {3, 5}, "bob": set(range(1, 1001)), "admin": set(), "everyone": {0}}


async def test_paths_are_decided_before_the_upstream(tmp_path: Path) -> None:
    pacs = _Pacs()
    app = _build(pacs, _Policy(GRANTS), tmp_path)
    alice = _principal("alice")
    granted = await _get(app, alice, f"/dicomweb/studies/{_public(3)}/metadata")
    assert granted.status == 200
    denied = await _get(app, alice, f"/dicomweb/studies/{_public(4)}/metadata")
    missing = await _get(app, alice, f"/dicomweb/studies/{_public(99999)}/metadata")
    real = await _get(app, alice, f"/dicomweb/studies/{_real(4)}/series")
    assert denied.status == missing.status == real.status == 404
    assert denied.body == missing.body == real.body
    assert len(pacs.requests) == 1  # only the granted one reached the PACS
    # The same answer as for a study that does not exist, to a caller who may see everything.
    nowhere = await _get(app, _principal("everyone"), f"/dicomweb/studies/{_public(99999)}")
    assert denied.body == nowhere.body
    assert orjson.loads(nowhere.body) == {
        "status": 404,
        "code": "not_found",
        "detail": "no such study",
    }
    admin = await _get(app, _principal("admin", admin=True), f"/dicomweb/studies/{_public(4)}")
    assert admin.status == 200


async def test_deny_status_403_is_the_same_for_missing(tmp_path: Path) -> None:
    app = _build(_Pacs(), _Policy(GRANTS), tmp_path, deny_status=403)
    alice = _principal("alice")
    denied = await _get(app, alice, f"/dicomweb/studies/{_public(4)}/metadata")
    missing = await _get(app, alice, f"/dicomweb/studies/{_public(99999)}/metadata")
    assert denied.status == missing.status == 403 and denied.body == missing.body
    assert orjson.loads(denied.body) == {
        "status": 403,
        "code": "forbidden",
        "detail": "no such study",
    }


async def test_small_visible_set_is_injected(tmp_path: Path) -> None:
    pacs = _Pacs()
    app = _build(pacs, _Policy(GRANTS), tmp_path)
    answer = await _get(app, _principal("alice"), "/dicomweb/studies")
    assert sorted(_exams(answer)) == [3, 5]
    (sent,) = pacs.requests
    assert dict(parse_qsl(sent.url.query.decode()))["StudyInstanceUID"] == "2.25.3,2.25.5"
    # A query naming studies is narrowed to the visible ones.
    both = f"StudyInstanceUID={_public(3)},{_public(4)}"
    assert _exams(await _get(app, _principal("alice"), "/dicomweb/studies", both)) == [3]
    none = f"StudyInstanceUID={_public(4)}"
    nothing = await _get(app, _principal("alice"), "/dicomweb/studies", none)
    assert (nothing.status, nothing.body) == (200, b"[]")
    assert len(pacs.requests) == 2
    # Several visible studies asked, other keys kept as they were; study keys intersect.
    asked = f"PatientID=X*&StudyInstanceUID={_public(5)},{_public(4)},{_public(3)}&limit=9"
    assert sorted(_exams(await _get(app, _principal("alice"), "/dicomweb/studies", asked))) == [
        3,
        5,
    ]
    assert parse_qsl(pacs.requests[-1].url.query.decode()) == [
        ("PatientID", "X*"),
        ("StudyInstanceUID", "2.25.3,2.25.5"),
        ("limit", "9"),
    ]
    apart = f"StudyInstanceUID={_public(3)}&StudyInstanceUID={_public(5)}"
    nothing = await _get(app, _principal("alice"), "/dicomweb/studies", apart)
    assert (nothing.status, nothing.body, len(pacs.requests)) == (200, b"[]", 3)


async def test_a_visible_set_of_inject_max_is_injected(tmp_path: Path) -> None:
    pacs = _Pacs()
    app = _build(pacs, _Policy(GRANTS), tmp_path, inject_max=2)
    assert sorted(_exams(await _get(app, _principal("alice"), "/dicomweb/studies"))) == [3, 5]
    (sent,) = pacs.requests
    assert dict(parse_qsl(sent.url.query.decode()))["StudyInstanceUID"] == "2.25.3,2.25.5"


class _ByAction(_Policy):
    """Grants per (subject, action); records what it is asked."""

    def __init__(self, grants: dict[tuple[str, str], set[int]]) -> None:
        super().__init__()
        self.by_action = grants
        self.asked: list[tuple[str, list[int]]] = []

    async def visible(self, principal: Principal, action: Action) -> Visible:
        return frozenset(self.by_action.get((principal.subject, action), set()))

    async def allowed(
        self, principal: Principal, action: Action, exam_ids: Collection[int]
    ) -> frozenset[int]:
        self.asked.append((action, sorted(exam_ids)))
        return frozenset(exam_ids) & await self.visible(principal, action)


@pytest.mark.parametrize("retrieve", ["read", "download"])
async def test_each_request_is_decided_for_its_action(tmp_path: Path, retrieve: str) -> None:
    policy = _ByAction(
        {("alice", "read"): {3}, ("alice", "download"): {5}, ("alice", "write"): {7}}
    )
    app = _build(_Pacs(), policy, tmp_path, retrieve_action=retrieve)
    alice = _principal("alice")
    for exam in (3, 5, 7):
        await _get(app, alice, f"/dicomweb/studies/{_public(exam)}/metadata")
        await _get(app, alice, f"/dicomweb/studies/{_public(exam)}")
        stow = [(b"content-type", b'multipart/related; type="application/dicom"; boundary=b')]
        path = f"/dicomweb/studies/{_public(exam)}".encode()
        await call(_As(app, alice), "POST", path, headers=stow, body=b"--b--")
    asked = [(action, exams) for action, exams in policy.asked if len(exams) == 1]
    assert asked == [
        (action, [exam]) for exam in (3, 5, 7) for action in ("read", retrieve, "write")
    ]


@pytest.mark.parametrize("limit", [37, 100, 333])
async def test_filtered_search_pages_exactly(tmp_path: Path, limit: int) -> None:
    pacs = _Pacs()
    app = _build(pacs, _Policy(GRANTS), tmp_path)
    bob = _principal("bob")
    expected = [e for e in pacs.order if e <= 1000]  # bob's 1000 > INJECT_MAX: filtered
    assert len(expected) > INJECT_MAX
    pages: list[int] = []
    offset = 0
    while True:
        answer = await _get(app, bob, "/dicomweb/studies", f"limit={limit}&offset={offset}")
        page = _exams(answer)
        more = b"warning" in answer.headers
        assert len(page) == limit or not more  # full pages while more exist
        pages += page
        offset += limit
        if not more:
            break
    assert pages == expected  # no gap, no duplicate, the upstream's order
    assert all(b"StudyInstanceUID" not in r.url.query for r in pacs.requests)
    whole = await _get(app, bob, "/dicomweb/studies")
    assert _exams(whole) == expected and b"warning" not in whole.headers
    sizes = [int(dict(parse_qsl(r.url.query.decode()))["limit"]) for r in pacs.requests]
    assert max(sizes) == FILTER_PAGE  # the whole search
    # The first page of the first search asks for what it needs, not for a whole page.
    assert sizes[0] == min(FILTER_PAGE, (limit + 1) * 5 // 4 + 8)


async def test_everyone_and_nobody(tmp_path: Path) -> None:
    pacs = _Pacs()
    app = _build(pacs, _Policy(GRANTS), tmp_path)
    everything = await _get(app, _principal("everyone"), "/dicomweb/studies", "limit=5")
    assert _exams(everything) == pacs.order[:5]
    nobody = await _get(app, _principal("mallory"), "/dicomweb/studies")
    assert (nobody.status, nobody.body) == (200, b"[]")
    assert len(pacs.requests) == 1


async def test_policy_down_is_503_and_nothing_reaches_the_pacs(tmp_path: Path) -> None:
    pacs = _Pacs()
    app = _build(pacs, _Policy(GRANTS, down=True), tmp_path)
    for path in ("/dicomweb/studies", f"/dicomweb/studies/{_public(3)}/metadata"):
        answer = await _get(app, _principal("alice"), path)
        assert answer.status == 503
    assert pacs.requests == []


async def test_no_principal_is_401(tmp_path: Path) -> None:
    app = _build(_Pacs(), _Policy(GRANTS), tmp_path)
    assert (await _get(app, None, "/dicomweb/studies")).status == 401


async def test_every_decision_is_audited(tmp_path: Path) -> None:
    app = _build(_Pacs(), _Policy(GRANTS), tmp_path)
    async with app:
        await _get(app, _principal("alice"), f"/dicomweb/studies/{_public(3)}/metadata")
        await _get(app, _principal("alice"), f"/dicomweb/studies/{_public(4)}/metadata")
        await _get(app, _principal("admin", admin=True), f"/dicomweb/studies/{_public(4)}")
        await _get(app, _principal("alice"), "/dicomweb/studies")
        both = f"StudyInstanceUID={_public(3)},{_public(4)}"
        await _get(app, _principal("alice"), "/dicomweb/studies", both)
    lines = [orjson.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    summary = [(e["subject"], e["decision"], e["examinations"], e["status"]) for e in lines]
    assert summary == [
        ("alice", "allow", [3], 200),
        ("alice", "deny", [4], 404),
        ("admin", "admin", [4], 200),
        ("alice", "filter", [3, 5], 200),
        ("alice", "filter", [3], 200),
    ]
    assert lines[0]["route"] == "wado.metadata.study" and lines[0]["bytes"] > 0
    assert lines[2]["action"] == "read" and len(lines[0]["request_id"]) == 32


async def test_a_reference_to_an_invisible_series_is_cut_not_shown_real(tmp_path: Path) -> None:
    """A dataset of a readable study that names, without its study, a series of an examination
    the caller may not read (a SEG's ReferencedSeriesSequence item): the reference is emptied.
    It is a series the map knows, so it is never shown as an unmapped series with its real
    UID, whatever ``unmapped_series`` says."""
    mine, theirs = _real(3), _real(4)
    my_series, their_series = f"{mine}.1", f"{theirs}.1"
    metadata = [
        {
            "0020000D": {"vr": "UI", "Value": [mine]},
            "0020000E": {"vr": "UI", "Value": [my_series]},
            "00081115": {
                "vr": "SQ",
                "Value": [{"0020000E": {"vr": "UI", "Value": [their_series]}}],
            },
        }
    ]

    def pacs(request: httpx.Request) -> httpx.Response:
        body = orjson.dumps(metadata)
        return httpx.Response(
            200, stream=httpx.ByteStream(body), headers={"content-type": "application/dicom+json"}
        )

    data: dict[str, Any] = {
        **CORE,
        "mapping": {"backend": "static", "study_root": ROOT, "series_root": "1.4.2", "file": "x"},
        "access": {"backend": "static", "file": "x"},
        "logging": {"audit_log": str(tmp_path / "audit.jsonl")},
        "upstream": {"url": "http://pacs.invalid/dicom-web"},
    }
    settings = Settings.from_dict(data)
    rows = [ImportRow(3, mine, 31, my_series), ImportRow(4, theirs, 41, their_series)]
    app = DicomWebProxy(
        settings,
        upstream=Upstream(settings.upstream, transport=httpx.MockTransport(pacs)),
        identifiers=StaticIdentifierMap(rows),
        access=_Policy({"alice": {3}, "carol": {3, 4}}),
    )
    answer = await _get(app, _principal("alice"), f"/dicomweb/studies/{_public(3)}/metadata")
    assert answer.status == 200
    assert their_series.encode() not in answer.body and b"1.4.2.41" not in answer.body
    (row,) = orjson.loads(answer.body)
    assert row["0020000E"]["Value"] == ["1.4.2.31"]
    assert "Value" not in row["00081115"]["Value"][0]["0020000E"]
    # Who may read both examinations sees the reference, by its public UID.
    answer = await _get(app, _principal("carol"), f"/dicomweb/studies/{_public(3)}/metadata")
    (row,) = orjson.loads(answer.body)
    assert row["00081115"]["Value"][0]["0020000E"]["Value"] == ["1.4.2.41"]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_audit_log_is_created_for_its_owner_only(tmp_path: Path) -> None:
    """Who read what is personal data: the file is 0600 whatever the umask, again after
    logrotate moved it; with a group, 0640 and that group."""
    path = tmp_path / "audit.jsonl"
    previous = os.umask(0o022)
    try:
        log = AuditLog(str(path))
        log.start()
        log.write({"n": 1})
        log.close()
        assert _mode(path) == 0o600
        path.rename(tmp_path / "audit.jsonl.1")  # logrotate
        log = AuditLog(str(path))
        log.start()
        log.write({"n": 2})
        log.close()
        assert _mode(path) == 0o600
        shared = tmp_path / "shared.jsonl"
        group = grp.getgrgid(os.getgid()).gr_name
        log = AuditLog(str(shared), group=group)
        log.start()
        log.write({"n": 3})
        log.close()
    finally:
        os.umask(previous)
    assert _mode(shared) == 0o640
    assert shared.stat().st_gid == os.getgid()
    assert [orjson.loads(line) for line in path.read_text().splitlines()] == [{"n": 2}]


def test_the_audit_log_writes_a_batch_at_once_and_follows_logrotate(tmp_path: Path) -> None:
    """A request only queues its line: the writer thread writes what was queued in one system
    call (not one per line), and reopens the file when logrotate moved it meanwhile."""
    path = tmp_path / "audit.jsonl"
    log = AuditLog(str(path))
    for n in range(200):  # queued before start too: nothing is lost
        log.write({"n": n})
    before = _write_calls()
    log.start()
    wait_for(lambda: path.exists() and len(path.read_text().splitlines()) == 200, "the lines")
    assert _write_calls() - before < 20  # not one per line (200)
    path.rename(tmp_path / "audit.jsonl.1")  # logrotate, while the proxy runs
    log.write({"n": 200})
    log.close()
    assert [orjson.loads(line) for line in path.read_text().splitlines()] == [{"n": 200}]
    assert _mode(path) == 0o600
    rotated = (tmp_path / "audit.jsonl.1").read_text().splitlines()
    assert [orjson.loads(line)["n"] for line in rotated] == list(range(200))


def test_an_audit_log_that_cannot_be_written_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "gone" / "audit.jsonl"  # a folder that does not exist
    log = AuditLog(str(path))
    log.start()
    log.write({"n": 1})
    log.close()
    assert f"the audit log {path} could not be written, 1 line(s) lost" in caplog.text
    (tmp_path / "gone").mkdir()
    log.start()  # started again, and this time it can
    log.write({"n": 2})
    log.close()
    assert [orjson.loads(line) for line in path.read_text().splitlines()] == [{"n": 2}]


def test_an_audit_log_never_started_still_writes(tmp_path: Path) -> None:
    """A host that mounts the proxy without running its lifespan never calls start(): the
    first line starts the writer, rather than lines piling up in memory unwritten."""
    path = tmp_path / "audit.jsonl"
    log = AuditLog(str(path))
    log.write({"n": 1})
    wait_for(lambda: whole_lines(path) == ['{"n":1}'], "the line written", 5)
    log.close()
    log.write({"n": 2})  # a request that ends after close()
    wait_for(lambda: len(whole_lines(path)) == 2, "the late line written", 5)
    log.close()


def _write_calls() -> int:
    """The write system calls this process made so far (all threads)."""
    counters = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return int(counters["syscw"])


def test_an_audit_log_others_may_read_is_warned_of(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "audit.jsonl"
    path.touch(mode=0o644)
    path.chmod(0o644)
    log = AuditLog(str(path))
    log.start()
    log.close()
    assert f"the audit log {path} may be read by every user (mode 644)" in caplog.text


class _Below:
    """The layers below access as far as it can tell, minus the rewrite layer's own cut of
    invisible rows: every study row of :class:`_Pacs`, with public UIDs, in DICOM JSON or as
    DICOM XML parts, counted as the rewrite layer counts upstream rows. What access lets
    through of another examination shows here."""

    def __init__(self) -> None:
        self.pacs = _Pacs()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        request = get_dicomweb_request(scope)
        query = dict(request.query)
        offset, limit = int(query.get("offset", 0)), int(query.get("limit", 0))
        rows: list[dict[str, Any]] = [
            {"0020000D": {"vr": "UI", "Value": [_public(e)]}} for e in self.pacs.order
        ]
        rows.insert(7, {"00100020": {"vr": "LO", "Value": ["a row of no study"]}})
        rows.insert(9, {"0020000D": {"vr": "UI", "Value": [3]}})  # not a UID string
        rows = rows[offset : offset + limit if limit else None]
        counted = get_upstream_rows(scope)
        if counted is not None:
            counted[0] += len(rows)
        if b"xml" in dict(scope["headers"]).get(b"accept", b""):
            parts = b"".join(
                b"--b\r\nContent-Type: application/dicom+xml\r\n\r\n" + to_xml(r) + b"\r\n"
                for r in rows
            )
            body = parts + b"--b--"
            media = b'multipart/related; type="application/dicom+xml"; boundary=b'
        else:
            body, media = orjson.dumps(rows), b"application/dicom+json"
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-type", media)]}
        )
        await send({"type": "http.response.body", "body": body})


_XML_STUDY = re.compile(rb'tag="0020000D"[^>]*>\s*<Value number="1">([^<]+)</Value>')
_WARNING = b'299 shanoir-dicomweb-proxy "There are additional results that can be requested"'


def _rows(answer: Answer, xml: bool) -> list[int]:
    """The examinations of a search answer, checked to be well framed."""
    assert answer.headers[b"content-length"] == str(len(answer.body)).encode()
    media = answer.headers[b"content-type"]
    if not xml:
        assert media == b"application/dicom+json"
        return _exams(answer)
    assert media.startswith(b'multipart/related; type="application/dicom+xml"; boundary=')
    message = email.message_from_bytes(b"Content-Type: " + media + b"\r\n\r\n" + answer.body)
    parts = message.get_payload()
    assert isinstance(parts, list)
    exams = []
    for part in parts:
        assert part.get_content_type() == "application/dicom+xml"
        (study,) = _XML_STUDY.findall(part.get_payload(decode=True))
        exams.append(int(study.rsplit(b".", 1)[1]))
    return exams


@pytest.mark.parametrize("xml", [False, True], ids=["json", "xml"])
@pytest.mark.parametrize("who", ["bob", "dora"])  # dora sees the first and the last rows
async def test_a_filtered_search_drops_invisible_rows_by_itself(who: str, xml: bool) -> None:
    """The filtered search is itself a filter: the rows of examinations the caller may not see
    are dropped there even when nothing below cuts them (in the whole stack the rewrite layer
    cuts them too, which alone would leave short pages and a Warning that lies). A row that
    names no study (or not with a string) is no examination's: never shown."""
    below = _Below()
    grants = {**GRANTS, "dora": set(range(201, EXAMS + 1)), "eve": {99999}}
    access = AccessMiddleware(below, policy=_Policy(grants), formatter=UidFormatter(ROOT, "1.4.2"))
    headers = [(b"accept", b"application/dicom+xml" if xml else b"application/dicom+json")]
    expected = [e for e in below.pacs.order if e in grants[who]]  # > INJECT_MAX: filtered
    assert len(expected) > INJECT_MAX

    async def search(user: str, query: str = "") -> Answer:
        app = _As(RoutingMiddleware(access, base_path="/dicomweb"), _principal(user))
        return await call(app, "GET", b"/dicomweb/studies", query.encode(), headers=headers)

    pages: list[int] = []
    for offset in range(0, len(expected) + 100, 100):
        answer = await search(who, f"limit=100&offset={offset}")
        if xml and offset >= len(expected):  # an empty XML search is 204
            assert (answer.status, answer.body) == (204, b"")
            continue
        assert answer.status == 200
        page = _rows(answer, xml)
        assert page == expected[offset : offset + 100], offset
        more = offset + 100 < len(expected)
        assert answer.headers.get(b"warning") == (_WARNING if more else None), offset
        pages += page
    assert pages == expected
    whole = await search(who)
    assert _rows(whole, xml) == expected and b"warning" not in whole.headers
    # Nothing visible on any page: an empty search, as the upstream would answer it.
    access.inject_max = 0
    nothing = await search("eve")
    assert (nothing.status, nothing.body) == ((204, b"") if xml else (200, b"[]"))
    if not xml:
        assert nothing.headers[b"content-type"] == b"application/dicom+json"
