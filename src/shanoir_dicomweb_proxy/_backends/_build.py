"""The backends ``[mapping]`` and ``[access]`` configure, built once (DESIGN §5).

:func:`build_identifier_map` and :func:`build_access_policy` build one each, behind its cache;
:meth:`Backends.build` builds both for an app, sharing one embedded store between them, and
keeps what the app needs besides (the store to probe, the caches to count, how an upload
registers a new series).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, Literal, Self, TypeVar

from .._access import AccessPolicy, Action, AllowAll, Visible
from .._config import Settings
from .._errors import ConfigError
from .._identifiers import ExamSeries, ExamSubjects, IdentifierMap, SeriesRegistrar
from .._oauth import ClientCredentials
from .._scope import Principal
from .._store import SqliteStore, StoreError
from .._types import ASGIApp
from .._upstream import Upstream
from ._cache import CachingAccessPolicy, CachingIdentifierMap
from ._platform import HttpAccessPolicy, HttpIdentifierMap, PlatformClient
from ._shanoir import ShanoirAccessPolicy, ShanoirDirectory, ShanoirIdentifierMap, ShanoirStow
from ._shanoir_api import ShanoirApi
from ._sqlite import SqliteAccessPolicy, SqliteIdentifierMap
from ._static import StaticAccessPolicy, StaticIdentifierMap

__all__ = [
    "Backends",
    "ManagedAccessPolicy",
    "ManagedIdentifierMap",
    "build_access_policy",
    "build_identifier_map",
    "open_store",
    "shanoir_directory",
]

_logger = logging.getLogger("shanoir_dicomweb_proxy.mapping")

_MAXSIZE = 100_000

Closer = Callable[[], Awaitable[None]]
_B = TypeVar("_B")


class _Owning:
    """Owns what a backend opened (its store, its HTTP client): call :meth:`aclose` (or use
    ``async with``) when done."""

    _closers: list[Closer]

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Release what the backend holds (the store it opened, its HTTP client); idempotent."""
        closers, self._closers = self._closers, []
        for close in closers:
            await close()


class ManagedIdentifierMap(CachingIdentifierMap, _Owning):
    """The configured backend behind its cache, owning what the backend opened: call
    :meth:`aclose` (or use ``async with``) when done.
    """

    def __init__(
        self, inner: IdentifierMap, *, ttl: float, maxsize: int, closers: Iterable[Closer] = ()
    ) -> None:
        super().__init__(inner, ttl=ttl, maxsize=maxsize)
        self._closers = list(closers)


class ManagedAccessPolicy(_Owning):
    """The configured policy (behind its cache, but for ``allow_all``), owning what its backend
    opened: call :meth:`aclose` (or use ``async with``) when done."""

    def __init__(
        self,
        policy: AccessPolicy,
        *,
        closers: Iterable[Closer] = (),
        cache: CachingAccessPolicy | None = None,
    ) -> None:
        self.policy = policy
        #: The cache in front of the backend (None for ``allow_all``).
        self.cache = cache
        self._closers = list(closers)

    def __repr__(self) -> str:
        return f"ManagedAccessPolicy({self.policy!r})"

    async def visible(self, principal: Principal, action: Action) -> Visible:
        """Every examination ``principal`` may ``action``: :data:`ALL`, or their IDs."""
        return await self.policy.visible(principal, action)

    async def allowed(
        self, principal: Principal, action: Action, exam_ids: Collection[int]
    ) -> frozenset[int]:
        """The subset of ``exam_ids`` that ``principal`` may ``action``."""
        return await self.policy.allowed(principal, action, exam_ids)


def build_identifier_map(
    settings: Settings,
    *,
    store: SqliteStore | None = None,
    upstream: Upstream | None = None,
    shanoir: ShanoirDirectory | None = None,
) -> ManagedIdentifierMap | None:
    """The identifier map ``[mapping]`` configures, behind a cache of ``cache_ttl`` seconds;
    None for ``backend = "identity"``.

    ``sqlite`` uses ``store`` when given (and leaves it open), else opens ``[store] path`` and
    closes it in :meth:`ManagedIdentifierMap.aclose`. ``static`` reads its file now: a bad
    file is a :class:`ConfigError`. ``shanoir`` reads the ``shanoir`` directory given (else its
    own) and asks the PACS through ``upstream`` (else a client of its own); its answers depend
    on the caller, so the shared cache is off (Shanoir's answers are kept by the directory).
    """
    mapping = settings.mapping
    if mapping.backend == "identity":
        return None
    closers: list[Closer] = []
    if mapping.backend == "shanoir":
        if upstream is None:
            upstream = Upstream(settings.upstream)
            closers.append(upstream.aclose)
        directory = shanoir if shanoir is not None else _shanoir(settings, closers)
        inner: IdentifierMap = ShanoirIdentifierMap(
            directory, upstream, patient_name=settings.shanoir.patient_name
        )
        return ManagedIdentifierMap(inner, ttl=0, maxsize=1, closers=closers)
    inner = _backend(settings, "mapping", store, closers, _MAPS)
    return ManagedIdentifierMap(inner, ttl=mapping.cache_ttl, maxsize=_MAXSIZE, closers=closers)


