"""The whole stack: :func:`create_app` and the app it returns."""

from __future__ import annotations

import logging
from types import TracebackType

from starlette.middleware.cors import CORSMiddleware

from ._access import AccessMiddleware, AccessPolicy, AllowAll, AuditLog
from ._auth import AuthMiddleware, AuthUnavailable, TokenValidator
from ._backends import ManagedIdentifierMap, build_identifier_map, open_store
from ._config import Settings
from ._edge import ErrorMiddleware, send_json
from ._errors import ConfigError
from ._identifiers import IdentifierMap, UidFormatter
from ._observability import CacheCounts, ObservabilityMiddleware
from ._policies import CachingAccessPolicy, ManagedAccessPolicy, build_access_policy
from ._probes import Probes
from ._rewrite import RewriteMiddleware
from ._routing import RoutingMiddleware, route_path
from ._store import CachingIdentifierMap, SqliteIdentifierMap, SqliteStore, StoreError
from ._stow import SeriesRegistrar, StowMiddleware
from ._translating import IdentifierTranslator, TranslationMiddleware
from ._types import ASGIApp, Receive, Scope, Send
from ._upstream import Upstream, UpstreamProxy

__all__ = ["DicomWebProxy", "create_app"]

logger = logging.getLogger("shanoir_dicomweb_proxy")

_PROBE_HEADERS = [(b"content-type", b"application/json"), (b"cache-control", b"no-store")]


class DicomWebProxy:
    """The ASGI app returned by :func:`create_app`.

    Serves the DICOMweb service under ``[server] base_path``, and ``[server] healthz_path`` and
    ``readyz_path`` (:class:`~shanoir_dicomweb_proxy._probes.Probes`) at its root. The
    upstream client is opened by the ASGI lifespan; a host app that mounts this one (Starlette
    runs no lifespan for mounted apps) enters it in its own lifespan with ``async with proxy:``.

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
        server = settings.server
        mapping = settings.mapping
        app: ASGIApp = UpstreamProxy(self.upstream, max_upload_bytes=server.max_upload_bytes)
        links = {
            "upstream_url": settings.upstream.url,
            "public_url": server.public_url,
            "base_path": server.base_path,
        }
        self._owned: list[ManagedIdentifierMap | ManagedAccessPolicy] = []
        self._store: SqliteStore | None = None
        self.audit: AuditLog | None = None
        membership: TranslationMiddleware | None = None
        if mapping.backend == "identity" and identifiers is None:
            if access is not None or settings.access.backend != "allow_all":
                raise ConfigError(
                    f"{settings.source}: [access] backend: decisions are made per examination, "
                    'which needs a [mapping] backend other than "identity"'
                )
            app = RewriteMiddleware(app, **links)
        else:
            wants_store = (identifiers is None and mapping.backend == "sqlite") or (
                access is None and settings.access.backend == "sqlite"
            )
            if wants_store:  # one store for the map and the policy
                self._store = open_store(settings)
            if identifiers is None:
                managed_map = build_identifier_map(settings, store=self._store)
                assert managed_map is not None
                self._owned.append(managed_map)
                identifiers = managed_map
            translator = IdentifierTranslator(
                identifiers,
                UidFormatter(mapping.study_root, mapping.series_root),
                expose_unmapped=mapping.unmapped_series == "expose",
            )
            app = StowMiddleware(
                app,
                translator=translator,
                upstream_url=settings.upstream.url,
                max_upload_bytes=server.max_upload_bytes,
                registrar=_registrar(identifiers),
            )
            app = membership = TranslationMiddleware(
                app, translator=translator, membership_ttl=mapping.cache_ttl, **links
            )
            if access is None and settings.access.backend == "allow_all":
                access = AllowAll()
            elif access is None:
                managed_policy = build_access_policy(settings, store=self._store)
                self._owned.append(managed_policy)
                access = managed_policy
            log = settings.logging.audit_log
            self.audit = AuditLog(log) if log else None
            app = AccessMiddleware(
                app,
                policy=access,
                formatter=translator.formatter,
                retrieve_action=settings.access.retrieve_action,
                deny_status=settings.access.deny_status,
                inject_max=settings.access.inject_max,
                audit=self.audit,
            )
        self.identifiers = identifiers
        app = RoutingMiddleware(app, base_path=server.base_path)
        auth = settings.auth
        if auth.enabled:
            self.validator = validator or TokenValidator(auth)
            app = AuthMiddleware(
                app,
                validator=self.validator,
                allow_query_token=auth.allow_query_token,
                allow_cookie_token=auth.allow_cookie_token,
                cookie_name=auth.cookie_name,
            )
        else:
            logger.warning(
                "AUTHENTICATION IS DISABLED ([auth] enabled = false): every client that can "
                "reach this proxy can read everything the upstream holds"
            )
        app = ErrorMiddleware(app)
        cors = settings.cors
        if cors.allow_origins:
            app = CORSMiddleware(
                app,
                allow_origins=list(cors.allow_origins),
                allow_methods=list(cors.allow_methods),
                allow_headers=list(cors.allow_headers),
                expose_headers=list(cors.expose_headers),
                allow_credentials=cors.allow_credentials,
                max_age=cors.max_age,
            )
        self.observability = ObservabilityMiddleware(
            app,
            access_log=settings.logging.access_log,
            metrics_path=server.metrics_path,
            caches=_caches(self.validator, identifiers, access, membership),
        )
        self.app = self.observability
        self.probes = Probes(self)

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
        for owned in self._owned:
            await owned.aclose()
        if self._store is not None:
            self._store.close()
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


def _caches(
    validator: TokenValidator | None,
    identifiers: IdentifierMap | None,
    access: AccessPolicy | None,
    membership: TranslationMiddleware | None,
) -> dict[str, CacheCounts]:
    """The caches of the stack whose hits and misses are exported, by name."""
    if isinstance(access, ManagedAccessPolicy):
        access = access.policy
    found = {
        "token": validator,
        "identifiers": identifiers if isinstance(identifiers, CachingIdentifierMap) else None,
        "access": access if isinstance(access, CachingAccessPolicy) else None,
        "membership": membership,
    }
    return {name: cache for name, cache in found.items() if cache is not None}


def _registrar(identifiers: IdentifierMap) -> SeriesRegistrar | None:
    """How an upload registers its new series: with the embedded store only."""
    if not isinstance(identifiers, ManagedIdentifierMap):
        return None
    managed = identifiers
    inner = managed.inner
    if not isinstance(inner, SqliteIdentifierMap):
        return None
    sqlite_map = inner

    async def register(exam_id: int, series_uid: str) -> None:
        try:
            entry = await sqlite_map.register_series(exam_id, series_uid)
        except StoreError as exc:  # registered under another examination meanwhile
            logger.warning("an uploaded series was not registered: %s", exc)
            return
        managed.learn_series(entry)

    return register
