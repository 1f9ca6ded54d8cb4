"""The access policies of ``[access] backend`` (DESIGN §4, §5), their cache, and the one function
that builds the configured one (``docs/access.md``).

- :class:`SqliteAccessPolicy`: the grants of the embedded store (``store grant|revoke``).
- :class:`StaticAccessPolicy`: a TOML or JSON file of grants, read once.
- :class:`HttpAccessPolicy`: a small REST contract a platform implements.
- ``allow_all``: :class:`~shanoir_dicomweb_proxy._access.AllowAll`, not cached.

:func:`build_access_policy` puts a :class:`CachingAccessPolicy` in front of the first three.
Grants name users by their :func:`user_key`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable, Collection, Hashable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar, cast

import anyio
import anyio.to_thread
from cachetools import TLRUCache

from ._access import ACTIONS, ALL, AccessPolicy, Action, AllowAll, Visible, grant_covers
from ._auth import Principal
from ._backends import (
    Closer,
    _answer_ids,
    _batches,
    _file_errors,
    _file_items,
    _Malformed,
    _open_store,
    _Owning,
    _PlatformClient,
    _read_document,
    _valid_ids,
)
from ._config import Settings
from ._errors import AccessUnavailable, ConfigError, ProxyError
from ._store import SqliteStore, StoreError
from ._store._sqlite import _check_id

__all__ = [
    "CachingAccessPolicy",
    "HttpAccessPolicy",
    "ManagedAccessPolicy",
    "SqliteAccessPolicy",
    "StaticAccessPolicy",
    "StaticGrant",
    "build_access_policy",
    "user_key",
]

logger = logging.getLogger("shanoir_dicomweb_proxy.access")

_T = TypeVar("_T")
_UNAVAILABLE = "access decisions cannot be made now"


def user_key(principal: Principal) -> str:
    """The user a grant names: the principal's user ID (``[auth] user_claim``, Shanoir's
    ``userId``) when its token carries one, else its subject (``sub``)."""
    return principal.user_id or principal.subject


# --- sqlite ----------------------------------------------------------------------------------


class SqliteAccessPolicy:
    """The grants of a :class:`SqliteStore`: each decision is one indexed query in a worker
    thread, one at a time (as :class:`~shanoir_dicomweb_proxy._store.SqliteIdentifierMap`).

    A store that cannot answer (locked past its timeout, closed) raises
    :class:`AccessUnavailable`. The store is not closed here: whoever opened it closes it.
    """

    def __init__(self, store: SqliteStore) -> None:
        self.store = store
        self._limiter = anyio.CapacityLimiter(1)

    def __repr__(self) -> str:
        return f"SqliteAccessPolicy({self.store!r})"

    async def _run(self, func: Callable[..., set[int]], *args: Any) -> frozenset[int]:
        try:
            found = await anyio.to_thread.run_sync(func, *args, limiter=self._limiter)
        except StoreError as exc:
            logger.warning("access store: %s", exc)
            raise AccessUnavailable(_UNAVAILABLE) from None
        return frozenset(found)

    async def visible(self, principal: Principal, action: Action) -> Visible:
        """The examinations granted to the principal's user for ``action``."""
        return await self._run(self.store.visible_exams, user_key(principal), action)

    async def allowed(
        self, principal: Principal, action: Action, exam_ids: Collection[int]
    ) -> frozenset[int]:
        """The subset of ``exam_ids`` granted to the principal's user for ``action``."""
        if not exam_ids:
            return frozenset()
        user = user_key(principal)
        return await self._run(self.store.allowed_exams, user, action, list(exam_ids))


# --- static ----------------------------------------------------------------------------------

_GRANT_KEYS = frozenset({"user", "exams", "all", "actions"})


@dataclass(frozen=True, slots=True)
class StaticGrant:
    """``user`` may do ``actions`` on ``exams`` (:data:`ALL`: on every examination)."""

    user: str
    actions: frozenset[Action]
    exams: Visible


