"""The translation layer: public identifiers in, real UIDs upstream, public identifiers out.

On the way in, the study and series of the path and the UID keys of a search are turned into
the PACS's UIDs; a public UID that the map does not know (or a real UID passed as if it were
public) is a 404, or an empty search. On the way out every body and header is translated back
(:mod:`._translate` holds the rules): DICOM JSON and XML, each Part 10 instance of a retrieve,
links, Content-Location, Location and Warning.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import orjson
from cachetools import TTLCache

from ._bodies import JsonRewriter, Resolve, translate_xml
from ._edge import send_json
from ._errors import NotFound, UpstreamError
from ._headers import (
    LINK_HEADERS,
    parse_media_type,
    public_base_url,
    wants_dicom_xml,
)
from ._identifiers import IdentifierMap, UidFormatter
from ._multipart import (
    BodyRewriter,
    BufferedPart,
    MultipartRewriter,
    PartRewriter,
    PassPart,
    WholeBody,
)
from ._part10 import Part10Rewriter
from ._routing import (
    DicomWebRequest,
    Level,
    Resource,
    Service,
    get_dicomweb_request,
    set_dicomweb_request,
)
from ._translate import Translation, UidCollector
from ._types import ASGIApp, Message, Receive, Scope, Send

__all__ = [
    "IdentifierTranslator",
    "TranslationMiddleware",
    "Visibility",
    "count_upstream_rows",
    "json_value",
    "run_search",
    "search_json",
    "set_visibility",
]

_STUDY_KEYS = frozenset({"studyinstanceuid", "0020000d"})
_SERIES_KEYS = frozenset({"seriesinstanceuid", "0020000e"})
_UID_LIST = re.compile(r"[,\\]")
_UID_LIKE = re.compile(r"\b[0-9]+(?:\.[0-9]+){2,}\b")


def is_study_key(key: str) -> bool:
    """Whether a query key matches on Study Instance UID (by keyword or tag, maybe nested)."""
    return key.rpartition(".")[2].lower() in _STUDY_KEYS


def split_uid_list(value: str) -> list[str]:
    """The UIDs of a UID list match value (comma or backslash separated)."""
    return [v for v in _UID_LIST.split(value) if v]


class _NothingMatches(Exception):
    """A search for identifiers none of which exist: the answer is empty."""


@dataclass(frozen=True, slots=True)
class _Known:
    """Real ↔ public pairs learned while translating one request, and the examination of
    each real study and series UID."""

    studies: dict[str, str]
    series: dict[str, str]
    exams: dict[str, int] = field(default_factory=dict)
    #: The series of the path stands for itself (``unmapped_series = "expose"``): the map
    #: cannot say which study it belongs to.
    unmapped_series: bool = False


#: Which examinations the caller may see: given examination IDs, the visible ones.
Visibility = Callable[[frozenset[int]], Awaitable[Collection[int]]]
_VISIBILITY_KEY = "shanoir_dicomweb_proxy.visibility"


_ROWS_KEY = "shanoir_dicomweb_proxy.upstream_rows"


def count_upstream_rows(scope: Scope) -> list[int]:
    """A counter of the rows of the upstream's JSON answer to this request, dropped or not
    (``counter[0]``), for a caller that pages through the upstream itself."""
    counter = [0]
    scope[_ROWS_KEY] = counter
    return counter


def set_visibility(scope: Scope, visibility: Visibility) -> None:
    """Restrict what the translation layer shows in this request to visible examinations: a
    dataset or reference of any other is treated like one of an unknown study."""
    scope[_VISIBILITY_KEY] = visibility


class IdentifierTranslator:
    """Public UIDs ↔ real UIDs through an :class:`IdentifierMap` and a :class:`UidFormatter`."""

    def __init__(
        self, identifiers: IdentifierMap, formatter: UidFormatter, *, expose_unmapped: bool
    ) -> None:
        self.identifiers = identifiers
        self.formatter = formatter
        self.expose_unmapped = expose_unmapped

    async def real_studies(self, public: Iterable[str]) -> dict[str, str]:
        """Public study UID → real study UID, for the known ones."""
        ids = {uid: self.formatter.exam_id(uid) for uid in public}
        wanted = {i for i in ids.values() if i is not None}
        found = await self.identifiers.studies_by_id(wanted) if wanted else {}
        return {uid: found[i] for uid, i in ids.items() if i is not None and i in found}

    async def real_series(self, public: Iterable[str], *, exam_id: int | None) -> dict[str, str]:
        """Public series UID → real series UID, for the known ones (in ``exam_id`` if given).

        With ``unmapped_series = "expose"``, a value that is not a public UID stands for
        itself when the map does not know it as a real series UID either.
        """
        values = set(public)
        ids = {uid: self.formatter.acquisition_id(uid) for uid in values}
        wanted = {i for i in ids.values() if i is not None}
        entries = await self.identifiers.series_by_id(wanted) if wanted else {}
        result: dict[str, str] = {}
        for uid, i in ids.items():
            entry = entries.get(i) if i is not None else None
            if entry is not None and (exam_id is None or entry.exam_id == exam_id):
                result[uid] = entry.series_uid
        if self.expose_unmapped:
            others = {uid for uid, i in ids.items() if i is None}
            mapped = await self.identifiers.series_by_uid(others) if others else {}
            result.update((uid, uid) for uid in others if uid not in mapped)
        return result

    async def public(self, collector: UidCollector, known: _Known) -> None:
        """Learn the public UIDs of what ``collector`` holds into ``known``."""
        studies = collector.studies - known.studies.keys()
        if studies:
            found = await self.identifiers.studies_by_uid(studies)
            for uid, exam_id in found.items():
                known.studies[uid] = self.formatter.study_uid(exam_id)
                known.exams[uid] = exam_id
        series = collector.series - known.series.keys()
        if series:
            entries = await self.identifiers.series_by_uid(series)
            for uid, entry in entries.items():
                known.series[uid] = self.formatter.series_uid(entry.acquisition_id)
                known.exams[uid] = entry.exam_id

    async def translate_request(self, request: DicomWebRequest) -> tuple[DicomWebRequest, _Known]:
        """The request with real UIDs; raises NotFound, or _NothingMatches for a search."""
        known = _Known({}, {})
        study = series = None
        exam_id = None
        if request.study is not None:
            found = await self.real_studies([request.study])
            study = found.get(request.study)
            if study is None:
                raise NotFound("no such study")
            exam_id = self.formatter.exam_id(request.study)
            assert exam_id is not None
            known.studies[study] = request.study
            known.exams[study] = exam_id
        if request.series is not None:
            found = await self.real_series([request.series], exam_id=exam_id)
            series = found.get(request.series)
            if series is None:
                raise NotFound("no such series")
            if series == request.series:
                known = replace(known, unmapped_series=True)
            known.series[series] = request.series
            if exam_id is not None:
                known.exams[series] = exam_id
        query = request.query
        if request.resource is Resource.SEARCH:
            query = await self._translate_query(query, exam_id)
        return replace(request, study=study, series=series, query=query), known

    async def _translate_query(
        self, query: tuple[tuple[str, str], ...], exam_id: int | None
    ) -> tuple[tuple[str, str], ...]:
        result: list[tuple[str, str]] = []
        for key, value in query:
            attribute = key.rpartition(".")[2].lower()
            if attribute in _STUDY_KEYS:
                values = split_uid_list(value)
                found = await self.real_studies(values)
                pairs = [(found[v], v) for v in values if v in found]
            elif attribute in _SERIES_KEYS:
                values = split_uid_list(value)
                found = await self.real_series(values, exam_id=exam_id)
                pairs = [(found[v], v) for v in values if v in found]
            else:
                result.append((key, value))
                continue
            if not pairs:
                raise _NothingMatches
            result.append((key, ",".join(real for real, _ in pairs)))
        return tuple(result)


class TranslationMiddleware:
    """Translate identifiers in both directions around the upstream (DESIGN §2, §3).

    Takes the place of :class:`~shanoir_dicomweb_proxy.RewriteMiddleware` when a mapping is
    configured: links are rewritten to the public base as part of the translation.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        translator: IdentifierTranslator,
        upstream_url: str,
        public_url: str = "",
        base_path: str = "",
        membership_ttl: float = 60.0,
    ) -> None:
        self.app = app
        self.translator = translator
        self.upstream_url = upstream_url.rstrip("/")
        self.public_url = public_url
        self.base_path = base_path
        # (study, series, instance) real UIDs the upstream confirmed belong together.
        self._members: TTLCache[tuple[str, str, str | None], bool] = TTLCache(
            maxsize=100_000, ttl=membership_ttl
        )
        #: Memberships found in the cache, and those asked of the upstream (metrics).
        self.cache_hits = 0
        self.cache_misses = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = get_dicomweb_request(scope)
        try:
            translated, known = await self.translator.translate_request(request)
        except _NothingMatches:
            await empty_search(scope, send)
            return
        if translated.instance is not None or known.unmapped_series:
            await self._verify_membership(scope, receive, translated)
        set_dicomweb_request(scope, translated)
        public_base = public_base_url(scope, public_url=self.public_url, base_path=self.base_path)
        responder = _Responder(
            self.translator,
            known,
            upstream_base=self.upstream_url,
            public_base=public_base,
            study_known=request.study is not None,
            head=request.method == "HEAD",
            send=send,
            visibility=scope.get(_VISIBILITY_KEY),
            rows=scope.get(_ROWS_KEY),
        )
        await self.app(scope, receive, responder.send)

    async def _verify_membership(
        self, scope: Scope, receive: Receive, request: DicomWebRequest
    ) -> None:
        """Make sure the series (and instance) of the path belong to the study of the path,
        by asking the upstream: a PACS is not trusted to refuse a foreign series or instance
        under another study's path, and what the map does not know it cannot vouch for."""
        study, series, instance = request.study, request.series, request.instance
        assert study is not None and series is not None
        key = (study, series, instance)
        if key in self._members:
            self.cache_hits += 1
            return
        self.cache_misses += 1
        wanted = {"0020000D": study, "0020000E": series}
        if instance is None:
            level, query = Level.SERIES, [("SeriesInstanceUID", series)]
        else:
            level, query = Level.INSTANCE, [("SOPInstanceUID", instance)]
            wanted["00080018"] = instance
        query += [("includefield", "0020000D"), ("includefield", "0020000E")]
        check = DicomWebRequest(
            method="GET",
            service=Service.QIDO,
            resource=Resource.SEARCH,
            level=level,
            query=tuple(query),
        )
        rows = await search_json(self.app, scope, receive, check)
        if not any(all(json_value(row, t) == v for t, v in wanted.items()) for row in rows):
            raise NotFound("no such series" if instance is None else "no such instance")
        self._members[key] = True


