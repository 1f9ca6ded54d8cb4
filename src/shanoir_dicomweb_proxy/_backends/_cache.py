"""TTL caches in front of any identifier map and any access policy."""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable, Collection, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, cast

import anyio
import anyio.to_thread
from cachetools import TLRUCache, TTLCache

from .._access import AccessPolicy, Action, Visible, user_key, within
from .._identifiers import IdentifierMap, SeriesEntry
from .._scope import Principal

__all__ = ["CachingAccessPolicy", "CachingIdentifierMap"]

_K = TypeVar("_K", bound=Hashable)
_V = TypeVar("_V")
_T = TypeVar("_T")
_ABSENT: Any = object()


class _Lookup(Generic[_K, _V]):
    """One direction of one kind: answers, unknowns, and the lookups in flight."""

    def __init__(self, ttl: float, negative_ttl: float, maxsize: int) -> None:
        self.found: TTLCache[_K, _V] = TTLCache(maxsize=maxsize, ttl=ttl)
        self.unknown: TTLCache[_K, bool] = TTLCache(maxsize=maxsize, ttl=negative_ttl)
        self.pending: dict[_K, anyio.Event] = {}
        self.hits = 0
        self.misses = 0

    def learn(self, key: _K, value: _V) -> None:
        self.found[key] = value  # found is asked before unknown: no need to clear it there

    def cached(self, key: _K) -> _V:
        # cachetools' get() checks the expiry twice (contains, then getitem): 3x slower.
        try:
            return self.found[key]
        except KeyError:
            return _ABSENT  # type: ignore[no-any-return]

    async def get(
        self,
        keys: Collection[_K],
        fetch: Callable[[list[_K]], Awaitable[Mapping[_K, _V]]],
        mirror: Callable[[_K, _V], None],
    ) -> dict[_K, _V]:
        result: dict[_K, _V] = {}
        missing: list[_K] = []
        waiting: list[tuple[_K, anyio.Event]] = []
        unique = set(keys)
        for key in unique:
            value = self.cached(key)
            if value is not _ABSENT:
                result[key] = value
            elif key in self.unknown:
                continue
            elif key in self.pending:
                waiting.append((key, self.pending[key]))
            else:
                missing.append(key)
        # Keys another lookup was already fetching count as hits: they cost no inner lookup.
        self.hits += len(unique) - len(missing)
        self.misses += len(missing)
        if missing:
            await self._fetch(missing, fetch, mirror, result)
        retry: list[_K] = []
        for key, event in waiting:
            # Another task is asking the inner map for this key: share its answer.
            await event.wait()
            value = self.cached(key)
            if value is not _ABSENT:
                result[key] = value
            elif key not in self.unknown:
                retry.append(key)  # that lookup failed (or its answer already expired)
        if retry:
            self.hits -= len(retry)
            self.misses += len(retry)
            await self._fetch(retry, fetch, mirror, result)
        return result

    async def _fetch(
        self,
        keys: list[_K],
        fetch: Callable[[list[_K]], Awaitable[Mapping[_K, _V]]],
        mirror: Callable[[_K, _V], None],
        result: dict[_K, _V],
    ) -> None:
        event = anyio.Event()
        for key in keys:
            self.pending[key] = event
        try:
            answer = await fetch(keys)
            for key in keys:
                value = answer.get(key, _ABSENT)
                if value is _ABSENT:
                    self.unknown[key] = True
                else:
                    result[key] = value
                    self.learn(key, value)
                    mirror(key, value)
        finally:
            for key in keys:
                if self.pending.get(key) is event:
                    del self.pending[key]
            event.set()