class StaticAccessPolicy:
    """Grants held in memory: dictionary lookups.

    :meth:`from_file` reads ``[access] file`` (``docs/access.md``). Grants of the same user add
    up; a ``download`` grant also allows ``read``.
    """

    def __init__(self, grants: Iterable[StaticGrant], *, source: str = "") -> None:
        self.source = source
        self._visible: dict[tuple[str, Action], Visible] = {}
        for grant in grants:
            for wanted in ACTIONS:
                if any(grant_covers(granted, wanted) for granted in grant.actions):
                    key = grant.user, wanted
                    known, exams = self._visible.get(key, frozenset()), grant.exams
                    if isinstance(known, frozenset) and isinstance(exams, frozenset):
                        self._visible[key] = known | exams
                    else:
                        self._visible[key] = ALL

    @classmethod
    def from_file(cls, path: str | Path) -> StaticAccessPolicy:
        """Read a TOML file (by its ``.toml`` suffix) or a JSON object of the same shape."""
        path = Path(path)
        data = _read_document(path)
        with _file_errors(path):
            grants = list(_static_grants(data))
        return cls(grants, source=str(path))

    def __repr__(self) -> str:
        users = len({user for user, _ in self._visible})
        return f"StaticAccessPolicy({self.source!r}, {users} users)"

    async def visible(self, principal: Principal, action: Action) -> Visible:
        """Every examination the file grants the principal's user for ``action``."""
        return self._visible.get((user_key(principal), action), frozenset())

    async def allowed(
        self, principal: Principal, action: Action, exam_ids: Collection[int]
    ) -> frozenset[int]:
        """The subset of ``exam_ids`` the file grants the principal's user for ``action``."""
        return _within(await self.visible(principal, action), exam_ids)


def _within(visible: Visible, exam_ids: Iterable[int]) -> frozenset[int]:
    """The IDs of ``exam_ids`` that ``visible`` holds."""
    if isinstance(visible, frozenset):
        return visible.intersection(exam_ids)
    return frozenset(exam_ids)


def _static_grants(data: Any) -> Iterator[StaticGrant]:
    """The grants of ``{"grants": [{"user", "actions", "exams" | "all"}]}``; StoreError."""
    what = "a grant (user, actions, exams or all)"
    for where, item in _file_items(data, "grants", _GRANT_KEYS, what):
        user = item.get("user")
        if not isinstance(user, str) or not user or user != user.strip():
            raise StoreError(
                f'{where}: user: expected a user ID or subject as a string (user = "7"), '
                f"got {user!r}"
            )
        actions = item.get("actions")
        if (
            not isinstance(actions, list)
            or not actions
            or not all(action in ACTIONS for action in actions)
        ):
            raise StoreError(
                f"{where}: actions: expected a list of {', '.join(ACTIONS)}, got {actions!r}"
            )
        yield StaticGrant(user, frozenset(actions), _static_exams(item, where))


def _static_exams(item: dict[str, Any], where: str) -> Visible:
    everything = item.get("all", False)
    if not isinstance(everything, bool):
        raise StoreError(f"{where}: all: expected true or false, got {everything!r}")
    if everything == ("exams" in item):
        raise StoreError(f"{where}: expected either exams (a list of IDs) or all = true")
    if everything:
        return ALL
    exams = item["exams"]
    if not isinstance(exams, list):
        raise StoreError(f"{where}: exams: expected a list of examination IDs, got {exams!r}")
    for exam_id in exams:
        _check_id(where, "exams", exam_id)
    return frozenset(exams)


# --- http ------------------------------------------------------------------------------------


