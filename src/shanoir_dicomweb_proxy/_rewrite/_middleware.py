"""The rewrite layer: public identifiers in, real UIDs upstream, public identifiers out.

On the way in, the study and series of the path and the UID keys of a search are turned into
the PACS's UIDs; a public UID that the map does not know (or a real UID passed as if it were
public) is a 404, or an empty search. On the way out every body and header is translated back
(:class:`~._responder.Responder`, with the rules of :mod:`.._dicom`): DICOM JSON and XML, each
Part 10 instance of a retrieve, links, Content-Location, Location and Warning.
"""

from __future__ import annotations

from collections.abc import Iterable

from cachetools import TTLCache

from .._dicom import (
    SERIES_INSTANCE_UID,
    SOP_INSTANCE_UID,
    STUDY_INSTANCE_UID,
    json_key,
    json_value,
)
from .._errors import NotFound
from .._headers import TrustedProxies, public_base_url
from .._request import DicomWebRequest, Level, Resource, Service
from .._scope import (
    get_dicomweb_request,
    get_upstream_rows,
    get_visibility,
    link_prefix,
    set_dicomweb_request,
)
from .._subrequests import empty_search, search_json
from .._types import ASGIApp, Receive, Scope, Send
from ._responder import Responder
from ._translator import IdentifierTranslator, NothingMatches

__all__ = ["TranslationMiddleware"]


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
        forwarded_allow_ips: Iterable[str] = ("127.0.0.1", "::1"),
        membership_ttl: float = 60.0,
    ) -> None:
        self.app = app
        self.translator = translator
        self.upstream_url = upstream_url.rstrip("/")
        self.public_url = public_url
        self.base_path = base_path
        self.trusted = TrustedProxies(forwarded_allow_ips)
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
        except NothingMatches:
            await empty_search(scope, send)
            return
        if translated.instance is not None or known.unmapped_series:
            await self._verify_membership(scope, receive, translated)
        set_dicomweb_request(scope, translated)
        public_base = public_base_url(
            scope, public_url=self.public_url, base_path=self.base_path, trusted=self.trusted
        )
        # Links in an answer to a signed link carry it, so that they work without a header too.
        public_base += link_prefix(scope)
        responder = Responder(
            self.translator,
            known,
            upstream_base=self.upstream_url,
            public_base=public_base,
            study_known=request.study is not None,
            head=request.method == "HEAD",
            send=send,
            visibility=get_visibility(scope),
            rows=get_upstream_rows(scope),
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
        wanted = {STUDY_INSTANCE_UID: study, SERIES_INSTANCE_UID: series}
        if instance is None:
            level, query = Level.SERIES, [("SeriesInstanceUID", series)]
        else:
            level, query = Level.INSTANCE, [("SOPInstanceUID", instance)]
            wanted[SOP_INSTANCE_UID] = instance
        query += [("includefield", json_key(t)) for t in (STUDY_INSTANCE_UID, SERIES_INSTANCE_UID)]
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
