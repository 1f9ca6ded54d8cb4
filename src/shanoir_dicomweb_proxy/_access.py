"""Access decisions per examination (DESIGN §4, §5): the policy protocol and its simplest form.

Actions: ``read`` (search, metadata, frames, rendered, thumbnails, bulk data), ``download``
(Part 10 retrieve, when ``[access] retrieve_action = "download"``), ``write`` (STOW). A grant
of ``download`` also allows ``read``; ``write`` allows nothing else.
"""

from __future__ import annotations

import functools
import logging
import logging.handlers
import queue
import time
import uuid
from collections.abc import Collection, Mapping
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, Final, Literal, Protocol, runtime_checkable

import orjson

from ._auth import InvalidToken, Principal, get_principal
from ._bodies import xml_value
from ._errors import BadRequest, NotFound, ProxyError, UpstreamError
from ._headers import header, parse_media_type, wants_dicom_xml
from ._identifiers import UidFormatter
from ._multipart import split_parts
from ._observability import RECORD_KEY, RequestRecord
from ._routing import DicomWebRequest, Resource, get_dicomweb_request, set_dicomweb_request
from ._stow import set_instance_audit, set_write_check
from ._translating import (
    count_upstream_rows,
    empty_search,
    is_study_key,
    json_value,
    run_search,
    search_json,
    set_visibility,
    split_uid_list,
)
from ._types import ASGIApp, Message, Receive, Scope, Send

__all__ = [
    "ALL",
    "AccessMiddleware",
    "AccessPolicy",
    "Action",
    "AllowAll",
    "AuditLog",
    "Everything",
    "Visible",
    "grant_covers",
]

Action = Literal["read", "download", "write"]
ACTIONS: Final[tuple[Action, ...]] = ("read", "download", "write")


class Everything:
    """The answer of :meth:`AccessPolicy.visible` for a principal who sees every examination."""

    _instance: Everything | None = None

    def __new__(cls) -> Everything:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "ALL"


ALL: Final = Everything()

#: Every examination, or the IDs of those visible.
Visible = Everything | frozenset[int]


def grant_covers(granted: Action, wanted: Action) -> bool:
    """Whether a grant of ``granted`` allows ``wanted`` (``download`` includes ``read``)."""
    return granted == wanted or (granted == "download" and wanted == "read")


@runtime_checkable
class AccessPolicy(Protocol):
    """Who may do what on which examination. Implementations must be safe to call concurrently
    and must raise (never answer "allowed") when they cannot decide."""

    async def visible(self, principal: Principal, action: Action) -> Visible:
        """Every examination ``principal`` may ``action``: :data:`ALL`, or their IDs."""
        ...

    async def allowed(
        self, principal: Principal, action: Action, exam_ids: Collection[int]
    ) -> frozenset[int]:
        """The subset of ``exam_ids`` that ``principal`` may ``action``."""
        ...


class AllowAll:
    """``[access] backend = "allow_all"``: every authenticated caller may do everything."""

    async def visible(self, principal: Principal, action: Action) -> Visible:
        return ALL

    async def allowed(
        self, principal: Principal, action: Action, exam_ids: Collection[int]
    ) -> frozenset[int]:
        return frozenset(exam_ids)


class Forbidden(ProxyError):
    status = 403
    code = "forbidden"


#: The detail of a denial: the same words as for a study that does not exist.
DENIED = "no such study"

#: Up to this many visible examinations (``[access] inject_max``), a search is narrowed
#: upstream with a UID list; above, the upstream's results are filtered while paging through.
INJECT_MAX = 200
#: Rows asked of the upstream per page when filtering, at most.
FILTER_PAGE = 500

_READ_RESOURCES = frozenset(
    {
        Resource.SEARCH,
        Resource.METADATA,
        Resource.FRAMES,
        Resource.RENDERED,
        Resource.THUMBNAIL,
        Resource.BULKDATA,
    }
)