class HttpAccessPolicy(_PlatformClient):
    """The decisions of a platform that implements the access contract of ``docs/access.md``:
    ``POST {url}/access/visible`` and ``POST {url}/access/allowed`` (at most 1000 IDs a
    request).

    Requests carry the user's identity (user ID, subject, username, roles), never their token.
    Fails closed: a platform that cannot be reached, times out, answers anything but 200 or
    answers something the contract does not allow raises :class:`AccessUnavailable` (503).
    """

    _section = "access"
    _logger = logger

    def _unavailable(self) -> ProxyError:
        return AccessUnavailable(_UNAVAILABLE)

    async def visible(self, principal: Principal, action: Action) -> Visible:
        """``POST {url}/access/visible``: everything, or the IDs."""
        body = {"user": _identity(principal), "action": action}
        return await self._post("/access/visible", body, _visible_answer)

    async def allowed(
        self, principal: Principal, action: Action, exam_ids: Collection[int]
    ) -> frozenset[int]:
        """``POST {url}/access/allowed``, one request per batch of IDs."""
        found: set[int] = set()
        user = _identity(principal)
        for batch in _batches(_valid_ids(exam_ids), self.batch_size):
            body = {"user": user, "action": action, "exam_ids": batch}
            answer = await self._post("/access/allowed", body, _allowed_answer)
            found.update(answer.intersection(batch))  # never more than was asked
        return frozenset(found)


def _identity(principal: Principal) -> dict[str, Any]:
    return {
        "id": principal.user_id,
        "subject": principal.subject,
        "username": principal.username,
        "roles": sorted(principal.roles),
    }


def _visible_answer(data: Any) -> Visible:
    if not isinstance(data, dict):
        raise _Malformed("expected an object")
    everything = data.get("all", False)
    if not isinstance(everything, bool):
        raise _Malformed("all: expected true or false")
    if everything:
        return ALL
    return frozenset(_answer_ids(data.get("exam_ids"), "exam_ids"))


def _allowed_answer(data: Any) -> frozenset[int]:
    if not isinstance(data, dict):
        raise _Malformed("expected an object")
    return frozenset(_answer_ids(data.get("exam_ids"), "exam_ids"))


# --- the cache -------------------------------------------------------------------------------


@dataclass(eq=False)
class _Flight(Generic[_T]):
    """A call to the inner policy that identical concurrent calls wait for."""

    done: anyio.Event = field(default_factory=anyio.Event)
    answered: bool = False
    answer: _T | None = None
    error: Exception | None = None


