"""The whole stack: :func:`create_app` and the app it returns (DESIGN §2).

The layers, outermost first: observability, CORS, errors, auth, routing, then either access
and the rewrite layer with STOW (a mapping is configured) or the link rewriter alone
(``[mapping] backend = "identity"``), then the upstream. Each is built by one small function
below, in that order.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from types import TracebackType
from typing import Any

from starlette.middleware.cors import CORSMiddleware

from ._access import AccessMiddleware, AccessPolicy, AuditLog
from ._auth import AuthMiddleware, TokenValidator
from ._backends import Backends
from ._config import Settings
from ._errors import AuthUnavailable, ConfigError
from ._headers import TrustedProxies
from ._identifiers import IdentifierMap, UidFormatter
from ._observability import CacheCounts, ObservabilityMiddleware
from ._probes import Probes
from ._problems import ErrorMiddleware, send_json
from ._rewrite import IdentifierTranslator, RewriteMiddleware, StowMiddleware, TranslationMiddleware
from ._routing import RoutingMiddleware
from ._scope import route_path
from ._signed_links import LinkIssuer, LinkKeys, SignedLinks
from ._types import ASGIApp, Receive, Scope, Send
from ._upstream import Upstream, UpstreamProxy

__all__ = ["DicomWebProxy", "create_app"]

logger = logging.getLogger("shanoir_dicomweb_proxy")

_PROBE_HEADERS = [(b"content-type", b"application/json"), (b"cache-control", b"no-store")]


class DicomWebProxy:
    """The ASGI app returned by :func:`create_app`.

    Serves the DICOMweb service under ``[server] base_path``, and ``[server] healthz_path`` and
    ``readyz_path`` at its root. The upstream client is opened by the ASGI lifespan; a host app
    that mounts this one (Starlette runs no lifespan for mounted apps) enters it in its own
    lifespan with ``async with proxy:``.

    ``identifiers`` replaces the identifier map ``[mapping] backend`` would build (a host app's
    own :class:`IdentifierMap`), and ``access`` the access policy of ``[access] backend``; the
    caller then closes them.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        upstream: Upstream | None = None,
        validator: TokenValidator | None = None,
        identifiers: IdentifierMap | None = None,
        access: AccessPolicy | None = None,
    ) -> None:
        self.settings = settings
        self.upstream = upstream or Upstream(settings.upstream)
        self.validator: TokenValidator | None = None
        if settings.auth.enabled:
            self.validator = validator or TokenValidator(settings.auth)
        self.audit: AuditLog | None = None
        self.backends: Backends | None = None
        caches: dict[str, CacheCounts] = {}
        app: ASGIApp = UpstreamProxy(
            self.upstream, max_upload_bytes=settings.server.max_upload_bytes
        )
        if settings.mapping.backend == "identity" and identifiers is None:
            if access is not None or settings.access.backend != "allow_all":
                raise ConfigError(
                    f"{settings.source}: [access] backend: decisions are made per examination, "
                    'which needs a [mapping] backend other than "identity"'
                )
            app = RewriteMiddleware(app, **_links(settings))
        else:
            self.backends = Backends.build(
                settings, identifiers=identifiers, access=access, upstream=self.upstream
            )
            log = settings.logging
            self.audit = (
                AuditLog(log.audit_log, group=log.audit_log_group) if log.audit_log else None
            )
            app = _mapped(app, settings, self.backends, self.audit, caches)
        self.identifiers = self.backends.identifiers if self.backends is not None else None
        app = RoutingMiddleware(
            app,
            base_path=settings.server.base_path,
            max_upload_bytes=settings.server.max_upload_bytes,
        )
        links = settings.links
        keys = LinkKeys.load(links.keys_file) if links.enabled else None
        if keys is not None and self.backends is not None:
            server = settings.server
            app = LinkIssuer(
                app,
                keys=keys,
                policy=self.backends.access,
                identifiers=self.backends.identifiers,
                formatter=UidFormatter(settings.mapping.study_root, settings.mapping.series_root),
                max_ttl=links.max_ttl,
                base_path=server.base_path,
                public_url=server.public_url,
                trusted=TrustedProxies(server.forwarded_allow_ips),
                audit=self.audit,
            )
        if self.validator is not None:
            caches["token"] = self.validator
            app = _authenticated(app, settings, self.validator)
        if keys is not None:
            app = SignedLinks(app, keys=keys, base_path=settings.server.base_path)
        else:
            logger.warning(
                "AUTHENTICATION IS DISABLED ([auth] enabled = false): every client that can "
                "reach this proxy can read everything the upstream holds"
            )
        app = _cors(ErrorMiddleware(app), settings)
        self.observability = ObservabilityMiddleware(
            app,
            access_log=settings.logging.access_log,
            metrics_path=settings.server.metrics_path,
            caches=_ordered(caches),
        )
        self.app = self.observability
        self.probes = Probes(
            self.upstream,
            validator=self.validator,
            store=self.backends.store if self.backends is not None else None,
            timeout=settings.server.ready_timeout,
            platforms=self.backends.platforms if self.backends is not None else None,
            shanoir=self.backends.shanoir if self.backends is not None else None,
        )

    async def __aenter__(self) -> DicomWebProxy:
        _ = self.upstream.client
        if self.audit is not None:
            self.audit.start()
        if self.validator is not None:
            try:
                await self.validator.keys.keys(None)  # fetch the issuer's keys early
            except AuthUnavailable:
                logger.warning("the identity provider cannot be reached yet; tokens get 503")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.upstream.aclose()
        if self.audit is not None:
            self.audit.close()
        if self.backends is not None:
            await self.backends.aclose()
        if self.validator is not None:
            await self.validator.aclose()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] == "http":
            path = route_path(scope) or "/"  # "" turns a probe off: never match it
            server = self.settings.server
            if path == server.healthz_path:
                await send_json(send, 200, {"status": "ok"}, headers=_PROBE_HEADERS)
                return
            if path == server.readyz_path:
                results = await self.probes.readiness()
                ready = all(result.ok for result in results)
                body = {
                    "status": "ready" if ready else "not ready",
                    "checks": {result.name: result.as_json() for result in results},
                }
                await send_json(send, 200 if ready else 503, body, headers=_PROBE_HEADERS)
                return
        await self.app(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self.__aenter__()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.__aexit__(None, None, None)
                await send({"type": "lifespan.shutdown.complete"})
                return


def create_app(settings: Settings) -> DicomWebProxy:
    """Build the whole stack from settings: CORS, errors, auth, routing, rewriting, upstream."""
    return DicomWebProxy(settings)


def _links(settings: Settings) -> dict[str, Any]:
    """Where links point: the upstream's base, and the public base answers show instead."""
    server = settings.server
    return {
        "upstream_url": settings.upstream.url,
        "public_url": server.public_url,
        "base_path": server.base_path,
        "forwarded_allow_ips": server.forwarded_allow_ips,
    }


def _mapped(
    app: ASGIApp,
    settings: Settings,
    backends: Backends,
    audit: AuditLog | None,
    caches: dict[str, CacheCounts],
) -> ASGIApp:
    """Access, then translation, then STOW, in front of ``app``; their caches into ``caches``."""
    mapping = settings.mapping
    translator = IdentifierTranslator(
        backends.identifiers,
        UidFormatter(mapping.study_root, mapping.series_root),
        expose_unmapped=mapping.unmapped_series == "expose",
        exam_series=backends.exam_series,
        exam_subjects=backends.exam_subjects,
    )
    app = StowMiddleware(
        app,
        translator=translator,
        upstream_url=settings.upstream.url,
        max_upload_bytes=settings.server.max_upload_bytes,
        registrar=backends.registrar,
        store=backends.uploads,
        stream=settings.upstream.stream_uploads,
    )
    translation = TranslationMiddleware(
        app, translator=translator, membership_ttl=mapping.cache_ttl, **_links(settings)
    )
    if backends.identifier_cache is not None:
        caches["identifiers"] = backends.identifier_cache
    if backends.access_cache is not None:
        caches["access"] = backends.access_cache
    caches["membership"] = translation
    return AccessMiddleware(
        translation,
        policy=backends.access,
        formatter=translator.formatter,
        retrieve_action=settings.access.retrieve_action,
        deny_status=settings.access.deny_status,
        inject_max=settings.access.inject_max,
        audit=audit,
        copies=backends.exam_series is not None,
    )


def _authenticated(app: ASGIApp, settings: Settings, validator: TokenValidator) -> ASGIApp:
    auth = settings.auth
    return AuthMiddleware(
        app,
        validator=validator,
        allow_query_token=auth.allow_query_token,
        allow_cookie_token=auth.allow_cookie_token,
        cookie_name=auth.cookie_name,
    )


def _cors(app: ASGIApp, settings: Settings) -> ASGIApp:
    """Starlette's CORS layer, when ``[cors] allow_origins`` names any origin."""
    cors = settings.cors
    if not cors.allow_origins:
        return app
    return CORSMiddleware(
        app,
        allow_origins=list(cors.allow_origins),
        allow_methods=list(cors.allow_methods),
        allow_headers=list(cors.allow_headers),
        expose_headers=list(cors.expose_headers),
        allow_credentials=cors.allow_credentials,
        max_age=cors.max_age,
    )


def _ordered(caches: Mapping[str, CacheCounts]) -> dict[str, CacheCounts]:
    """The caches in the order metrics list them: token, identifiers, access, membership."""
    order = ("token", "identifiers", "access", "membership")
    return {name: caches[name] for name in order if name in caches}