class AccessMiddleware:
    """Decide every request per examination before anything reaches the upstream (DESIGN §4).

    Sits between routing and identifier translation: it sees public study UIDs, which name
    examination IDs through ``formatter``. A path's examination must be allowed for the
    request's action; searches see only visible examinations. Denied and nonexistent answer
    alike (``deny_status``, detail "no such study"), decided before any upstream request.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        policy: AccessPolicy,
        formatter: UidFormatter,
        retrieve_action: Action = "read",
        deny_status: int = 404,
        inject_max: int = INJECT_MAX,
        audit: AuditLog | None = None,
    ) -> None:
        self.app = app
        self.policy = policy
        self.formatter = formatter
        self.retrieve_action = retrieve_action
        self.deny_status = deny_status
        self.inject_max = inject_max
        self.audit = audit

    def action(self, request: DicomWebRequest) -> Action:
        """The action a request needs."""
        if request.resource is Resource.STORE:
            return "write"
        if request.resource is Resource.RETRIEVE:
            return self.retrieve_action
        assert request.resource in _READ_RESOURCES
        return "read"

    def deny(self) -> ProxyError:
        return NotFound(DENIED) if self.deny_status == 404 else Forbidden(DENIED)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = get_dicomweb_request(scope)
        principal = get_principal(scope)
        if principal is None:
            if isinstance(self.policy, AllowAll):
                await self.app(scope, receive, send)  # authentication is off: nobody to decide on
                return
            raise InvalidToken("a bearer token is required", realm="dicomweb", error=None)
        action = self.action(request)
        record = _Record(scope, principal, action, request)
        if self.audit is not None:
            send = record.wrap(send)  # status and bytes, for the audit line only
        try:
            await self._decide(scope, receive, send, request, principal, action, record)
        except ProxyError as exc:
            record.status = exc.status
            raise
        finally:
            if record.observed is not None:
                record.observed.decision = record.decision or "error"
            if self.audit is not None:
                self.audit.write(record.entry())

    async def _decide(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        request: DicomWebRequest,
        principal: Principal,
        action: Action,
        record: _Record,
    ) -> None:
        if request.resource is Resource.STORE and self.audit is not None:
            audit = self.audit
            set_instance_audit(scope, lambda fields: audit.write({**record.entry(), **fields}))
        if principal.is_admin:
            record.decision = "admin"
            if request.study is not None:
                record.exams = [e for e in [self.formatter.exam_id(request.study)] if e]
            await self.app(scope, receive, send)
            return
        if not isinstance(self.policy, AllowAll):
            # What the answer shows of other examinations (nested references, rows of a foreign
            # study the PACS would send) is cut to what this principal may read, whatever the
            # PACS sends. With allow_all there is nothing to cut: no lookup per batch.
            set_visibility(scope, functools.partial(self.policy.allowed, principal, "read"))
            if request.resource is Resource.STORE:
                # An upload is decided instance by instance, on the examination each names.
                set_write_check(scope, functools.partial(self.policy.allowed, principal, "write"))
        if request.study is not None:
            exam = self.formatter.exam_id(request.study)
            record.exams = [exam] if exam is not None else []
            allowed = await self.policy.allowed(principal, action, [exam]) if exam else ()
            if exam is None or exam not in allowed:
                record.decision = "deny"
                raise self.deny()
            record.decision = "allow"
            await self.app(scope, receive, send)
            return
        if request.resource is Resource.STORE:
            record.decision = "per-instance"
            await self.app(scope, receive, send)
            return
        visible = await self.policy.visible(principal, action)
        if visible is ALL:
            record.decision = "allow"
            await self.app(scope, receive, send)
            return
        assert isinstance(visible, frozenset)
        record.decision = "filter"
        await self._search(scope, receive, send, request, visible, record)

    async def _search(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        request: DicomWebRequest,
        visible: frozenset[int],
        record: _Record,
    ) -> None:
        query, asked = _narrow(request.query, visible, self.formatter)
        exams = asked if asked is not None else visible
        record.exams = sorted(exams)
        if not exams:
            await empty_search(scope, send)
            return
        if asked is not None or len(exams) <= self.inject_max:
            uids = ",".join(self.formatter.study_uid(e) for e in sorted(exams))
            if asked is None:
                query = (*query, ("StudyInstanceUID", uids))
            set_dicomweb_request(scope, replace(request, query=query))
            await self.app(scope, receive, send)
            return
        await _filtered_search(self.app, scope, receive, send, request, exams, self.formatter)


def _narrow(
    query: tuple[tuple[str, str], ...], visible: frozenset[int], formatter: UidFormatter
) -> tuple[tuple[tuple[str, str], ...], frozenset[int] | None]:
    """The query with its study UID keys cut down to visible examinations, and those
    examinations (None when the query names no study)."""
    asked: set[int] | None = None
    result: list[tuple[str, str]] = []
    for key, value in query:
        if not is_study_key(key):
            result.append((key, value))
            continue
        ids = {formatter.exam_id(v) for v in split_uid_list(value)}
        keep = {i for i in ids if i is not None and i in visible}
        asked = keep if asked is None else asked & keep
        result.append((key, ",".join(formatter.study_uid(i) for i in sorted(keep)) or "0"))
    return tuple(result), (frozenset(asked) if asked is not None else None)


async def _filtered_search(
    app: ASGIApp,
    scope: Scope,
    receive: Receive,
    send: Send,
    request: DicomWebRequest,
    visible: frozenset[int],
    formatter: UidFormatter,
) -> None:
    """Answer a search with the rows of visible examinations only, paging exactly.

    The upstream is asked page by page (at most ``FILTER_PAGE`` rows, sized from the client's
    ``offset`` and ``limit``, in its own stable order) with the client's query; rows of other
    examinations are dropped, then the client's ``offset`` rows skipped and ``limit`` rows
    kept. ``Warning: 299`` is set only when one more visible row exists. Rows are DICOM JSON
    objects, or DICOM XML parts when the client asks for XML.
    """
    xml = wants_dicom_xml(scope)
    offset, limit, query = _paging(request.query)
    kept: list[bytes] = []
    skipped = 0
    more = False
    upstream_offset = 0
    # Rows wanted (one more tells whether there are more): the first page asks for them and
    # a quarter more, later ones for what is missing at the share of visible rows seen.
    wanted = offset + limit + 1 if limit is not None else None
    page_size = FILTER_PAGE if wanted is None else min(FILTER_PAGE, wanted + wanted // 4 + 8)
    while not more:
        page_query = (*query, ("limit", str(page_size)), ("offset", str(upstream_offset)))
        page = replace(request, query=page_query)
        inner = dict(scope)
        seen = count_upstream_rows(inner)
        rows = await (_xml_rows if xml else _json_rows)(app, inner, receive, page)
        for study, row in rows:
            exam = formatter.exam_id(study) if study is not None else None
            if exam is None or exam not in visible:
                continue
            if skipped < offset:
                skipped += 1
            elif limit is None or len(kept) < limit:
                kept.append(row)
            else:
                more = True
                break
        if seen[0] < page_size:  # the upstream's own count: rows dropped on the way count too
            break
        upstream_offset += page_size
        if wanted is not None:
            found = skipped + len(kept)
            share = max(found, 1) / upstream_offset
            page_size = min(FILTER_PAGE, int((wanted - found) / share * 1.25) + 8)
    if xml and not kept:
        await empty_search(scope, send)
        return
    if xml:
        boundary = uuid.uuid4().hex
        head = f"--{boundary}\r\nContent-Type: {_XML}\r\n\r\n".encode()
        body = b"".join(head + row + b"\r\n" for row in kept) + f"--{boundary}--".encode()
        media = f'multipart/related; type="{_XML}"; boundary={boundary}'.encode()
    else:
        body = b"[" + b",".join(kept) + b"]"
        media = b"application/dicom+json"
    headers = [(b"content-type", media), (b"content-length", str(len(body)).encode())]
    if more:
        warning = '299 shanoir-dicomweb-proxy "There are additional results that can be requested"'
        headers.append((b"warning", warning.encode()))
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


_XML = "application/dicom+xml"
_Rows = list[tuple[str | None, bytes]]


async def _json_rows(
    app: ASGIApp, scope: Scope, receive: Receive, request: DicomWebRequest
) -> _Rows:
    """One page of a search in DICOM JSON: each row's study UID, and the row."""
    rows = await search_json(app, scope, receive, request)
    return [(_study_of(row), orjson.dumps(row)) for row in rows]