def json_value(row: dict[str, Any], tag: str) -> object:
    """The first value of ``tag`` in a DICOM JSON row, or None."""
    element = row.get(tag)
    values = element.get("Value") if isinstance(element, dict) else None
    return values[0] if isinstance(values, list) and values else None


async def run_search(
    app: ASGIApp, scope: Scope, receive: Receive, request: DicomWebRequest, *, accept: bytes
) -> tuple[bytes, bytes]:
    """Run the search ``request`` through ``app`` (the rest of the stack) on behalf of the
    request of ``scope``, asking for ``accept``: the answer's content type and body, both
    empty for 204."""
    headers = [(k, v) for k, v in scope["headers"] if k != b"accept"]
    inner = {**scope, "headers": [*headers, (b"accept", accept)]}
    set_dicomweb_request(inner, request)
    status = 0
    content_type = b""
    chunks: list[bytes] = []

    async def collect(message: Message) -> None:
        nonlocal status, content_type
        if message["type"] == "http.response.start":
            status = message["status"]
            content_type = dict(message.get("headers", [])).get(b"content-type", b"")
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(inner, receive, collect)
    if status == 204:
        return b"", b""
    if status != 200:
        raise UpstreamError(f"the upstream answered a search with status {status}")
    return content_type, b"".join(chunks)