class CachingAccessPolicy:
    """TTL caches (cachetools) in front of any :class:`AccessPolicy`.

    ``visible`` answers are kept per (user key, action), ``allowed`` answers per (user key,
    action, examination), denials included; an ``allowed`` question is answered from a kept
    ``visible`` answer when there is one. An answer is kept ``ttl`` seconds (``0``: nothing is
    kept), and never past the expiry of the token it was asked for; a principal whose token
    has expired is never answered from the cache. Failures are not kept. Concurrent identical
    questions share one call. ``timer`` gives the time in seconds since the epoch (the clock
    of ``Principal.expires_at``).
    """

    def __init__(
        self,
        inner: AccessPolicy,
        *,
        ttl: float,
        maxsize: int = 100_000,
        visible_maxsize: int = 10_000,
        timer: Callable[[], float] = time.time,
    ) -> None:
        if ttl < 0:
            raise ValueError("ttl must be >= 0")
        if maxsize < 1 or visible_maxsize < 1:
            raise ValueError("maxsize and visible_maxsize must be >= 1")
        self.inner = inner
        self.ttl = ttl
        self._timer = timer
        # Values are (deadline, answer): the token's expiry bounds the entry's life.
        self._visible: TLRUCache[tuple[str, Action], tuple[float, Visible]] = TLRUCache(
            maxsize=visible_maxsize, ttu=self._expiry, timer=timer
        )
        self._allowed: TLRUCache[tuple[str, Action, int], tuple[float, bool]] = TLRUCache(
            maxsize=maxsize, ttu=self._expiry, timer=timer
        )
        self._flights: dict[Hashable, _Flight[Any]] = {}
        #: Questions answered from the caches, and those that were not (metrics).
        self.cache_hits = 0
        self.cache_misses = 0

    def __repr__(self) -> str:
        return f"CachingAccessPolicy({self.inner!r}, ttl={self.ttl})"

    def _expiry(self, key: object, value: tuple[float, object], now: float) -> float:
        return min(now + self.ttl, value[0])

    def _deadline(self, principal: Principal) -> float | None:
        """Until when answers for ``principal`` may be kept; None: not at all."""
        deadline = math.inf if principal.expires_at is None else principal.expires_at
        return deadline if self.ttl > 0 and deadline > self._timer() else None

    async def visible(self, principal: Principal, action: Action) -> Visible:
        """The inner policy's answer, kept per user and action."""
        deadline = self._deadline(principal)
        if deadline is None:
            return await self.inner.visible(principal, action)
        key = user_key(principal), action
        hit = self._visible.get(key)
        if hit is not None:
            self.cache_hits += 1
            return hit[1]
        self.cache_misses += 1

        async def ask() -> Visible:
            answer = await self.inner.visible(principal, action)
            self._visible[key] = (deadline, answer)
            return answer

        return await self._shared(("visible", *key), ask)

    async def allowed(
        self, principal: Principal, action: Action, exam_ids: Collection[int]
    ) -> frozenset[int]:
        """The inner policy's answer, kept per user, action and examination."""
        deadline = self._deadline(principal)
        if deadline is None:
            return await self.inner.allowed(principal, action, exam_ids)
        user = user_key(principal)
        visible = self._visible.get((user, action))
        if visible is not None:
            self.cache_hits += 1
            return _within(visible[1], exam_ids)
        found: set[int] = set()
        missing: list[int] = []
        for exam_id in set(exam_ids):
            hit = self._allowed.get((user, action, exam_id))
            if hit is None:
                missing.append(exam_id)
            elif hit[1]:
                found.add(exam_id)
        if not missing:
            self.cache_hits += 1
            return frozenset(found)
        self.cache_misses += 1

        async def ask() -> frozenset[int]:
            answer = await self.inner.allowed(principal, action, missing)
            for exam_id in missing:
                self._allowed[user, action, exam_id] = (deadline, exam_id in answer)
            return answer.intersection(missing)

        return frozenset(
            found | await self._shared(("allowed", user, action, *sorted(missing)), ask)
        )

    async def _shared(self, key: Hashable, ask: Callable[[], Awaitable[_T]]) -> _T:
        """``ask()``, or the answer (or error) of the identical call already under way."""
        flight: _Flight[_T] | None = self._flights.get(key)
        if flight is not None:
            await flight.done.wait()
            if flight.error is not None:
                raise flight.error
            if flight.answered:
                return cast(_T, flight.answer)
            # that call was cancelled: ask again
        mine = _Flight[_T]()
        self._flights[key] = mine
        try:
            answer = await ask()
            mine.answer, mine.answered = answer, True
            return answer
        except Exception as exc:
            mine.error = exc
            raise
        finally:
            if self._flights.get(key) is mine:
                del self._flights[key]
            mine.done.set()


# --- the configured policy -------------------------------------------------------------------


class ManagedAccessPolicy(_Owning):
    """The configured policy (behind its cache, but for ``allow_all``), owning what its backend
    opened: call :meth:`aclose` (or use ``async with``) when done."""

    def __init__(self, policy: AccessPolicy, *, closers: Iterable[Closer] = ()) -> None:
        self.policy = policy
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


def build_access_policy(
    settings: Settings, *, store: SqliteStore | None = None
) -> ManagedAccessPolicy:
    """The access policy ``[access]`` configures, behind a cache of ``cache_ttl`` seconds
    (``allow_all`` is not cached).

    ``sqlite`` uses ``store`` when given (the identifier map's, left open), else opens
    ``[store] path`` and closes it in :meth:`ManagedAccessPolicy.aclose`. ``static`` reads its
    file now: a bad file is a :class:`ConfigError`.
    """
    access = settings.access
    closers: list[Closer] = []
    inner: AccessPolicy
    if access.backend == "allow_all":
        return ManagedAccessPolicy(AllowAll())
    if access.backend == "sqlite":
        inner = SqliteAccessPolicy(store if store is not None else _open_store(settings, closers))
    elif access.backend == "static":
        try:
            inner = StaticAccessPolicy.from_file(access.file)
        except ConfigError as exc:
            raise ConfigError(f"[access] file: {exc}") from None
    else:
        http = HttpAccessPolicy(access.url, token=access.token)
        closers.append(http.aclose)
        inner = http
    return ManagedAccessPolicy(CachingAccessPolicy(inner, ttl=access.cache_ttl), closers=closers)