def _study_of(row: dict[str, Any]) -> str | None:
    study = json_value(row, "0020000D")
    return study if isinstance(study, str) else None


async def _xml_rows(
    app: ASGIApp, scope: Scope, receive: Receive, request: DicomWebRequest
) -> _Rows:
    """One page of a search in DICOM XML: each part's study UID, and the part."""
    content_type, body = await run_search(app, scope, receive, request, accept=_XML.encode())
    if not body:
        return []
    media = parse_media_type(content_type.decode("latin-1"))
    boundary = media.params.get("boundary")
    if media.type == _XML:
        parts = [body]
    elif media.type == "multipart/related" and boundary:
        parts = await split_parts(boundary.encode("latin-1"), body)
    else:
        raise UpstreamError(f"the upstream answered an XML search with {media.type}")
    return [(xml_value(part, 0x0020000D), part) for part in parts]


def _paging(
    query: tuple[tuple[str, str], ...],
) -> tuple[int, int | None, tuple[tuple[str, str], ...]]:
    offset, limit = 0, None
    rest: list[tuple[str, str]] = []
    for key, value in query:
        if key in ("offset", "limit"):
            if not value.isdigit():
                raise BadRequest(f"{key} must be a non-negative integer")
            if key == "offset":
                offset = int(value)
            else:
                limit = int(value) or None  # limit=0: no limit, as in Orthanc
        else:
            rest.append((key, value))
    return offset, limit, tuple(rest)


