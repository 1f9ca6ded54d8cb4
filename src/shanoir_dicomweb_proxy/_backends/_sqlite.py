"""The ``sqlite`` backends: the identifier map and the grants of the embedded store, each
batch one call in a worker thread (``anyio.to_thread``), one at a time.

One at a time because the store serializes on its lock anyway: queued tasks wait here, on the
event loop, rather than as threads blocked on the lock holding tokens of anyio's shared thread
pool (which the upload spooling also uses). The store is not closed here: whoever opened it
closes it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping
from typing import Any, TypeVar

import anyio
import anyio.to_thread

from .._access import Action, Visible, user_key
from .._errors import AccessUnavailable
from .._identifiers import SeriesEntry
from .._scope import Principal
from .._store import SqliteStore, StoreError

__all__ = ["SqliteAccessPolicy", "SqliteIdentifierMap"]

logger = logging.getLogger("shanoir_dicomweb_proxy.access")

_UNAVAILABLE = "access decisions cannot be made now"
_T = TypeVar("_T")


class SqliteIdentifierMap:
    """The ``IdentifierMap`` of a :class:`SqliteStore`: each batch is one call in a worker
    thread (``anyio.to_thread``), one at a time.

    One at a time because the store serializes on its lock anyway: queued tasks wait here, on
    the event loop, rather than as threads blocked on the lock holding tokens of anyio's
    shared thread pool (which the upload spooling also uses). The store is not closed here:
    whoever opened it closes it.
    """

    def __init__(self, store: SqliteStore) -> None:
        self.store = store
        self._limiter = anyio.CapacityLimiter(1)

    def __repr__(self) -> str:
        return f"SqliteIdentifierMap({self.store!r})"

    async def _run(self, func: Callable[[list[Any]], _T], keys: Collection[Any]) -> _T:
        return await anyio.to_thread.run_sync(func, list(keys), limiter=self._limiter)

    async def studies_by_uid(self, uids: Collection[str]) -> Mapping[str, int]:
        """Real study UID → examination ID."""
        return await self._run(self.store.lookup_studies_by_uid, uids) if uids else {}

    async def studies_by_id(self, exam_ids: Collection[int]) -> Mapping[int, str]:
        """Examination ID → real study UID."""
        return await self._run(self.store.lookup_studies_by_id, exam_ids) if exam_ids else {}

    async def series_by_uid(self, uids: Collection[str]) -> Mapping[str, SeriesEntry]:
        """Real series UID → its entry."""
        return await self._run(self.store.lookup_series_by_uid, uids) if uids else {}

    async def series_by_id(self, acquisition_ids: Collection[int]) -> Mapping[int, SeriesEntry]:
        """Acquisition ID → its entry."""
        if not acquisition_ids:
            return {}
        return await self._run(self.store.lookup_series_by_id, acquisition_ids)

    async def register_series(self, exam_id: int, series_uid: str) -> SeriesEntry:
        """Register ``series_uid`` under ``exam_id`` (see :meth:`SqliteStore.register_series`)."""

        def register(_: list[Any]) -> int:
            return self.store.register_series(exam_id, series_uid)

        acquisition_id = await self._run(register, ())
        return SeriesEntry(acquisition_id, exam_id, series_uid)


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