def build_access_policy(
    settings: Settings,
    *,
    store: SqliteStore | None = None,
    shanoir: ShanoirDirectory | None = None,
) -> ManagedAccessPolicy:
    """The access policy ``[access]`` configures, behind a cache of ``cache_ttl`` seconds
    (``allow_all`` is not cached).

    ``sqlite`` uses ``store`` when given (the identifier map's, left open), else opens
    ``[store] path`` and closes it in :meth:`ManagedAccessPolicy.aclose`. ``static`` reads its
    file now: a bad file is a :class:`ConfigError`. ``shanoir`` reads the ``shanoir`` directory
    given (else its own).
    """
    if settings.access.backend == "allow_all":
        return ManagedAccessPolicy(AllowAll())
    closers: list[Closer] = []
    inner: AccessPolicy
    if settings.access.backend == "shanoir":
        inner = ShanoirAccessPolicy(shanoir if shanoir is not None else _shanoir(settings, closers))
    else:
        inner = _backend(settings, "access", store, closers, _POLICIES)
    cache = CachingAccessPolicy(inner, ttl=settings.access.cache_ttl)
    return ManagedAccessPolicy(cache, closers=closers, cache=cache)


@dataclass(frozen=True)
class _Kinds(Generic[_B]):
    """How to build each kind of backend of one section."""

    sqlite: Callable[[SqliteStore], _B]
    static: Callable[[str], _B]
    http: Callable[..., _B]


_MAPS = _Kinds[IdentifierMap](SqliteIdentifierMap, StaticIdentifierMap.from_file, HttpIdentifierMap)
_POLICIES = _Kinds[AccessPolicy](SqliteAccessPolicy, StaticAccessPolicy.from_file, HttpAccessPolicy)


def _backend(
    settings: Settings,
    section: Literal["mapping", "access"],
    store: SqliteStore | None,
    closers: list[Closer],
    kinds: _Kinds[_B],
) -> _B:
    """The ``sqlite``, ``static`` or ``http`` backend of ``[mapping]`` or ``[access]``, with
    what must be closed added to ``closers``."""
    config = settings.mapping if section == "mapping" else settings.access
    if config.backend == "sqlite":
        return kinds.sqlite(store if store is not None else _open_store(settings, closers))
    if config.backend == "static":
        try:
            return kinds.static(config.file)
        except ConfigError as exc:
            raise ConfigError(f"[{section}] file: {exc}") from None
    client = kinds.http(config.url, token=config.token)
    if isinstance(client, PlatformClient):
        closers.append(client.aclose)
    return client


def shanoir_directory(settings: Settings) -> ShanoirDirectory:
    """The directory of ``[shanoir]``: its API client, with the proxy's own client credentials
    when ``credentials = "service"``."""
    s = settings.shanoir
    auth = None
    if s.credentials == "service":
        service = s.service
        secret: str | Callable[[], str] = service.client_secret
        if service.client_secret_file:
            path = Path(service.client_secret_file)
            secret = lambda: path.read_text(encoding="utf-8").strip()  # noqa: E731 (read per token)
        auth = ClientCredentials(
            service.token_url,
            service.client_id,
            secret,
            scope=service.scope,
            timeout=s.timeout,
            unavailable=ShanoirApi.unavailable,
        )
    api = ShanoirApi(s.url, timeout=s.timeout, auth=auth)
    return ShanoirDirectory(api, credentials=s.credentials, ttl=s.cache_ttl)


def _shanoir(settings: Settings, closers: list[Closer]) -> ShanoirDirectory:
    """:func:`shanoir_directory`, with its closer added to ``closers``."""
    directory = shanoir_directory(settings)
    closers.append(directory.aclose)
    return directory


def open_store(settings: Settings) -> SqliteStore:
    """Open ``[store] path`` (created if missing); a store that cannot be used is a
    :class:`ConfigError`."""
    try:
        return SqliteStore(settings.store.path)
    except StoreError as exc:
        raise ConfigError(f"[store] path: {exc}") from None


def _open_store(settings: Settings, closers: list[Closer]) -> SqliteStore:
    """:func:`open_store`, with its closer added to ``closers``."""
    store = open_store(settings)

    async def close() -> None:
        store.close()

    closers.append(close)
    return store


