"""What the rewrite layer does to an answer: every identifier, link and header to public form."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

from .._dicom import (
    UID_IN_TEXT,
    BodyRewriter,
    BufferedPart,
    JsonRewriter,
    MultipartRewriter,
    Part10Rewriter,
    PartRewriter,
    PassPart,
    Resolve,
    Translation,
    UidCollector,
    WholeBody,
    translate_xml,
)
from .._errors import UpstreamError
from .._headers import LINK_HEADERS, parse_media_type
from .._scope import Visibility
from .._types import Message, Send
from ._translator import IdentifierTranslator, Known

__all__ = ["Responder"]


class Responder:
    """Wraps ``send``: translates the head and the body of the upstream's answer.

    The head is held until the body's first output, so that a body that cannot be
    translated (a malformed instance first in a retrieve) still gets a clean error status.
    """

    def __init__(
        self,
        translator: IdentifierTranslator,
        known: Known,
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
        # Real UIDs met as a study (or series) that the map does not know, in any batch.
        self._unknown_studies: set[str] = set()
        self._unmapped_series: set[str] = set()
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
        # A series the map knows but this caller may not see is hidden, never shown as an
        # unmapped series with its real UID (a reference without its study, under a known one).
        # So are, where another attribute holds them, a study the caller may not see and one
        # the map does not know.
        self._unknown_studies |= collector.studies - known.studies.keys()
        self._unmapped_series |= collector.series - known.series.keys() - known.hidden
        hidden = known.hidden | self._unknown_studies
        if len(series) < len(known.series):
            hidden |= known.series.keys() - series.keys()
        if len(studies) < len(known.studies):
            hidden |= known.studies.keys() - studies.keys()
        patients = await self._translator.patients(known, studies)
        copies = await self._copies(known, studies) if not self._study_known else {}
        return Translation(
            studies=studies,
            series=series,
            expose_unmapped=self._translator.expose_unmapped,
            upstream_base=self._upstream_base,
            public_base=self._public_base,
            hidden=frozenset(hidden),
            unmapped=frozenset(self._unmapped_series - hidden),
            patients=patients,
            copies=copies,
        )

    async def _copies(
        self, known: Known, studies: Mapping[str, str]
    ) -> dict[str, tuple[tuple[str, str | None], ...]]:
        """For a search at the root: the other examinations each real study holds (copies)
        that the caller may see, and asked for if the search named studies."""
        translator = self._translator
        if translator.exam_series is None or not studies:
            return {}
        holders = await translator.exam_series.exams_of_studies(list(studies))
        extra: dict[str, list[int]] = {}
        for uid, exams in holders.items():
            asked = known.asked.get(uid)
            others = [
                e for e in exams if e != known.exams.get(uid) and (asked is None or e in asked)
            ]
            if others:
                extra[uid] = others
        if self._visibility is not None and extra:
            candidates = {e for exams in extra.values() for e in exams}
            unsure = candidates - self._visible - self._hidden
            if unsure:
                visible = set(await self._visibility(frozenset(unsure))) & unsure
                self._visible |= visible
                self._hidden |= unsure - visible
            extra = {u: [e for e in exams if e in self._visible] for u, exams in extra.items()}
        names = await translator.names(known, {e for exams in extra.values() for e in exams})
        study_uid = translator.formatter.study_uid
        return {
            uid: tuple((study_uid(e), names.get(e)) for e in exams)
            for uid, exams in extra.items()
            if exams
        }

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

    async def _xml(self, body: bytes) -> list[bytes]:
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
        uids = set(UID_IN_TEXT.findall(text))
        if not uids:
            return text
        translation = await self.resolve(UidCollector(others=uids))

        def swap(match: re.Match[str]) -> str:
            uid = match.group(0)
            return translation.study(uid) or translation.series.get(uid) or "<uid>"

        return UID_IN_TEXT.sub(swap, text)