class _Record:
    """What the audit log says of one request, filled in as it goes."""

    def __init__(
        self, scope: Scope, principal: Principal, action: Action, request: DicomWebRequest
    ) -> None:
        self.time = time.time()
        self.observed: RequestRecord | None = scope.get(RECORD_KEY)
        if self.observed is not None:
            self.request_id = self.observed.request_id
        else:  # this layer without the observability layer around it
            supplied = header(scope, b"x-request-id")
            self.request_id = supplied.decode("latin-1")[:64] if supplied else uuid.uuid4().hex
        self.principal = principal
        self.action = action
        self.route = request.route
        self.exams: list[int] = []
        #: None until decided: the audit line says "deny", the metrics "error".
        self.decision: str | None = None
        self.status = 0
        self.bytes = 0

    def wrap(self, send: Send) -> Send:
        async def counting(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.status = message["status"]
            elif message["type"] == "http.response.body":
                self.bytes += len(message.get("body", b""))
            await send(message)

        return counting

    def entry(self) -> dict[str, Any]:
        return {
            "time": datetime.fromtimestamp(self.time, UTC).isoformat(timespec="milliseconds"),
            "request_id": self.request_id,
            "subject": self.principal.subject,
            "user_id": self.principal.user_id,
            "action": self.action,
            "examinations": self.exams,
            "decision": self.decision or "deny",
            "route": self.route,
            "status": self.status,
            "bytes": self.bytes,
        }


class AuditLog:
    """JSON lines, one per decision, written by a thread of their own: a request only puts its
    line on a queue. The file is reopened when logrotate moves it (``WatchedFileHandler``)."""

    def __init__(self, path: str) -> None:
        self._queue: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
        handler = logging.handlers.WatchedFileHandler(path, encoding="utf-8", delay=True)
        handler.setFormatter(logging.Formatter("%(message)s"))
        self._listener = logging.handlers.QueueListener(self._queue, handler)
        self._logger = logging.Logger("shanoir_dicomweb_proxy.audit")
        self._logger.addHandler(logging.handlers.QueueHandler(self._queue))
        self._logger.propagate = False
        self._handler = handler
        self._started = False

    def start(self) -> None:
        if not self._started:
            self._listener.start()
            self._started = True

    def write(self, entry: Mapping[str, Any]) -> None:
        self._logger.info(orjson.dumps(entry).decode())

    def close(self) -> None:
        if self._started:
            self._listener.stop()  # writes what is queued
            self._started = False
        self._handler.close()
