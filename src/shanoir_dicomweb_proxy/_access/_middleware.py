"""The access layer (DESIGN §4): every request decided per examination before anything reaches
the upstream; searches narrowed to, or filtered down to, what the caller may see."""

from __future__ import annotations

import functools
from dataclasses import replace

from .._errors import Forbidden, InvalidToken, NotFound, ProxyError
from .._identifiers import UidFormatter
from .._request import DicomWebRequest, Level, Resource, is_study_key, split_uid_list
from .._scope import (
    Principal,
    get_dicomweb_request,
    get_principal,
    set_dicomweb_request,
    set_instance_audit,
    set_visibility,
    set_write_check,
)
from .._subrequests import empty_search
from .._types import ASGIApp, Receive, Scope, Send
from ._audit import AuditLog, AuditRecord
from ._policy import ALL, AccessPolicy, Action, AllowAll, LinkPolicy
from ._search import filtered_search

__all__ = ["DENIED", "INJECT_MAX", "AccessMiddleware"]

#: The detail of a denial: the same words as for a study that does not exist.
DENIED = "no such study"

#: Up to this many visible examinations (``[access] inject_max``), a search is narrowed
#: upstream with a UID list; above, the upstream's results are filtered while paging through.
INJECT_MAX = 200

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
        copies: bool = False,
    ) -> None:
        self.app = app
        self.policy = policy
        self.formatter = formatter
        self.retrieve_action = retrieve_action
        self.deny_status = deny_status
        self.inject_max = inject_max
        self.audit = audit
        #: One real study may hold several examinations (``ExamSeries`` maps): searches at the
        #: root are paged here, exactly, whatever the upstream returns.
        self.copies = copies

    def action(self, request: DicomWebRequest) -> Action:
        """The action a request needs."""
        if request.resource is Resource.STORE:
            return "write"
        if request.resource is Resource.RETRIEVE:
            return self.retrieve_action
        assert request.resource in _READ_RESOURCES
        return "read"

    def _pages_copies(self, request: DicomWebRequest) -> bool:
        """Whether a search must be paged here rather than by the upstream: at the root, one
        upstream row may stand for several examinations (copies), one row each."""
        return self.copies and request.resource is Resource.SEARCH and request.study is None

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
        record = AuditRecord(scope, principal, action, request)
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
        record: AuditRecord,
    ) -> None:
        policy = self.policy
        if principal.link is not None:
            # A signed link is decided by what it grants alone, never by the backends.
            policy = LinkPolicy(principal.link)
            request = self._within_link(scope, request, principal.link.series)
        if request.resource is Resource.STORE and self.audit is not None:
            audit = self.audit
            set_instance_audit(scope, lambda fields: audit.write({**record.entry(), **fields}))
        if principal.is_admin:
            record.decision = "admin"
            if request.study is not None:
                record.exams = [e for e in [self.formatter.exam_id(request.study)] if e]
            if self._pages_copies(request):
                await filtered_search(self.app, scope, receive, send, request, ALL, self.formatter)
                return
            await self.app(scope, receive, send)
            return
        if not isinstance(policy, AllowAll):
            # What the answer shows of other examinations (nested references, rows of a foreign
            # study the PACS would send) is cut to what this principal may read, whatever the
            # PACS sends. With allow_all there is nothing to cut: no lookup per batch.
            set_visibility(scope, functools.partial(policy.allowed, principal, "read"))
            if request.resource is Resource.STORE:
                # An upload is decided instance by instance, on the examination each names.
                set_write_check(scope, functools.partial(policy.allowed, principal, "write"))
        if request.study is not None:
            exam = self.formatter.exam_id(request.study)
            record.exams = [exam] if exam is not None else []
            allowed = await policy.allowed(principal, action, [exam]) if exam else ()
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
        visible = await policy.visible(principal, action)
        if visible is ALL:
            record.decision = "allow"
            if self._pages_copies(request):
                await filtered_search(self.app, scope, receive, send, request, ALL, self.formatter)
                return
            await self.app(scope, receive, send)
            return
        assert isinstance(visible, frozenset)
        record.decision = "filter"
        await self._search(scope, receive, send, request, visible, record)

    def _within_link(
        self, scope: Scope, request: DicomWebRequest, series: str | None
    ) -> DicomWebRequest:
        """A request made with a link to one acquisition: only that series, its instances and
        the study's own search row; the study's other resources are denied."""
        if series is None:
            return request
        if request.series is not None:
            if request.series != series:
                raise self.deny()
            return request
        if request.resource is not Resource.SEARCH:
            raise self.deny()
        if request.level is Level.STUDY:
            return request
        narrowed = replace(request, query=(*request.query, ("SeriesInstanceUID", series)))
        set_dicomweb_request(scope, narrowed)
        return narrowed

    async def _search(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        request: DicomWebRequest,
        visible: frozenset[int],
        record: AuditRecord,
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
            narrowed = replace(request, query=query)
            if self._pages_copies(request):
                app = self.app
                await filtered_search(app, scope, receive, send, narrowed, exams, self.formatter)
                return
            set_dicomweb_request(scope, narrowed)
            await self.app(scope, receive, send)
            return
        await filtered_search(self.app, scope, receive, send, request, exams, self.formatter)


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
