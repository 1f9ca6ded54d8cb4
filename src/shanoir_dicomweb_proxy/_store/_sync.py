"""``store sync``: walk the upstream with QIDO and register every study and series."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import quote

import anyio
import anyio.to_thread
import httpx
import orjson

from .._dicom import (
    SERIES_INSTANCE_UID,
    SERIES_NUMBER,
    STUDY_DATE,
    STUDY_INSTANCE_UID,
    STUDY_TIME,
    json_value,
)
from .._errors import UpstreamError
from .._upstream import Upstream
from ._sqlite import (
    SqliteStore,
)

_ACCEPT = [(b"accept", b"application/dicom+json")]


@dataclass
class SyncProgress:
    """Where :func:`sync_store` is: listing studies, then registering them one by one."""

    phase: Literal["listing", "registering", "done"] = "listing"
    listed: int = 0  # studies listed so far
    total: int = 0  # studies to register (once listed)
    studies: int = 0  # studies registered so far (new or already known)
    new_studies: int = 0
    series: int = 0
    new_series: int = 0
    conflicts: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """``N studies (M new), K series (L new)``."""
        return (
            f"{self.studies} studies ({self.new_studies} new), "
            f"{self.series} series ({self.new_series} new)"
        )


async def sync_store(
    store: SqliteStore,
    upstream: Upstream,
    *,
    page_size: int = 500,
    concurrency: int = 4,
    progress: SyncProgress | None = None,
    report: Callable[[SyncProgress], None] | None = None,
) -> SyncProgress:
    """Register every study of the upstream and every series of each (DESIGN §9).

    Studies are listed first (QIDO ``/studies``, paged), then registered in a stable order
    that does not depend on the upstream's: StudyDate, StudyTime, StudyInstanceUID; series by
    SeriesNumber then SeriesInstanceUID. Each study is registered with its series in one
    transaction, so an interrupted sync leaves whole studies, and the next one carries on with
    the same IDs a single run would have given. ``report`` is called after each step.
    """
    state = progress or SyncProgress()

    def tell() -> None:
        if report is not None:
            report(state)

    def listed(count: int) -> None:
        state.listed = count
        tell()

    studies = await _walk(upstream, "/studies", _study_order, page_size, listed)
    state.phase, state.total = "registering", len(studies)
    tell()

    async def series_of(study_uid: str) -> list[str]:
        target = f"/studies/{quote(study_uid, safe='')}/series"
        return [key[-1] for key in await _walk(upstream, target, _series_order, page_size, None)]

    # The series of the next few studies are fetched while one is registered; registration
    # follows the sorted order whatever order the answers come back in.
    uids = iter(key[-1] for key in studies)
    queue: deque[tuple[str, asyncio.Task[list[str]]]] = deque()

    def refill() -> None:
        while len(queue) < max(1, concurrency):
            uid = next(uids, None)
            if uid is None:
                return
            queue.append((uid, asyncio.create_task(series_of(uid))))

    try:
        refill()
        while queue:
            study_uid, task = queue.popleft()
            series = await task
            refill()
            done = await anyio.to_thread.run_sync(store.register, study_uid, series)
            state.studies += 1
            state.new_studies += done.new_study
            state.series += len(done.series)
            state.new_series += done.new_series
            state.conflicts += done.conflicts
            tell()
    finally:
        for _, task in queue:
            task.cancel()
        await asyncio.gather(*(task for _, task in queue), return_exceptions=True)
    state.phase = "done"
    tell()
    return state


async def _walk(
    upstream: Upstream,
    target: str,
    order: Callable[[Mapping[str, Any]], tuple[Any, ...]],
    page_size: int,
    listed: Callable[[int], None] | None,
) -> list[tuple[Any, ...]]:
    """Every row of a QIDO search, page by page (``limit``/``offset``), as its sort key (whose
    last item is the row's UID), once per UID. Only the keys are kept: 100,000 studies cost a
    few tens of MB, not the hundreds their whole rows would."""
    keys: dict[str, tuple[Any, ...]] = {}
    offset = 0
    while True:
        page, truncated = await _qido(upstream, f"{target}?limit={page_size}&offset={offset}")
        added = 0
        for row in page:
            key = order(row)
            if key[-1] and key[-1] not in keys:
                keys[key[-1]] = key
                added += 1
        offset += len(page)
        if listed is not None:
            listed(len(keys))
        # A short page ends the search unless the upstream says it cut the page short itself
        # (QIDO-RS: Warning 299, "additional results can be requested"). A page of nothing
        # new also ends it: an upstream that ignores offset would otherwise loop forever.
        if not page or added == 0 or (len(page) < page_size and not truncated):
            return sorted(keys.values())


async def _qido(upstream: Upstream, target: str) -> tuple[list[dict[str, Any]], bool]:
    response = await upstream.send("GET", target, headers=list(_ACCEPT))
    try:
        body = await response.aread()
    except httpx.HTTPError as exc:
        raise UpstreamError(f"GET {target}: the upstream connection failed") from exc
    finally:
        await response.aclose()
    status = response.status_code
    if status == 204:
        return [], False
    if status != 200:
        raise UpstreamError(f"GET {target}: the upstream answered {status}")
    try:
        page = orjson.loads(body) if body.strip() else []
    except orjson.JSONDecodeError as exc:
        raise UpstreamError(f"GET {target}: the upstream's answer is not JSON") from exc
    if not isinstance(page, list) or not all(isinstance(row, dict) for row in page):
        raise UpstreamError(f"GET {target}: the upstream's answer is not a list of datasets")
    warnings = response.headers.get_list("warning")
    return page, any(w.strip().startswith("299") for w in warnings)


def _uid(row: Mapping[str, Any], tag: int) -> str:
    value = json_value(row, tag)
    return value.strip() if isinstance(value, str) else ""


def _text(row: Mapping[str, Any], tag: int) -> str:
    value = json_value(row, tag)
    return value if isinstance(value, str) else ""


def _study_order(row: Mapping[str, Any]) -> tuple[str, str, str]:
    return _text(row, STUDY_DATE), _text(row, STUDY_TIME), _uid(row, STUDY_INSTANCE_UID)


def _series_order(row: Mapping[str, Any]) -> tuple[bool, int, str]:
    # SeriesNumber is IS: a JSON number, or a string from some servers; absent sorts last.
    value = json_value(row, SERIES_NUMBER)
    try:
        number = int(str(value).strip()) if value is not None else None
    except ValueError:
        number = None
    return number is None, number or 0, _uid(row, SERIES_INSTANCE_UID)