@dataclass(eq=False)
class Backends:
    """The identifier map and the access policy of one app, and what comes with them.

    ``store`` is the embedded store they read (for the readiness probe), ``registrar`` how an
    upload registers a new series (with the embedded store's map only), ``identifier_cache``
    and ``access_cache`` the caches whose counts are exported. :meth:`aclose` closes what
    :meth:`build` opened, never what it was given.
    """

    identifiers: IdentifierMap
    access: AccessPolicy
    store: SqliteStore | None = None
    registrar: SeriesRegistrar | None = None
    #: The map again, when one real study may hold several of its examinations.
    exam_series: ExamSeries | None = None
    #: The map again, when some examinations show a name other than the PACS's.
    exam_subjects: ExamSubjects | None = None
    #: The Shanoir-NG the ``shanoir`` backends read (for the readiness probe).
    shanoir: ShanoirDirectory | None = None
    #: Where uploads go instead of the PACS: Shanoir-NG's STOW route, with its map.
    uploads: ASGIApp | None = None
    identifier_cache: CachingIdentifierMap | None = None
    access_cache: CachingAccessPolicy | None = None
    #: The platforms the ``http`` backends ask, by section (for the readiness probe).
    platforms: dict[str, PlatformClient] = field(default_factory=dict)
    _closers: list[Closer] = field(default_factory=list, repr=False)

    @classmethod
    def build(
        cls,
        settings: Settings,
        *,
        identifiers: IdentifierMap | None = None,
        access: AccessPolicy | None = None,
        upstream: Upstream | None = None,
    ) -> Backends:
        """What ``[mapping]`` and ``[access]`` configure, but for the map and the policy a host
        app gives; one embedded store serves both ``sqlite`` backends, one Shanoir directory
        both ``shanoir`` ones; the ``shanoir`` map asks the PACS through ``upstream``."""
        closers: list[Closer] = []
        wants_store = (identifiers is None and settings.mapping.backend == "sqlite") or (
            access is None and settings.access.backend == "sqlite"
        )
        store = _open_store(settings, closers) if wants_store else None
        wants_shanoir = (identifiers is None and settings.mapping.backend == "shanoir") or (
            access is None and settings.access.backend == "shanoir"
        )
        shanoir = _shanoir(settings, closers) if wants_shanoir else None
        registrar: SeriesRegistrar | None = None
        uploads: ASGIApp | None = None
        identifier_cache: CachingIdentifierMap | None = None
        access_cache: CachingAccessPolicy | None = None
        if identifiers is None:
            managed_map = build_identifier_map(
                settings, store=store, upstream=upstream, shanoir=shanoir
            )
            if managed_map is None:
                raise ConfigError(
                    f'{settings.source}: [mapping] backend = "identity" translates nothing: '
                    "there is no identifier map to build"
                )
            closers.append(managed_map.aclose)
            identifiers = managed_map
            identifier_cache = managed_map if managed_map.ttl else None
            if isinstance(managed_map.inner, SqliteIdentifierMap):
                registrar = _registrar(managed_map.inner, managed_map)
            if isinstance(managed_map.inner, ShanoirIdentifierMap):
                uploads = ShanoirStow(managed_map.inner.directory.api)
        elif isinstance(identifiers, CachingIdentifierMap):
            identifier_cache = identifiers
            if store is None and isinstance(identifiers.inner, SqliteIdentifierMap):
                store = identifiers.inner.store  # a host app's store: probed, not closed
        if access is None and settings.access.backend == "allow_all":
            access = AllowAll()  # as such: the access layer then looks nothing up
        elif access is None:
            managed_policy = build_access_policy(settings, store=store, shanoir=shanoir)
            closers.append(managed_policy.aclose)
            access, access_cache = managed_policy, managed_policy.cache
        elif isinstance(access, ManagedAccessPolicy):
            access_cache = access.cache
        elif isinstance(access, CachingAccessPolicy):
            access_cache = access
        # What a map may do beyond the protocol, looked for behind its cache.
        inner = identifiers.inner if isinstance(identifiers, CachingIdentifierMap) else identifiers
        exam_series = inner if isinstance(inner, ExamSeries) else None
        exam_subjects = inner if isinstance(inner, ExamSubjects) else None
        platforms: dict[str, PlatformClient] = {
            section: backend
            for section, backend in (("mapping", inner), ("access", _innermost(access)))
            if isinstance(backend, PlatformClient)
        }
        return cls(
            identifiers,
            access,
            store,
            registrar,
            exam_series,
            exam_subjects,
            shanoir,
            uploads,
            identifier_cache,
            access_cache,
            platforms,
            closers,
        )

    async def aclose(self) -> None:
        """Close what :meth:`build` opened (the store last); idempotent."""
        closers, self._closers = self._closers, []
        for close in reversed(closers):
            await close()


def _innermost(policy: AccessPolicy) -> AccessPolicy:
    """The policy behind its management and its cache."""
    if isinstance(policy, ManagedAccessPolicy):
        policy = policy.policy
    return policy.inner if isinstance(policy, CachingAccessPolicy) else policy


def _registrar(sqlite_map: SqliteIdentifierMap, cache: CachingIdentifierMap) -> SeriesRegistrar:
    """Register an uploaded series in the embedded store, and teach the cache."""

    async def register(exam_id: int, series_uid: str) -> None:
        try:
            entry = await sqlite_map.register_series(exam_id, series_uid)
        except StoreError as exc:  # registered under another examination meanwhile
            _logger.warning("an uploaded series was not registered: %s", exc)
            return
        cache.learn_series(entry)

    return register