class CachingIdentifierMap:
    """A TTL cache (cachetools) in front of any :class:`IdentifierMap`.

    Answers are kept for ``ttl`` seconds, at most ``maxsize`` per direction and kind; an
    answer in one direction also fills the other. UIDs and IDs the inner map does not know are
    remembered for ``negative_ttl`` seconds (5 by default, never more than ``ttl``), so that a
    flood of made-up UIDs reaches the inner map once per UID per 5 s, while a study registered
    meanwhile shows up within 5 s. A batch asks the inner map only for what is missing, and
    concurrent batches wanting the same key share one inner lookup. With ``ttl = 0`` every
    batch goes to the inner map as it is, shared with no other (a map whose answers depend on
    the caller).
    """

    def __init__(
        self, inner: IdentifierMap, *, ttl: float, maxsize: int, negative_ttl: float = 5.0
    ) -> None:
        if ttl < 0 or negative_ttl < 0:
            raise ValueError("ttl and negative_ttl must be >= 0")
        if maxsize < 1:
            raise ValueError("maxsize must be >= 1")
        self.inner = inner
        self.ttl = ttl
        self.maxsize = maxsize
        self.negative_ttl = min(negative_ttl, ttl)
        negative = self.negative_ttl
        self._study_ids = _Lookup[str, int](ttl, negative, maxsize)
        self._study_uids = _Lookup[int, str](ttl, negative, maxsize)
        self._series_by_uid = _Lookup[str, SeriesEntry](ttl, negative, maxsize)
        self._series_by_id = _Lookup[int, SeriesEntry](ttl, negative, maxsize)

    def __repr__(self) -> str:
        return (
            f"CachingIdentifierMap({self.inner!r}, ttl={self.ttl}, maxsize={self.maxsize}, "
            f"negative_ttl={self.negative_ttl})"
        )

    @property
    def cache_hits(self) -> int:
        """UIDs and IDs answered from the cache (known or known unknown), for metrics."""
        return sum(lookup.hits for lookup in self._lookups())

    @property
    def cache_misses(self) -> int:
        """UIDs and IDs the inner map was asked for, for metrics."""
        return sum(lookup.misses for lookup in self._lookups())

    def _lookups(self) -> tuple[_Lookup[Any, Any], ...]:
        return self._study_ids, self._study_uids, self._series_by_uid, self._series_by_id

    def learn_series(self, entry: SeriesEntry) -> None:
        """Know ``entry`` at once (a series registered meanwhile), whatever was cached."""
        self._series_by_uid.learn(entry.series_uid, entry)
        self._series_by_id.learn(entry.acquisition_id, entry)

    async def studies_by_uid(self, uids: Collection[str]) -> Mapping[str, int]:
        """Real study UID → examination ID."""
        if not self.ttl:
            return await self.inner.studies_by_uid(uids)
        return await self._study_ids.get(
            uids, self.inner.studies_by_uid, lambda uid, exam: self._study_uids.learn(exam, uid)
        )

    async def studies_by_id(self, exam_ids: Collection[int]) -> Mapping[int, str]:
        """Examination ID → real study UID."""
        if not self.ttl:
            return await self.inner.studies_by_id(exam_ids)
        return await self._study_uids.get(
            exam_ids, self.inner.studies_by_id, lambda exam, uid: self._study_ids.learn(uid, exam)
        )

    async def series_by_uid(self, uids: Collection[str]) -> Mapping[str, SeriesEntry]:
        """Real series UID → its entry."""
        if not self.ttl:
            return await self.inner.series_by_uid(uids)
        return await self._series_by_uid.get(
            uids,
            self.inner.series_by_uid,
            lambda _, entry: self._series_by_id.learn(entry.acquisition_id, entry),
        )

    async def series_by_id(self, acquisition_ids: Collection[int]) -> Mapping[int, SeriesEntry]:
        """Acquisition ID → its entry."""
        if not self.ttl:
            return await self.inner.series_by_id(acquisition_ids)
        return await self._series_by_id.get(
            acquisition_ids,
            self.inner.series_by_id,
            lambda _, entry: self._series_by_uid.learn(entry.series_uid, entry),
        )


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
            return within(visible[1], exam_ids)
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