async def search_json(
    app: ASGIApp, scope: Scope, receive: Receive, request: DicomWebRequest
) -> list[dict[str, Any]]:
    """:func:`run_search` for DICOM JSON: the rows."""
    _, body = await run_search(app, scope, receive, request, accept=b"application/dicom+json")
    try:
        rows = orjson.loads(body or b"[]")
    except orjson.JSONDecodeError:
        rows = None
    if not isinstance(rows, list):
        raise UpstreamError("the upstream answered a search with something else than a list")
    return [r for r in rows if isinstance(r, dict)]


async def empty_search(scope: Scope, send: Send) -> None:
    """The answer to a search that cannot match: 204 for XML, else 200 with ``[]``."""
    if wants_dicom_xml(scope):
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})
        return
    await send_json(send, 200, [], headers=[(b"content-type", b"application/dicom+json")])


class _Responder:
    """Wraps ``send``: translates the head and the body of the upstream's answer.

    The head is held until the body's first output, so that a body that cannot be
    translated (a deflated instance first in a retrieve) still gets a clean error status.
    """

    def __init__(
        self,
        translator: IdentifierTranslator,
        known: _Known,
        *,
        upstream_base: str,
        public_base: str,
        study_known: bool,
        head: bool,
        send: Send,
        visibility: Visibility | None = None,
        rows: list[int] | None = None,
    ) -> None:
        self._translator = translator
        self._rows = rows
        self._visibility = visibility
        self._visible: set[int] = set()
        self._hidden: set[int] = set()
        self._known = known
        self._upstream_base = upstream_base
        self._public_base = public_base
        self._study_known = study_known
        self._head = head
        self._send = send
        self._start: Message | None = None
        self._rewriter: BodyRewriter | None = None

    async def resolve(self, collector: UidCollector) -> Translation:
        known = self._known
        await self._translator.public(collector, known)
        studies, series = known.studies, known.series
        if self._visibility is not None:
            exams = {known.exams[uid] for uid in (*studies, *series) if uid in known.exams}
            unsure = exams - self._visible - self._hidden
            if unsure:
                visible = set(await self._visibility(frozenset(unsure))) & unsure
                self._visible |= visible
                self._hidden |= unsure - visible
            studies = {u: p for u, p in studies.items() if known.exams.get(u) in self._visible}
            series = {u: p for u, p in series.items() if known.exams.get(u) in self._visible}
        return Translation(
            studies=studies,
            series=series,
            expose_unmapped=self._translator.expose_unmapped,
            upstream_base=self._upstream_base,
            public_base=self._public_base,
        )

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            await self._on_start(message)
            return
        if message["type"] != "http.response.body":
            await self._send(message)
            return
        more = message.get("more_body", False)
        body = message.get("body", b"")
        if self._rewriter is not None:
            body = await self._rewriter.feed(body)
            if not more:
                body += await self._rewriter.close()
        if self._start is not None and (body or not more):
            start, self._start = self._start, None
            await self._send(start)
        if body or not more:
            await self._send({**message, "body": body})

    async def _on_start(self, message: Message) -> None:
        headers: list[tuple[bytes, bytes]] = []
        content_type = encoding = None
        for name, value in message.get("headers", []):
            if name == b"content-type":
                content_type = value
            elif name == b"content-encoding":
                encoding = value
            elif name in LINK_HEADERS:
                link = await self._link(value.decode("latin-1"))
                if link is None:
                    continue
                value = link.encode("latin-1")
            elif name == b"warning":
                value = (await self._scrub(value.decode("latin-1"))).encode("latin-1")
            headers.append((name, value))
        rewriter = self._body_rewriter(content_type)
        if rewriter is not None and message["status"] not in (204, 304):
            if encoding not in (None, b"identity"):
                raise UpstreamError("the upstream sent an encoded body that must be translated")
            headers = [(n, v) for n, v in headers if n != b"content-length"]
            self._rewriter = None if self._head else rewriter
        self._start = {**message, "headers": headers}

    def _body_rewriter(self, content_type: bytes | None) -> BodyRewriter | None:
        if content_type is None:
            return None
        media = parse_media_type(content_type.decode("latin-1"))
        resolve: Resolve = self.resolve
        known = self._study_known
        if media.type in ("application/dicom+json", "application/json"):
            return JsonRewriter(resolve, study_known=known, rows=self._rows)
        if media.type == "application/dicom+xml":
            return BufferedPart(self._xml)
        if media.type == "application/dicom":
            return WholeBody(Part10Rewriter(resolve, study_known=known))
        boundary = media.params.get("boundary")
        if media.type != "multipart/related" or not boundary:
            return None
        related = media.related_type
        new_part: Callable[[list[tuple[bytes, bytes]]], PartRewriter]
        if related == "application/dicom+xml":
            new_part = lambda _: BufferedPart(self._xml)  # noqa: E731
        elif related == "application/dicom":
            new_part = lambda _: Part10Rewriter(resolve, study_known=known)  # noqa: E731
        else:
            new_part = lambda _: PassPart()  # noqa: E731
        return MultipartRewriter(
            boundary.encode("latin-1"), new_part, rewrite_header=self._part_header
        )

    async def _xml(self, body: bytes) -> bytes | None:
        if self._rows is not None:
            self._rows[0] += 1
        return await translate_xml(body, self.resolve, study_known=self._study_known)

    async def _part_header(self, name: bytes, value: bytes) -> bytes | None:
        if name.lower() == b"content-location":
            link = await self._link(value.decode("latin-1"))
            return None if link is None else link.encode("latin-1")
        return value

    async def _link(self, url: str) -> str | None:
        collector = UidCollector()
        collector.add_link(url)
        translation = await self.resolve(collector)
        return translation.link(url, study_known=self._study_known)

    async def _scrub(self, text: str) -> str:
        """A Warning text with the UIDs it quotes translated, or masked when unknown."""
        uids = set(_UID_LIKE.findall(text))
        if not uids:
            return text
        translation = await self.resolve(UidCollector(studies=uids, series=set(uids)))

        def swap(match: re.Match[str]) -> str:
            uid = match.group(0)
            return translation.study(uid) or translation.series.get(uid) or "<uid>"

        return _UID_LIKE.sub(swap, text)
